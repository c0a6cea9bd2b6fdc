"""End-to-end tests of ``hpckfac train``: real processes at 1 and 2 ranks, the JSON log
and PNG plot, resume equal to an uninterrupted run, and one-line errors for bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_multirank import mpiexec

PNG = b"\x89PNG\r\n\x1a\n"
RECORD_KEYS = {"step", "epoch", "loss", "train_acc", "test_loss", "test_acc", "wall", "lr"}
# Other libraries' notices off, so that stderr holds hpckfac's lines: torch before 2.2 imports
# transformers, where installed, at its first optimizer (through torch.onnx), and transformers 5
# then prints two lines about that torch being too old for it.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")


def train(args, ranks=None, timeout=300, cwd=None):
    """Run ``hpckfac train args`` (under ``mpiexec -n ranks`` if given)."""
    cmd = [sys.executable, "-m", "hpckfac", "train", *map(str, args)]
    if ranks is not None:
        cmd = [*mpiexec(), "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)


def checkpoint(out, step):
    return torch.load(os.path.join(out, "checkpoints", f"step_{step:08d}.pt"), weights_only=True)


@pytest.fixture(scope="module")
def kfac_run(tmp_path_factory):
    """K-FAC at 2 ranks, 8 steps, checkpoints at 4 and 8."""
    out = str(tmp_path_factory.mktemp("kfac2"))
    proc = train(["--optimizer", "kfac", "--batch-size", 64, "--steps", 8, "--eval-every", 2,
                  "--checkpoint-every", 4, "--warmup-steps", 2, "--out", out, "--seed", 3], ranks=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_two_ranks_kfac_end_to_end(kfac_run):
    out, proc = kfac_run
    log = json.load(open(os.path.join(out, "log.json")))
    assert log["ranks"] == 2 and log["config"]["optimizer"] == "kfac" and log["dataset"] == "digits"
    steps = [r["step"] for r in log["records"]]
    assert steps == [2, 4, 6, 8]
    walls = [r["wall"] for r in log["records"]]
    assert all(b > a for a, b in zip(walls, walls[1:]))
    for record in log["records"]:
        assert set(record) == RECORD_KEYS
        assert 0 <= record["test_acc"] <= 1 and np.isfinite(record["loss"]) and record["lr"] > 0
    lines = [json.loads(line) for line in open(os.path.join(out, "records.jsonl"))]
    assert lines == log["records"]
    assert log["summary"]["steps"] == 8 and log["summary"]["best_test_acc"] >= log["summary"]["test_acc"]
    assert set(log["stages_ms"]) >= {"reduce_scatter", "inversion", "write_grads"}
    assert open(os.path.join(out, "training.png"), "rb").read(8) == PNG
    assert "test accuracy" in proc.stdout and "reduce_scatter" in proc.stdout  # summary + per-stage table
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_rank_first_order_end_to_end(tmp_path, optimizer):
    proc = train(["--optimizer", optimizer, "--batch-size", 32, "--steps", 5, "--eval-every", 2,
                  "--out", tmp_path], ranks=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.load(open(tmp_path / "log.json"))["records"]
    assert [r["step"] for r in records] == [2, 4, 5]  # the last step is always evaluated
    assert (tmp_path / "training.png").read_bytes()[:8] == PNG


def test_resume_continues_the_same_trajectory(kfac_run, tmp_path):
    out, _ = kfac_run
    resumed = str(tmp_path / "resumed")
    proc = train(["--optimizer", "kfac", "--batch-size", 64, "--steps", 8, "--eval-every", 2,
                  "--checkpoint-every", 4, "--warmup-steps", 2, "--out", resumed, "--seed", 3,
                  "--resume", os.path.join(out, "checkpoints", "step_00000004.pt")], ranks=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    whole, rerun = checkpoint(out, 8), checkpoint(resumed, 8)
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, rerun["model"][name]), name
    for a, b in zip(whole["optimizer"]["state"].values(), rerun["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert whole["preconditioner"]["steps"] == rerun["preconditioner"]["steps"] == 8
    for name, block in whole["preconditioner"]["blocks"].items():
        assert torch.equal(block["factors"], rerun["preconditioner"]["blocks"][name]["factors"]), name
    drop_wall = lambda records: [{k: v for k, v in r.items() if k != "wall"} for r in records]
    assert drop_wall(json.load(open(os.path.join(resumed, "log.json")))["records"]) == \
        drop_wall(json.load(open(os.path.join(out, "log.json")))["records"])
    # The resumed run's records.jsonl holds the history up to the checkpoint, then its own records.
    assert drop_wall([json.loads(line) for line in open(os.path.join(resumed, "records.jsonl"))]) == \
        drop_wall(json.load(open(os.path.join(out, "log.json")))["records"])


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case, message", [
    ("optimizer", "argument --optimizer: invalid choice: 'lbfgs'"),
    ("batch", "--batch-size: expected an integer >= 1"),
    ("too_big", "--batch-size: expected 1..1438"),
    ("lr", "--lr: expected a finite real number > 0"),
    ("both_lengths", "not allowed with argument"),
    ("no_out", "--checkpoint-every: needs --out"),
    ("missing_data", "data file not found"),
    ("bad_shape", "'x' must be a non-empty numeric array of shape (N, H, W)"),
    ("bad_labels", "'y' must be an integer array of shape (10,)"),
    ("corrupt", "is corrupt or unreadable"),
    ("mismatch", "does not match this run: optimizer is 'kfac' there, 'sgd' here"),
    ("no_checkpoint", "no checkpoint file or directory"),
    ("huge_width", "--width: 100000 needs at least"),
    ("huge_seed", "--seed: expected an integer in [0, 2**64)"),
    ("huge_lr", "--lr: expected a finite real number > 0.0 and <= 3.40"),
    ("huge_weight_decay", "--weight-decay: expected a finite real number >= 0.0 and <= 3.40"),
    # Hand-edited checkpoints: a setting of the wrong type, torch's RNG state of another length.
    ("edited_data", "--data: expected a path, got 7"),
    ("edited_rng", "does not fit this run (Expected "),  # then torch's own words, which differ by version
    ("edited_history", "is corrupt: history record"),
    ("stop_signal", "--stop-signals: SIGKILL cannot be caught"),
])
def test_bad_arguments_one_line_error_no_traceback(case, message, tmp_path, kfac_run):
    base = ["--steps", 2, "--batch-size", 32, "--no-progress"]
    args = {
        "optimizer": ["--optimizer", "lbfgs"],
        "batch": base + ["--batch-size", 0],
        "too_big": base + ["--batch-size", 5000],
        "lr": base + ["--lr", -1],
        "both_lengths": base + ["--epochs", 2],
        "no_out": base + ["--checkpoint-every", 1],
        "missing_data": base + ["--data", tmp_path / "nope.npz"],
        "bad_shape": base + ["--data", _write(tmp_path / "a.npz", x=np.zeros((10, 64)), y=np.zeros(10, int))],
        "bad_labels": base + ["--data", _write(tmp_path / "b.npz", x=np.zeros((10, 8, 8)), y=np.zeros(9, int))],
        "corrupt": base + ["--resume", tmp_path],
        "mismatch": ["--optimizer", "sgd", "--batch-size", 64, "--steps", 8, "--seed", 3, "--resume", kfac_run[0]],
        "no_checkpoint": base + ["--resume", tmp_path / "missing"],
        "huge_width": base + ["--width", 100000],
        "huge_seed": base + ["--seed", 2**70],
        "huge_lr": base + ["--lr", 1e300],
        "huge_weight_decay": base + ["--optimizer", "sgd", "--weight-decay", 1e300],
        "stop_signal": base + ["--stop-signals", "USR1,KILL"],
        "edited_data": ["--resume", tmp_path / "step_00000004.pt", "--out", tmp_path / "out", "--no-progress"],
        "edited_rng": ["--resume", tmp_path / "step_00000004.pt", "--out", tmp_path / "out", "--no-progress"],
        "edited_history": ["--resume", tmp_path / "step_00000004.pt", "--out", tmp_path / "out", "--no-progress"],
    }[case]
    if case == "corrupt":
        (tmp_path / "step_00000002.pt").write_bytes(os.urandom(3000))
    if case.startswith("edited"):
        state = checkpoint(kfac_run[0], 4)
        if case == "edited_data":
            state["config"]["data"] = 7
        elif case == "edited_history":  # the run read it back at its end: a KeyError then, status 1
            del state["history"][-1]["test_acc"]
        else:
            state["torch_rng"] = state["torch_rng"][:100].clone()
        torch.save(state, tmp_path / "step_00000004.pt")
    proc = train(args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpckfac train: error: ") and message in lines[0], proc.stderr


def test_batch_that_does_not_split_over_ranks():
    proc = train(["--batch-size", 33, "--steps", 2, "--no-progress"], ranks=2)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines == ["hpckfac train: error: --batch-size: global batch 33 does not split evenly over 2 ranks"], \
        proc.stderr


@pytest.mark.parametrize("ranks, extra", [(3, []), (None, ["--checkpoint-every", 2])], ids=["3 ranks", "1 rank"])
@pytest.mark.parametrize("damage", ["none", "corrupt"])
def test_resume_alone_without_a_readable_checkpoint_names_it_at_any_rank_count(tmp_path, damage, ranks, extra):
    """``--resume DIR`` alone takes the run's settings from its checkpoint; with none readable
    the defaults stay in their place, and the default global batch of 128 does not split over
    3 ranks, nor has --checkpoint-every the --out it would have taken: the error must name the
    checkpoint, not that batch or --out."""
    if damage == "corrupt":
        (tmp_path / "step_00000002.pt").write_bytes(os.urandom(3000))
    proc = train(["--resume", tmp_path, "--no-progress", *extra], ranks=ranks)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    expected = ("is corrupt or unreadable" if damage == "corrupt"
                else f"--resume: no step_*.pt checkpoint in {tmp_path} or {tmp_path / 'checkpoints'}")
    assert len(lines) == 1 and lines[0].startswith("hpckfac train: error: ") and expected in lines[0], proc.stderr


def test_bad_log_level_is_one_warning():
    """(A model too large for memory is refused up front: ``huge_width`` above.)"""
    proc = subprocess.run([sys.executable, "-m", "hpckfac", "train", "--steps", "1", "--batch-size", "32",
                           "--no-progress"], capture_output=True, text=True, timeout=300,
                          env=dict(ENV, HPCKFAC_LOG_LEVEL="LOUD"))
    assert proc.returncode == 0 and "HPCKFAC_LOG_LEVEL='LOUD' is not a level" in proc.stderr


def test_resume_takes_the_runs_own_settings_and_says_when_it_is_finished(tmp_path):
    _write(tmp_path / "mine.npz", x=np.random.default_rng(0).standard_normal((200, 8, 8)),
           y=np.random.default_rng(1).integers(0, 10, 200))
    out = tmp_path / "run"
    # Relative paths, and the resumed run started from another directory: it goes on in the run's own.
    proc = train(["--data", "mine.npz", "--steps", 6, "--batch-size", 32, "--checkpoint-every", 3, "--out", "run",
                  "--no-progress", "--seed", 4], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    whole = checkpoint(out, 6)
    os.remove(os.path.join(out, "checkpoints", "step_00000006.pt"))
    (tmp_path / "elsewhere").mkdir()
    proc = train(["--resume", "../run", "--no-progress"], cwd=tmp_path / "elsewhere")  # data, steps, batch: the run's
    assert os.listdir(tmp_path / "elsewhere") == []
    assert proc.returncode == 0, proc.stderr
    assert "kfac on mine.npz" in proc.stdout and "6 steps" in proc.stdout
    resumed = checkpoint(out, 6)
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    proc = train(["--resume", out, "--no-progress"])
    assert proc.returncode == 0 and "already finished (step 6 of 6); nothing to train" in proc.stdout
    proc = train(["--resume", out, "--no-progress", "--steps", 9])  # an explicit setting still wins
    assert proc.returncode == 2 and "total_steps is 6 there, 9 here" in proc.stderr


def test_resuming_a_finished_run_writes_the_log_and_plot_it_stopped_before(tmp_path):
    # A run ended after its last checkpoint, before log.json and training.png: resuming it writes them.
    out = tmp_path / "run"
    proc = train(["--optimizer", "sgd", "--steps", 4, "--eval-every", 2, "--batch-size", 32, "--checkpoint-every", 4,
                  "--out", out, "--no-progress", "--stop-signals", "USR1"])
    assert proc.returncode == 0, proc.stderr
    log = json.loads((out / "log.json").read_text())
    (out / "log.json").unlink()
    (out / "training.png").unlink()
    proc = train(["--resume", out, "--no-progress"])
    assert proc.returncode == 0 and "already finished (step 4 of 4)" in proc.stdout, proc.stderr
    assert f"wrote {out / 'log.json'}, {out / 'training.png'}" in proc.stdout
    resumed = json.loads((out / "log.json").read_text())
    assert resumed["records"] == log["records"] and resumed["summary"] == log["summary"]
    # The signals are the resumed job's own setting (its batch system's), not taken from the checkpoint.
    assert log["config"]["stop_signals"] == "USR1" and resumed["config"]["stop_signals"] == "TERM,USR1"
    assert (out / "training.png").read_bytes()[:8] == PNG
    proc = train(["--resume", out, "--no-progress"])  # both there: left as they are
    assert proc.returncode == 0 and "wrote" not in proc.stdout


def test_a_kfac_log_written_on_resuming_a_finished_run_has_no_stage_times(tmp_path):
    # The resumed process takes no step: stages_ms is empty (docs/training.md), not every stage at 0 ms.
    from hpckfac.stages.engine import ITERATION_STAGES

    out = tmp_path / "run"
    proc = train(["--steps", 4, "--batch-size", 32, "--checkpoint-every", 4, "--out", out, "--no-progress",
                  "--seed", 5])
    assert proc.returncode == 0, proc.stderr
    log = json.loads((out / "log.json").read_text())
    assert set(log["stages_ms"]) == set(ITERATION_STAGES) and sum(log["stages_ms"].values()) > 0
    (out / "log.json").unlink()
    proc = train(["--resume", out, "--no-progress"])
    assert proc.returncode == 0 and f"wrote {out / 'log.json'}" in proc.stdout, proc.stderr
    resumed = json.loads((out / "log.json").read_text())
    assert resumed["stages_ms"] == {}
    assert resumed["records"] == log["records"] and resumed["summary"] == log["summary"]


def test_plain_progress_lines_divergence_advice_and_a_final_lr_of_zero(tmp_path):
    # Not on a terminal: one plain line per evaluation, no carriage returns, no "test=nan".
    proc = train(["--optimizer", "sgd", "--steps", 6, "--eval-every", 2, "--batch-size", 32, "--out", tmp_path / "a"])
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sgd step ")]
    assert [line.split(":")[0] for line in lines] == ["sgd step 2/6", "sgd step 4/6", "sgd step 6/6"]
    assert "\r" not in proc.stderr and "nan" not in proc.stderr
    # SGD that diverges is told to lower the learning rate, not to raise a damping it does not have.
    proc = train(["--optimizer", "sgd", "--steps", 6, "--lr", 1e6, "--batch-size", 32, "--no-progress"])
    assert proc.returncode == 1 and "training diverged" in proc.stderr
    assert "a smaller --lr" in proc.stderr and "damping" not in proc.stderr
    # A decay that reaches a learning rate of (almost) 0 at the last step: the KL clip copes and the
    # final checkpoint is written.
    out = tmp_path / "b"
    proc = train(["--optimizer", "kfac", "--steps", 6, "--decay-power", 120, "--batch-size", 32,
                  "--checkpoint-every", 6, "--no-progress", "--out", out])
    assert proc.returncode == 0, proc.stderr
    assert (out / "checkpoints" / "step_00000006.pt").exists()


def test_progress_modes_under_mpiexec():
    """mpiexec's output is never a terminal: ``auto`` prints lines, ``--progress bar`` draws the
    bar anyway (rank 0 only), ``none`` and ``--no-progress`` print neither."""
    base = ["--optimizer", "sgd", "--steps", 4, "--eval-every", 2, "--batch-size", 32]
    seen = {}
    for flags in (["--progress", "auto"], ["--progress", "bar"], ["--progress", "lines"], ["--progress", "none"],
                  ["--no-progress"]):
        proc = train(base + flags, ranks=2)
        assert proc.returncode == 0, proc.stderr
        seen[" ".join(flags)] = (proc.stderr.count("sgd step "), "4/4 [" in proc.stderr)
    assert seen == {"--progress auto": (2, False), "--progress bar": (0, True), "--progress lines": (2, False),
                    "--progress none": (0, False), "--no-progress": (0, False)}
    proc = train(base + ["--progress", "loud"])
    assert proc.returncode == 2 and "--progress" in proc.stderr


def test_progress_setting_of_the_python_api():
    from hpckfac.train.config import TrainConfig

    assert TrainConfig(progress=False).validate().progress == "none"
    assert TrainConfig(progress=True).validate().progress == "auto"
    with pytest.raises(ValueError, match="progress"):
        TrainConfig(progress="loud").validate()


def test_an_error_names_a_setting_as_its_option_and_nothing_else():
    from hpckfac.train.cli import _cli_message
    from hpckfac.train.data import DataError

    assert _cli_message(ValueError("batch_size: expected 1..1438\nsecond line")) == "--batch-size: expected 1..1438"
    # A path or any other word before a colon is no setting.
    assert _cli_message(DataError("/data/x.npz: 'x' contains NaN")) == "/data/x.npz: 'x' contains NaN"
    assert _cli_message(ValueError("data order: checkpoint has seed=4")) == "data order: checkpoint has seed=4"
    assert _cli_message(KeyError()) == "KeyError"


def test_resume_takes_every_setting_of_the_checkpoint_but_explicit_and_local_ones(tmp_path, monkeypatch):
    """Without --out the run goes on in the folder above its checkpoints, wherever it was first
    written; the machine's own settings (progress, device, stop signals) are never the checkpoint's."""
    from hpckfac.train import checkpoint as ckpt
    from hpckfac.train import cli
    from hpckfac.train.config import TrainConfig

    saved = TrainConfig(optimizer="sgd", batch_size=32, steps=40, seed=5, lr=0.2, out="/moved/run", data="/d.npz",
                        progress="lines", device="cpu", stop_signals="none", resume="/old").as_dict()
    found = str(tmp_path / "run" / "checkpoints" / "step_00000004.pt")
    monkeypatch.setattr(ckpt, "find_checkpoint", lambda path: found)
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda path: {"config": saved})
    local = ("resume", "progress", "device", "stop_signals")
    for argv, out in ((["--resume", "x", "--seed", "9"], str(tmp_path / "run")), (["--resume", "x", "--out", "o"], None)):
        settings = vars(cli.build_parser().parse_args(argv))
        resumed, unreadable = cli._resumed_settings("x", cli._explicit(argv), settings)
        explicit = {"--seed": "seed", "--out": "out"}[argv[2]]
        want = {k: v for k, v in saved.items() if k not in local and k != explicit and k != "out"}
        assert unreadable is None and resumed == (want if out is None else {**want, "out": out})
