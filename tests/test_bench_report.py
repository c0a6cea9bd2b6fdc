"""The benchmarks' shared plumbing (hpckfac.bench.report): timing, medians, output and memory checks."""
import os

import numpy as np
import pytest

from hpckfac.bench import report
from hpckfac.cli import RankParser


def test_median_of_odd_and_even_counts():
    assert report.median([5.0, 1.0, 100.0]) == 5.0
    assert report.median([4.0, 1.0, 3.0, 100.0]) == 3.5
    assert isinstance(report.median([1, 2, 4]), float)


def test_time_calls_times_each_call_after_the_warmup(monkeypatch):
    """A clock that only the calls move: each timed call's seconds are its own, the warmup calls
    are untimed, and the barrier runs before each timed call."""
    clock, events = [0.0], []
    durations = iter([7.0, 11.0, 0.5, 2.0, 3.0])

    def fn():
        events.append("call")
        clock[0] += next(durations)

    monkeypatch.setattr(report.time, "perf_counter", lambda: clock[0])
    times = report.time_calls(fn, repeat=3, warmup=2, barrier=lambda: events.append("barrier"))
    assert times == [0.5, 2.0, 3.0]
    assert events == ["call", "call"] + ["barrier", "call"] * 3


def test_output_problem_names_what_cannot_be_written(tmp_path, monkeypatch):
    assert report.output_problem(str(tmp_path / "new" / "deeper" / "out.json")) is None
    assert report.output_problem(str(tmp_path)) == f"{tmp_path} is a directory"
    (tmp_path / "file").write_text("")
    file = tmp_path / "file"
    assert report.output_problem(str(file / "out.json")) == f"{file} is a file, not a directory"
    assert report.output_problem(str(file), directory=True) == f"{file} exists and is not a directory"
    # A folder the user may read and enter but not write into (faked: root may write anywhere).
    real = os.access
    monkeypatch.setattr(report.os, "access", lambda path, mode: real(path, mode) and not mode & os.W_OK)
    assert report.output_problem(str(tmp_path / "out.json")) == f"cannot write in {tmp_path}"


def test_check_memory_counts_the_ranks_that_share_the_machine(monkeypatch):
    """Three ranks of 1 GiB each on a machine of 2 GiB do not fit, though one would."""
    from hpckfac.comm import topology

    monkeypatch.setattr(topology, "node_placement", lambda comm: (0, 3))
    monkeypatch.setattr(report, "host_memory", lambda: 2 * 2**30)
    parser = RankParser(prog="bench")
    with pytest.raises(SystemExit):
        report.check_memory(parser, 2**30, "--batch")
    monkeypatch.setattr(topology, "node_placement", lambda comm: (0, 1))
    report.check_memory(parser, 2**30, "--batch")


def test_format_table_aligns_formatted_cells_under_their_headers():
    from hpckfac.tables import format_table

    rows = [{"name": "lpt", "ms": 12.34567, "ranks": 16}, {"name": "contiguous", "ms": 3.0, "ranks": 2.5}, {"ms": 0.5}]
    # Floats in floatfmt (an int stays as written), missing cells blank, each column as wide as
    # its widest cell or header and right-aligned, two spaces apart.
    assert format_table(rows, ["name", "ranks", "ms"], ".2f").splitlines() == [
        "      name  ranks     ms",
        "----------  -----  -----",
        "       lpt     16  12.35",
        "contiguous   2.50   3.00",
        "                    0.50",
    ]
    assert format_table(rows[:1], ["ms"]).splitlines()[2] == "12.346"  # the default .3f
    # NumPy's narrower floats too (float32 is no Python float); its integers stay as written.
    assert format_table([{"ms": np.float32(1.23456), "n": np.int64(7)}], ["ms", "n"]).splitlines()[2] == "1.235  7"


def test_progress_in_a_log_prints_a_line_per_tenth_of_the_items(capsys):
    """Not on a terminal (pytest's captured stderr): every item passes through, and a line
    after each tenth of them; ranks other than 0 print nothing."""
    assert list(report.progress(range(20), "steps")) == list(range(20))
    assert capsys.readouterr().err.splitlines() == [f"steps: {k}/20" for k in range(2, 21, 2)]
    assert list(report.progress(range(3), "sizes")) == [0, 1, 2]
    assert capsys.readouterr().err.splitlines() == ["sizes: 1/3", "sizes: 2/3", "sizes: 3/3"]
    assert list(report.progress(range(20), "steps", enabled=False)) == list(range(20))
    assert capsys.readouterr().err == ""


def test_write_json_records_the_results_with_where_they_were_measured(tmp_path):
    import json
    import platform

    import numpy
    import torch

    import hpckfac

    out = tmp_path / "deeper" / "result.json"
    report.write_json(out, "comm", {"repeat": 3}, [{"bytes": 4096}])
    payload = json.loads(out.read_text())
    assert (payload["benchmark"], payload["config"], payload["results"]) == ("comm", {"repeat": 3}, [{"bytes": 4096}])
    env = payload["environment"]
    assert (env["hpckfac"], env["host"], env["python"], env["numpy"], env["torch"]) == (
        hpckfac.__version__, platform.node(), platform.python_version(), numpy.__version__, torch.__version__)
    assert env["cpus"] == os.cpu_count() and env["ranks"] == 1 and env["threads"]["torch"] == torch.get_num_threads()
