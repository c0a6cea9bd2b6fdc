"""``python -m hpckfac.bench step`` end to end on a tiny ResNet: the table's configurations and
ratios in the JSON, and the profile report of every configuration."""
import importlib
import json
import re
from typing import Callable

import pytest
import torch

from hpckfac.bench import profile, step


def test_step_benchmark_writes_results_and_profiles(tmp_path, capsys):
    out, profile = tmp_path / "step.json", tmp_path / "profile.txt"
    argv = ["--steps", "3", "--warmup", "1", "--batch", "4", "--depth", "8", "--width", "4",
            "--configs", "sgd,kfac_1_10", "--json", str(out), "--profile", str(profile), "--profile-steps", "2"]
    assert step.main(argv) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"sgd", "kfac_1_10"}
    assert rows["sgd"]["median_vs_sgd"] == 1.0 and rows["kfac_1_10"]["median_ms"] > 0
    assert rows["kfac_1_10"]["local_factors_ms"] > 0 and "local_factors_ms" not in rows["sgd"]
    text = profile.read_text()
    sections = text.split("== ")[1:]
    assert [s.split()[0] for s in sections] == ["sgd", "kfac_1_10"]
    for section in sections:
        assert "torch.profiler, 2 steps" in section and "cProfile, 2 steps" in section
    # The K-FAC section names the preconditioner's own functions; no device table on the CPU.
    assert "preconditioner.py" in sections[1] and "device busy" not in text
    assert f"profiles: {profile}" in capsys.readouterr().out


def test_transformer_model_runs_every_configuration(tmp_path):
    """``--model transformer``: a causal LM of token ids, every one of its layers preconditioned."""
    out = tmp_path / "step.json"
    argv = ["--model", "transformer", "--depth", "2", "--width", "8", "--seq", "5", "--steps", "2", "--warmup", "1",
            "--batch", "3", "--json", str(out)]
    assert step.main(argv) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"sgd", "kfac_1_10", "kfac_10_100"} and rows["kfac_1_10"]["local_factors_ms"] > 0
    runner = step.Runner("kfac_1_10", step.parse(argv), step.Communicator(), step.torch.device("cpu"))
    assert tuple(runner.x.shape) == (3, 5) and len(runner.precond.engine.blocks) == 2 * 8 + 4


def test_json_records_each_configuration_s_buffers_and_the_peak_resident_set(tmp_path, capsys):
    """The K-FAC row's buffers are those of ResNet-8's layers, written out from their shapes
    (one rank: every block owned here): each convolution a pair of ``(C_in k_h k_w)^2`` and
    ``C_out^2`` factors, each BatchNorm a 2x2 Fisher per channel, the head a pair of
    ``(d_in + 1)^2`` and ``d_out^2``; packed statistics hold upper triangles, inverses whole
    matrices, all float32."""
    out = tmp_path / "step.json"
    argv = ["--steps", "2", "--warmup", "0", "--batch", "4", "--depth", "8", "--width", "4",
            "--configs", "sgd,kfac_1_10", "--json", str(out)]
    assert step.main(argv) == 0
    result = json.loads(out.read_text())
    rows = {r["config"]: r for r in result["results"]}
    stats = grads = invs = blocks = 0
    for module in step.resnet(depth=8, width=4).modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            if isinstance(module, torch.nn.Conv2d):
                d_a, d_g = module.in_channels * module.kernel_size[0] * module.kernel_size[1], module.out_channels
            else:
                d_a, d_g = module.in_features, module.out_features
            d_a += module.bias is not None
            stats += d_a * (d_a + 1) // 2 + d_g * (d_g + 1) // 2
            grads, invs = grads + d_g * d_a, invs + d_a ** 2 + d_g ** 2
        elif isinstance(module, torch.nn.BatchNorm2d):
            c = module.num_features
            stats, grads, invs = stats + 3 * c, grads + 2 * c, invs + 4 * c
        else:
            continue
        blocks += 1
    want = {"local_statistics": 4 * stats, "send_buffers": 4 * (stats + blocks + 2 * grads), "received": 0,
            "running_factors": 4 * stats, "inverses": 4 * invs, "gathered": 4 * (grads + 2), "results": 0}
    assert rows["kfac_1_10"]["state_bytes"] == want
    assert rows["kfac_1_10"]["state_mib"] == sum(want.values()) / 2**20
    assert "state_bytes" not in rows["sgd"]
    peaks = result["config"]["peak_rss_bytes"]
    assert len(peaks) == 1 and peaks[0] > 2**20 and "peak_device_bytes" not in result["config"]
    text = capsys.readouterr().out
    assert "peak resident set per rank" in text and "K-FAC buffers per rank, MiB" in text


@pytest.mark.parametrize("argv,message", [
    (["--threads", "100000"], "--threads must be in \\[0, "), (["--threads", "-1"], "--threads must be in"),
    (["--warmup", "-5"], "--warmup must be >= 0"), (["--steps", "0"], "--steps and --batch must be positive"),
    (["--model", "transformer", "--width", "10"], "--width a multiple of 4"),
    (["--model", "transformer", "--seq", "129"], "--seq in \\[1, 128\\]"),
    (["--model", "transformer", "--statistics-fraction", "1.5"], "--statistics-fraction must be in"),
    (["--statistics-fraction", "0"], "--statistics-fraction must be in \\(0, 1\\], got 0.0"),
    (["--configs", "sgd,adam"], "invalid --configs \\['adam'\\]"), (["--batch", "0"], "--steps and --batch must be positive"),
    (["--image", "0"], "--image must be positive, got 0"), (["--width", "0"], "--width must be positive, got 0"),
    (["--profile-steps", "0"], "--profile-steps must be positive"),
    (["--depth", "10"], "--depth must be 6n\\+2 with n >= 1"), (["--depth", "2"], "--depth must be 6n\\+2 with n >= 1"),
    (["--model", "transformer", "--depth", "0"], "needs --depth >= 1"),
    # One example of 4x4 pixels: ResNet's last stage (4x smaller) has one value per channel.
    (["--batch", "1", "--image", "4"], "--batch 1 with --image 4 leaves BatchNorm one value per channel"),
    (["--model", "resnet50", "--batch", "1", "--image", "32"], "leaves BatchNorm one value per channel"),
])
def test_bad_arguments_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        step.parse(argv)
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_batchnorm_check_counts_the_last_stage_s_map_rounded_up():
    # Strided 3x3 convolutions padded by 1 give ceil(h / 2): a 5x5 image ends on a 2x2 map in
    # ResNet's last stage, a 33x33 one on 2x2 in ResNet-50's; one example then suffices.
    assert step.parse(["--batch", "1", "--image", "5"]).image == 5
    assert step.parse(["--model", "resnet50", "--batch", "1", "--image", "33"]).image == 33


def one_sgd_step_on_one_thread(out):
    """The JSON of one timed SGD step of a tiny ResNet under ``--threads 1``, written to ``out``;
    torch's pool is set back afterwards, so that the tests that follow keep theirs."""
    before = torch.get_num_threads()
    try:
        assert step.main(["--steps", "1", "--warmup", "0", "--batch", "2", "--depth", "8", "--width", "2",
                          "--configs", "sgd", "--threads", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    return json.loads(out.read_text())


def test_json_records_the_threads_and_ranks_it_ran_with(tmp_path, monkeypatch, capsys):
    """``--threads 0`` (the default) leaves the pool as the process set it: the JSON must say
    what that was, with the thread variables, the job's ranks and the cores they had; the
    table's second line says whether the threads outnumbered the cores."""
    import os

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = one_sgd_step_on_one_thread(tmp_path / "step.json")
    environment, config = result["environment"], result["config"]
    assert environment["ranks"] == 1
    cores = len(os.sched_getaffinity(0))
    assert config["ranks"] == 1 and config["host_cpus"] == [cores] and config["threads_per_rank"] == [1]
    assert config["hosts"] == [environment["host"]]
    assert capsys.readouterr().out.splitlines()[1] == "torch threads per rank: 1; no host oversubscribed at P=1"
    assert environment["threads"]["torch"] == 1 and environment["threads"]["variables"] == {"OMP_NUM_THREADS": "1"}
    assert all(isinstance(n, int) and n >= 1 for n in environment["threads"]["blas"].values())


def test_threads_option_outlasts_the_automatic_division(tmp_path, monkeypatch):
    """``--threads T`` with no thread variable set: the Communicator the benchmark makes sizes
    torch's pool for the rank (``hpckfac.threads``), and T must still be what the steps ran with."""
    from threadpoolctl import threadpool_limits

    from hpckfac import threads as pools

    for name in pools.USER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(pools, "_done", {})
    monkeypatch.setattr(pools, "rank_cores", lambda mine, node: 2)  # the division would give 2
    with threadpool_limits():
        result = one_sgd_step_on_one_thread(tmp_path / "step.json")
    assert result["config"]["threads_per_rank"] == [1] and result["environment"]["threads"]["torch"] == 1


def script_step_times(monkeypatch: pytest.MonkeyPatch, configs: int, seconds: Callable[[int, int], float]) -> None:
    """Every timed step of configuration ``c`` (its index among the ``configs`` run) at step ``k``
    takes ``seconds(c, k)``, its forward/backward a quarter of that; the step itself still runs."""
    calls = iter(range(10**6))

    def scripted(fn, repeat, warmup, barrier):
        fn()
        k = next(calls)
        took = seconds(k % configs, k // configs)
        fn.__self__.fb = took / 4
        return [took]

    monkeypatch.setattr(step, "time_calls", scripted)


def test_means_cover_whole_update_periods(tmp_path, monkeypatch, capsys):
    """12 steps of 1/10: its mean and stages are those of the first 10 (one inversion in ten steps),
    SGD's mean for the ratio over the same 10; 10/100 has no whole period in 12 steps, and says so.
    SGD slows down in the last two steps, so that its means over 10 and 12 steps and its median differ."""
    # SGD 1 ms a step, 4 ms from step 10 on; K-FAC 10 ms on an update step, else 2 ms.
    script_step_times(monkeypatch, 3, lambda config, k: (1e-3 if k < 10 else 4e-3) if config == 0
                      else 1e-2 if k % 10 == 0 else 2e-3)
    out = tmp_path / "step.json"
    assert step.main(["--steps", "12", "--warmup", "0", "--batch", "2", "--depth", "8", "--width", "2",
                      "--json", str(out)]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    sgd_ms = [1.0] * 10 + [4.0] * 2
    kfac_ms = [10.0 if k % 10 == 0 else 2.0 for k in range(12)]
    sgd = rows["sgd"]
    assert (sgd["period"], sgd["mean_steps"]) == (1, 12) and sgd["mean_ms"] == pytest.approx(sum(sgd_ms) / 12)
    assert sgd["median_ms"] == pytest.approx(1.0) and sgd["forward_backward_ms"] == pytest.approx(sum(sgd_ms) / 48)
    kfac = rows["kfac_1_10"]
    assert (kfac["period"], kfac["mean_steps"]) == (10, 10)
    assert kfac["mean_ms"] == pytest.approx(sum(kfac_ms[:10]) / 10)
    assert kfac["mean_vs_sgd"] == pytest.approx(sum(kfac_ms[:10]) / sum(sgd_ms[:10]))
    assert kfac["forward_backward_ms"] == pytest.approx(sum(kfac_ms[:10]) / 40)
    assert kfac["median_ms"] == pytest.approx(2.0) and kfac["median_vs_sgd"] == pytest.approx(2.0 / 1.0)
    lazy = rows["kfac_10_100"]
    assert (lazy["period"], lazy["mean_steps"]) == (100, 12)
    assert lazy["mean_vs_sgd"] == pytest.approx(sum(kfac_ms) / sum(sgd_ms))
    text = capsys.readouterr().out
    assert "kfac_10_100: --steps 12 is under one update period (100 steps)" in text
    assert "kfac_1_10: --steps" not in text  # a whole period, exactly


def test_a_step_takes_the_slowest_rank_s_time_and_the_buffers_the_largest_rank_s(tmp_path, monkeypatch):
    """A second rank, faked: slower than this one on odd steps, faster on even ones, and holding
    twice this rank's inverses and nothing else. Each step's time is the slower rank's; each
    kind of buffer the larger rank's, the total that of the rank holding most in all."""
    mine = [1e-3, 2e-3, 3e-3, 4e-3]
    other = [0.5 * t if k % 2 == 0 else 1.5 * t for k, t in enumerate(mine)]

    class TwoRanks(step.Communicator):
        def allgather_object(self, obj, what=None):
            everyone = super().allgather_object(obj, what)
            if what is None and isinstance(obj, list) and len(obj) == len(mine):  # a configuration's step times
                return everyone + [other]
            if what is None and isinstance(obj, dict):  # a preconditioner's buffers
                return everyone + [{k: 2 * v if k == "inverses" else 0 for k, v in obj.items()}]
            return everyone

    script_step_times(monkeypatch, 2, lambda config, k: mine[k])
    monkeypatch.setattr(step, "Communicator", TwoRanks)
    out = tmp_path / "step.json"
    assert step.main(["--steps", "4", "--warmup", "0", "--batch", "2", "--depth", "8", "--width", "2",
                      "--configs", "sgd,kfac_1_10", "--json", str(out)]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    slowest = [max(a, b) for a, b in zip(mine, other)]  # 1, 3, 3, 6 ms
    assert rows["sgd"]["mean_ms"] == pytest.approx(1e3 * sum(slowest) / 4)
    assert rows["sgd"]["median_ms"] == pytest.approx(3.0)
    held = rows["kfac_1_10"]["state_bytes"]
    inverses = held["inverses"] / 2  # this rank's; the other holds twice as many
    this_rank = sum(held.values()) - held["inverses"] + inverses
    assert rows["kfac_1_10"]["state_mib"] == pytest.approx(max(this_rank, 2 * inverses) / 2**20)


@pytest.mark.parametrize("keep", [True, False], ids=["acc_events_if_known", "without_acc_events"])
def test_profile_counts_every_operator_call_with_and_without_acc_events(monkeypatch, keep):
    """The operator table counts each call of every profiled step, whether or not ``acc_events``
    is passed: torch before 2.5 has no such option, and the profile is taken without it."""
    if not keep:
        monkeypatch.setattr(profile, "_KEEP_EVENTS", {})
    a = torch.randn(8, 8)

    def one_step():
        for _ in range(3):
            torch.mm(a, a)

    report = profile.profile_steps(one_step, 2, cuda=False, sync=lambda: None)
    rows = [line.split() for line in report.splitlines() if line.split()[:1] == ["aten::mm"]]
    assert len(rows) == 1 and rows[0][-1] == "6"  # 2 steps of 3 products


def test_profile_reports_the_profiled_time_per_step_and_runs_each_profiler_over_every_step(monkeypatch):
    """A clock that only the steps move, 0.2 s a step: 3 profiled steps report 200.0 ms a step;
    the step runs 3 times under each profiler, and cProfile's second table keeps hpckfac's functions."""
    from hpckfac.tables import format_table

    clock, calls = [100.0], []

    def one_step():
        calls.append(1)
        clock[0] += 0.2
        format_table([{"a": 1.0}], ["a"])

    monkeypatch.setattr(profile.time, "perf_counter", lambda: clock[0])
    report = profile.profile_steps(one_step, 3, cuda=False, sync=lambda: None)
    assert report.splitlines()[0] == "torch.profiler, 3 steps: 200.0 ms per step (profiled)"
    assert len(calls) == 2 * 3 and "cProfile, 3 steps" in report
    assert "due to restriction <'hpckfac'>" in report and "tables.py" in report.split("<'hpckfac'>")[-1]


def test_the_profile_leaves_acc_events_out_on_a_torch_without_it(monkeypatch):
    """Where ``torch.profiler.profile`` takes no ``acc_events`` (torch before 2.5) the module does
    not pass it, and the operator table still counts every call of every profiled step."""
    class OldProfile(torch.profiler.profile):
        def __init__(self, *, activities=None):  # the keywords profile_steps needs, acc_events not among them
            super().__init__(activities=activities)

    monkeypatch.setattr(torch.profiler, "profile", OldProfile)
    try:
        old = importlib.reload(profile)
        a = torch.randn(8, 8)

        def one_step():
            for _ in range(3):
                torch.mm(a, a)

        report = old.profile_steps(one_step, 2, cuda=False, sync=lambda: None)
    finally:
        monkeypatch.undo()
        importlib.reload(profile)
    rows = [line.split() for line in report.splitlines() if line.split()[:1] == ["aten::mm"]]
    assert len(rows) == 1 and rows[0][-1] == "6"  # 2 steps of 3 products
