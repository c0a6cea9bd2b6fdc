"""The scaling benchmark: bytes, efficiency, combining, and real runs under mpiexec."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hpckfac.bench import model, scaling, shapes
from hpckfac.stages.engine import ITERATION_STAGES
from hpckfac.threads import USER_VARIABLES
from test_multirank import mpiexec


def test_ring_bytes_hand_computed():
    scatter, gather = scaling.ring_bytes_sent([3, 5, 0], 4)
    assert scatter == [4 * 5, 4 * 3, 4 * 8]   # all segments but the rank's own
    assert gather == [4 * 3, 4 * 8, 4 * 5]    # all segments but the successor's
    assert scaling.ring_bytes_sent([7], 8) == ([0], [0])
    # Equal segments: every rank sends (P-1)/P of the buffer, the model's volume.
    scatter, gather = scaling.ring_bytes_sent([4] * 4, 4)
    assert scatter == gather == [3 / 4 * 16 * 4] * 4


def test_bytes_sent_by_the_busiest_rank():
    """Reduce-scatter segments 2, 9, 3 and all-gather segments 1, 8, 6 (float64): the scatter's
    maximum falls on rank 0, the gather's on rank 2, so one rank's most is less than their sum."""
    from types import SimpleNamespace

    layout = SimpleNamespace(reduce_counts=lambda factors: [2, 9, 3], gather_counts=[1, 8, 6])
    it = SimpleNamespace(engine=SimpleNamespace(comm_dtype=np.float64, layout=layout), comm=SimpleNamespace(size=3),
                         reduced=[np.zeros(5), np.zeros(7)])
    scatter = [8 * (14 - 2), 8 * (14 - 9), 8 * (14 - 3)]
    gather = [8 * (15 - 8), 8 * (15 - 6), 8 * (15 - 1)]  # all but the successor's segment
    allreduce = round(2 * 2 / 3 * 8 * 12)
    assert scaling.Iteration.bytes_sent(it) == {
        "reduce_scatter": max(scatter), "all_gather": max(gather), "allreduce": allreduce,
        "rank_most": max(s + g for s, g in zip(scatter, gather)) + allreduce}
    assert max(s + g for s, g in zip(scatter, gather)) < max(scatter) + max(gather)


def test_efficiency():
    runs = [{"ranks": 1, "assignment": "lpt", "iteration": 1.0},
            {"ranks": 2, "assignment": "lpt", "iteration": 0.625},
            {"ranks": 4, "assignment": "contiguous", "iteration": 0.5}]
    runs += [{"ranks": 16, "assignment": "contiguous", "iteration": 0.2}]
    scaling.add_efficiency(runs, "strong")
    assert runs[0]["efficiency"] == 1.0 and runs[1]["efficiency"] == pytest.approx(0.8)  # T1 / (2 T2)
    # No one-rank run of that assignment: against its fewest ranks, P0 T0 / (P T_P) = 4 * 0.5 / (16 * 0.2).
    assert runs[2]["efficiency"] == 1.0 and runs[3]["efficiency"] == pytest.approx(0.625)
    assert [r["efficiency_base"] for r in runs] == [1, 1, 4, 4]
    scaling.add_efficiency(runs, "weak")
    assert runs[1]["efficiency"] == pytest.approx(1.6) and runs[3]["efficiency"] == pytest.approx(2.5)
    # The base is the fewest ranks, wherever that run is in the list.
    backwards = [dict(r) for r in reversed(runs)]
    scaling.add_efficiency(backwards, "strong")
    assert [r["efficiency"] for r in backwards] == pytest.approx([0.625, 1.0, 0.8, 1.0])
    assert [r["efficiency_base"] for r in backwards] == [4, 4, 1, 1]


def test_table_rows_count_the_most_one_rank_sends():
    run = {"assignment": "lpt", "ranks": 3, "batch_per_rank": 2, "iteration": 0.5, "imbalance": 1.25,
           "stages": dict(dict.fromkeys(ITERATION_STAGES, 0.1), local_factors=0.3),
           "bytes_sent": {"reduce_scatter": 3e6, "all_gather": 2e6, "allreduce": 1e6, "rank_most": 4.5e6}}
    row = scaling.table_rows([run])[0]
    assert row["MB_sent"] == pytest.approx(4.5) and row["iter_ms"] == pytest.approx(500.0)
    assert row["local_factors"] == f"300.0 ({100 * 0.3 / (0.3 + 0.1 * (len(ITERATION_STAGES) - 1)):.0f}%)"
    # Files written before rank_most was kept: the collectives' maxima summed.
    del run["bytes_sent"]["rank_most"]
    assert scaling.table_rows([run])[0]["MB_sent"] == pytest.approx(6.0)
    # Rows by assignment, then rank count, whatever the order of the runs.
    runs = [dict(run, assignment=a, ranks=p) for a, p in (("lpt", 4), ("contiguous", 2), ("lpt", 1), ("contiguous", 8))]
    assert [(r["assign"], r["P"]) for r in scaling.table_rows(runs)] == [
        ("contiguous", 2), ("contiguous", 8), ("lpt", 1), ("lpt", 4)]


def test_title_says_whether_the_batch_is_global_or_per_rank():
    config = {"model": "resnet50", "scale": 8, "image": 64, "mode": "weak", "batch": 4}
    assert scaling.title_of(config) == "resnet50 channels/8, 64px, weak scaling, batch 4 per rank"
    assert scaling.title_of(dict(config, mode="strong")) == "resnet50 channels/8, 64px, strong scaling, batch 4 global"


def test_measure_reduces_scripted_times_over_ranks_and_iterations(monkeypatch):
    """Times of three ranks over five iterations, scripted: per stage the median over iterations of
    the maximum over ranks (compute) or the minimum (collectives), each rank's own medians, and
    who owns what, computed here with NumPy."""
    from types import SimpleNamespace

    rng = np.random.default_rng(3)
    size, repeat = 3, 5
    scripted = [[(float(rng.uniform(1, 2)), {s: float(rng.uniform(0, 1)) for s in ITERATION_STAGES})
                 for _ in range(repeat)] for _ in range(size)]

    class Comm:
        rank = 1

        def __init__(self):
            self.size = size

        def barrier(self):
            pass

        def allgather_object(self, mine):
            assert len(mine) == repeat
            return scripted

    class Iteration:
        def __init__(self, comm, args, assignment, xp, sync):
            blocks = [SimpleNamespace(cost=lambda c=c: c) for c in (8.0, 1.0, 1.0)]
            self.batch, self.timings = 2, {}
            layout = SimpleNamespace(owned=[[0], [], [1, 2]])  # rank 1 owns nothing
            self.engine = SimpleNamespace(blocks=blocks, owners=[0, 2, 2], layout=layout)

        def clock(self):
            return 0.0

        def __call__(self):
            pass

        def bytes_sent(self):
            return {}

    monkeypatch.setattr(scaling, "Iteration", Iteration)
    monkeypatch.setattr(scaling, "placement", lambda comm: {})
    run = scaling.measure(Comm(), SimpleNamespace(warmup=0, repeat=repeat), "lpt")
    totals = np.array([[t for t, _ in rank] for rank in scripted])  # (rank, iteration)
    stage = {s: np.array([[st[s] for _, st in rank] for rank in scripted]) for s in ITERATION_STAGES}
    assert run["iteration"] == pytest.approx(np.median(totals.max(axis=0)))
    assert run["iteration_samples"] == pytest.approx(totals.max(axis=0))
    for s in ITERATION_STAGES:
        over_ranks = stage[s].max(axis=0) if s in scaling.COMPUTE else stage[s].min(axis=0)
        assert run["stages"][s] == pytest.approx(np.median(over_ranks)), s
    assert run["rank_iteration"] == pytest.approx(np.median(totals, axis=1))
    compute = sum(stage[s] for s in ("local_factors", "running_average", "inversion", "precondition", "write_grads"))
    assert run["rank_compute"] == pytest.approx(np.median(compute, axis=1))
    inversion = np.median(stage["inversion"], axis=1)
    assert run["inversion_time_imbalance"] == pytest.approx(inversion.max() / inversion.mean())
    assert run["imbalance"] == pytest.approx(8.0 / (10.0 / 3))  # loads 8, 0, 2
    assert run["owners"] == 2 and run["blocks"] == 3 and run["batch_per_rank"] == 2 and run["ranks"] == size


def test_options_validated(capsys):
    for flag, value, bound in (("--scale", "0", 1), ("--repeat", "0", 1), ("--batch", "0", 1), ("--warmup", "-1", 0)):
        with pytest.raises(SystemExit) as exit_info:
            scaling.parse([flag, value])
        assert exit_info.value.code == 2 and f"error: {flag}: expected an integer >= {bound}, got {value}" \
            in capsys.readouterr().err
    assert scaling.parse(["--warmup", "0"]).warmup == 0
    args = scaling.parse(["--mode", "strong", "--batch", "6"])
    assert args.image == 224 and args.scale == 8 and scaling.parse(["--model", "small"]).scale == 1
    with pytest.raises(ValueError, match="batch"):
        scaling.local_batch(args, 4)
    assert scaling.local_batch(args, 3) == 2
    assert scaling.local_batch(scaling.parse(["--mode", "weak", "--batch", "6"]), 4) == 6


def test_synthetic_tensors_have_layer_shapes():
    net = shapes.scaled(shapes.resnet50(64), 16)
    tensors = scaling.synthetic_tensors(net, 2, seed=0)
    for s, (x, g) in zip(net.layers, tensors):
        if isinstance(s, shapes.BatchNormShape):
            assert x.shape == g.shape == (2, s.channels, s.h, s.h)
        elif s.linear:
            assert (x.shape, g.shape) == ((2, s.c_in), (2, s.c_out))
        else:
            assert x.shape == (2, s.c_in, s.h_in, s.h_in) and g.shape == (2, s.c_out, s.h_out, s.h_out)
        assert x.dtype == np.float32 and np.std(x) > 0.5
        # The memory check's count per example is what was drawn for that layer.
        assert scaling.tensor_elements(s) == (x.size + g.size) // 2


def test_memory_check_asks_for_the_bytes_of_the_synthetic_tensors(monkeypatch):
    """Before anything is drawn, each rank is checked for room for its synthetic inputs and
    output gradients: the float32 arrays ``synthetic_tensors`` draws for its local batch."""
    asked = []
    monkeypatch.setattr(scaling, "check_memory", lambda parser, per_rank, flags: asked.append(per_rank))
    scaling.parse(["--model", "resnet50", "--scale", "16", "--image", "48", "--batch", "3"])
    net = shapes.scaled(shapes.resnet50(48), 16)
    assert asked == [sum(x.nbytes + g.nbytes for x, g in scaling.synthetic_tensors(net, 3, seed=0))]


def mpirun(ranks, *args):
    cmd = [*mpiexec(), "-n", str(ranks), sys.executable, "-m", "hpckfac.bench", "scaling", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_resnet50_runs_and_combines(tmp_path):
    common = ["--mode", "weak", "--scale", "16", "--image", "32", "--batch", "2", "--repeat", "2",
              "--batchnorm", "allreduce"]
    files = []
    for p in (1, 3):
        files.append(str(tmp_path / f"r{p}.json"))
        out = mpirun(p, *common, "--json", files[-1])
        assert "owner imbalance" in out
    one, three = (json.loads(open(f).read()) for f in files)
    table = {r["ranks"]: r for r in one["results"]["imbalance_table"]}
    assert table[1024]["lpt"] <= table[1024]["contiguous"]
    config = one["config"]
    for run in three["results"]["runs"]:
        assert set(run["stages"]) == set(ITERATION_STAGES) and run["iteration"] > 0
        # Every timed iteration inverts: inverting the owned factors (n^3 each) takes longer than
        # blending them into their running averages (n^2 each); a timer around no work would not.
        assert run["stages"]["inversion"] > run["stages"]["running_average"] > 0
        assert run["blocks"] == 54 and run["owners"] == 3
        # Most bytes a rank sends: between the even share (P-1)/P n and the whole buffer.
        work = model.stage_work(model.workload_from_config(config, 3), 3)
        assert 2 / 3 * work["reduce_scatter"] <= run["bytes_sent"]["reduce_scatter"] <= work["reduce_scatter"]
        assert run["bytes_sent"]["allreduce"] == pytest.approx(2 * 2 / 3 * work["allreduce"], abs=1)
        # One rank's total: at least the larger collective's maximum plus the allreduce, at most the
        # maxima summed (reached only where one rank sends the most in both).
        sent = run["bytes_sent"]
        assert (max(sent["reduce_scatter"], sent["all_gather"]) + sent["allreduce"] <= sent["rank_most"]
                <= sent["reduce_scatter"] + sent["all_gather"] + sent["allreduce"])
        assert run["imbalance"] >= 1.0
        # The spread behind the median: the reported time is the median of the timed iterations
        # (max over ranks each); every rank's own median is at most that (it never exceeds the max).
        assert len(run["iteration_samples"]) == 2 and run["warmup"] == 1
        assert run["iteration"] == pytest.approx(float(np.median(run["iteration_samples"])))
        assert len(run["rank_iteration"]) == len(run["hosts"]) == 3
        # One host: its cores are the union of the three ranks' CPU sets; each rank's pool as the
        # Communicator sized it (the cores split among 3 ranks, at least one thread each).
        assert run["host_cpus"] == [len(os.sched_getaffinity(0))] * 3
        if not any(v in os.environ for v in USER_VARIABLES):
            assert run["threads_per_rank"] == [max(1, len(os.sched_getaffinity(0)) // 3)] * 3
        assert max(run["rank_iteration"]) <= run["iteration"] * (1 + 1e-12)
        # A rank's compute stages are part of its iteration, in every iteration, so in the median.
        assert len(run["rank_compute"]) == 3
        assert all(0 < c <= t for c, t in zip(run["rank_compute"], run["rank_iteration"]))
    assert all(r["bytes_sent"] == {"reduce_scatter": 0, "all_gather": 0, "allreduce": 0, "rank_most": 0}
               for r in one["results"]["runs"])
    png, merged = tmp_path / "all.png", tmp_path / "all.json"
    assert scaling.main(["--combine", *files, "--json", str(merged), "--png", str(png)]) == 0
    runs = json.loads(merged.read_text())["results"]["runs"]
    assert len(runs) == 4 and all("efficiency" in r for r in runs)
    # Each merged run keeps the file it came from and that file's environment.
    for run in runs:
        source = json.loads(open(run["source"]).read())
        assert run["source"] == files[run["ranks"] != 1] and run["environment"] == source["environment"]
        assert run["environment"]["hpckfac"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    # Runs of another workload are refused.
    other = json.loads(open(files[0]).read())
    other["config"]["scale"] = 8
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="another workload"):
        scaling.main(["--combine", files[0], str(tmp_path / "other.json")])


def test_the_device_workload_equals_the_host_one():
    """``--device cuda`` runs the same iteration with every array in the device namespace: on
    the stand-in device array it must match the host run (and never convert to host memory)."""
    import standin
    from mpi4py import MPI

    from hpckfac.comm import Communicator

    args = scaling.parse(["--model", "small", "--batch", "3", "--assignment", "lpt"])
    comm = Communicator(MPI.COMM_SELF)
    host = scaling.Iteration(comm, args, "lpt")
    host()
    assert host.flags.size == 2 * len(host.blocks)  # the bridge's flags: a weight's and a bias's per block
    with standin.installed():
        device = scaling.Iteration(comm, args, "lpt", xp=standin.xp)
        device()
        assert all(isinstance(r, standin.DeviceArray) for r in device.engine.state.running)
        running = [r.get() for r in device.engine.state.running]
    assert set(device.timings) == set(ITERATION_STAGES)
    for got, want in zip(running, host.engine.state.running):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def fake_run_file(path, ranks, iteration, **config):
    """A ``bench scaling`` JSON of one lpt run at ``ranks``, as written by ``write_json``, with
    an imbalance table of its own."""
    run = {"ranks": ranks, "assignment": "lpt", "batch_per_rank": 8 // ranks, "iteration": iteration,
           "stages": dict.fromkeys(ITERATION_STAGES, iteration / len(ITERATION_STAGES)),
           "bytes_sent": {"reduce_scatter": 0, "all_gather": 0, "allreduce": 0}, "imbalance": 1.0}
    payload = {"benchmark": "scaling", "config": {"mode": "strong", "model": "small", "scale": 1, "image": 8, "batch": 8, **config},
               "environment": {"host": f"node{ranks}"},
               "results": {"runs": [run], "imbalance_table": [{"ranks": 2, "lpt": 1.0 + ranks / 10}]}}
    path.write_text(json.dumps(payload))
    return str(path)


def test_combine_refuses_duplicates_and_other_files(tmp_path, capsys):
    one = fake_run_file(tmp_path / "s1.json", 1, 0.8)
    two = fake_run_file(tmp_path / "s2.json", 2, 0.5)
    merged = tmp_path / "merged.json"
    assert scaling.main(["--combine", one, two, "--json", str(merged)]) == 0
    runs = {r["ranks"]: r for r in json.loads(merged.read_text())["results"]["runs"]}
    assert runs[2]["efficiency"] == pytest.approx(0.8 / (2 * 0.5))  # T1 / (P T_P)
    assert runs[2]["environment"] == {"host": "node2"} and runs[1]["environment"] == {"host": "node1"}
    # The imbalance table (computed, the same in every file of one workload) is the first file's.
    assert json.loads(merged.read_text())["results"]["imbalance_table"] == [{"ranks": 2, "lpt": 1.1}]
    # The same rank count twice (a file given twice, or an older run of it) would double its row.
    with pytest.raises(ValueError, match="2 ranks"):
        scaling.main(["--combine", one, two, two])
    # Not a scaling run: the performance model's JSON, a table, something else.
    other = tmp_path / "model.json"
    other.write_text(json.dumps({"benchmark": "model", "config": {}, "results": {"predictions": {}}}))
    with pytest.raises(ValueError, match="not the JSON of a `bench scaling` run"):
        scaling.main(["--combine", one, str(other)])
    other.write_text(json.dumps({"benchmark": "scaling", "config": {}, "results": [1, 2]}))
    with pytest.raises(ValueError, match="not the JSON of a `bench scaling` run"):
        scaling.main(["--combine", one, str(other)])
    (tmp_path / "table.txt").write_text("ranks iter_ms\n1 0.8\n")
    with pytest.raises(ValueError, match="not JSON"):
        scaling.main(["--combine", one, str(tmp_path / "table.txt")])
    # A file that is not there: named, with the system's reason, as for every other refusal.
    with pytest.raises(ValueError, match=r"combine: cannot read .*s3\.json \(No such file or directory\)"):
        scaling.main(["--combine", one, str(tmp_path / "s3.json")])


def test_table_says_what_its_columns_count(capsys):
    assert scaling.main(["--model", "small", "--repeat", "1", "--warmup", "0", "--assignment", "lpt"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("stage columns: median ms (share of the stages' sum); MB_sent:")
    assert lines[2].startswith("torch threads per rank: ")
    assert lines[3].split()[:5] == ["assign", "P", "B/rank", "iter_ms", "local_factors"]
