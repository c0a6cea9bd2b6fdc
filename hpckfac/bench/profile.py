"""Where the time of a training step goes: ``torch.profiler`` and ``cProfile`` over a few steps.

``profile_steps`` runs a step function under ``torch.profiler`` (device kernels
ranked by device time on a GPU, host operators by their own time) and then,
separately so that neither distorts the other, under ``cProfile`` (Python
functions by their own time, and hpckfac's by cumulative time). On a GPU the
question is usually whether the step is bound by the device or by the host's
launches: compare the device's busy time with the wall time.
"""
from __future__ import annotations

import cProfile
import inspect
import io
import pstats
import time
from typing import Callable

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

ROWS = 25

# acc_events=True (torch >= 2.5) has the events processed when the profiler stops rather than at
# their first read; an older torch has no such option and always processes them when it stops.
_KEEP_EVENTS = {"acc_events": True} if "acc_events" in inspect.signature(profile.__init__).parameters else {}


def profile_steps(step: Callable[[], None], steps: int, cuda: bool, sync: Callable[[], None]) -> str:
    """A text report of ``steps`` calls of ``step`` (``sync`` waits for the device)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    start = time.perf_counter()
    with profile(activities=activities, **_KEEP_EVENTS) as prof:
        for _ in range(steps):
            step()
        sync()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    lines = [f"torch.profiler, {steps} steps: {1e3 * wall / steps:.1f} ms per step (profiled)"]
    if cuda:
        # Kernels are the device-type events (operators report their kernels' time too: not summed).
        busy = sum(getattr(e, "self_device_time_total", 0.0) for e in events
                   if e.device_type != DeviceType.CPU) / 1e3  # microseconds -> ms
        lines.append(f"device busy {busy / steps:.1f} ms per step ({100 * busy / (1e3 * wall):.0f}% of the wall time)")
        lines.append(events.table(sort_by="self_device_time_total", row_limit=ROWS, max_name_column_width=60))
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=ROWS, max_name_column_width=60))
    profiler = cProfile.Profile()
    sync()
    profiler.enable()
    for _ in range(steps):
        step()
    sync()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(ROWS)
    stats.sort_stats("cumtime").print_stats("hpckfac", 2 * ROWS)
    lines.append(f"cProfile, {steps} steps")
    lines.append(text.getvalue())
    return "\n".join(lines)
