"""Stopping on a signal: the handler, the decision at one rank, the trainer's checkpoint and
its resume (bit for bit the uninterrupted run), and ``hpckfac train`` under mpiexec stopped by a
signal the launcher passes on to every rank (exit status 75)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from hpckfac.comm import Communicator
from hpckfac.stop import StopOnSignal, parse_signal
from hpckfac.train.config import TrainConfig, stop_signals
from hpckfac.train.loop import Trainer
from test_multirank import mpiexec
from test_train_cli import ENV, checkpoint, train


@pytest.fixture
def comm():
    return Communicator()


@pytest.mark.parametrize("spec, expected", [("USR1", signal.SIGUSR1), ("sigterm", signal.SIGTERM),
                                            (" SIGUSR2 ", signal.SIGUSR2), (int(signal.SIGUSR1), signal.SIGUSR1)])
def test_signals_by_name_or_number(spec, expected):
    assert parse_signal(spec) is expected


@pytest.mark.parametrize("spec, message", [
    ("KILL", "SIGKILL cannot be caught"), ("SIGSTOP", "SIGSTOP cannot be caught"),
    ("NOPE", "'NOPE' is not a signal on this platform"), (999, "999 is not a signal"),
    (True, "expected signal names or numbers"), (None, "expected signal names or numbers"),
])
def test_signals_that_cannot_stop_a_run_are_refused(spec, message):
    with pytest.raises(ValueError, match=f"^signals: {message}"):
        parse_signal(spec)


def test_stop_signals_setting():
    assert stop_signals("TERM, usr1,TERM") == (signal.SIGTERM, signal.SIGUSR1)
    assert stop_signals(str(int(signal.SIGUSR2))) == (signal.SIGUSR2,)
    assert stop_signals("none") == stop_signals("") == ()
    assert TrainConfig().validate().stop_signals == "TERM,USR1"
    with pytest.raises(ValueError, match="stop_signals"):  # a digit int() refuses: named, not int()'s error
        stop_signals("\u00b2")


def test_a_signal_is_noted_and_every_later_decision_is_to_stop(comm):
    before = signal.getsignal(signal.SIGUSR1)
    with StopOnSignal(comm, ["USR1"]) as stop:
        assert stop.received is None and not stop.should_stop() and stop.stopping_ranks == {}
        signal.raise_signal(signal.SIGUSR1)
        assert stop.received == "SIGUSR1"
        assert stop.should_stop() and stop.should_stop()
        assert stop.stopping_ranks == {0: "SIGUSR1"}
    assert signal.getsignal(signal.SIGUSR1) is before
    with pytest.raises(ValueError, match="^signals: expected at least one signal"):
        StopOnSignal(comm, [])


@pytest.fixture
def previous_usr2():
    """A handler of SIGUSR2 installed before the test's own, and the signals it received; the
    handler of before the test restored afterwards."""
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    old = signal.signal(signal.SIGUSR2, previous)
    try:
        yield previous, calls
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_a_second_signal_goes_to_the_handler_that_was_there_before(comm, previous_usr2):
    previous, calls = previous_usr2
    stop = StopOnSignal(comm, "USR2")
    signal.raise_signal(signal.SIGUSR2)
    assert calls == [] and stop.received == "SIGUSR2"
    signal.raise_signal(signal.SIGUSR2)
    assert calls == [signal.SIGUSR2]
    stop.close()
    assert signal.getsignal(signal.SIGUSR2) is previous
    signal.raise_signal(signal.SIGUSR2)
    assert calls == [signal.SIGUSR2] * 2 and stop.received == "SIGUSR2"


def test_handlers_closed_in_any_order_hand_signals_back_to_the_original_one(comm, previous_usr2):
    """Two StopOnSignal closed in the order they were made: the first one's handler, which the
    second restores as its previous, passes signals on to the handler that was there before
    both, instead of keeping the next signal in a closed StopOnSignal that nobody asks."""
    previous, calls = previous_usr2
    first, second = StopOnSignal(comm, "USR2"), StopOnSignal(comm, "USR2")
    first.close()
    second.close()
    signal.raise_signal(signal.SIGUSR2)
    assert calls == [signal.SIGUSR2] and first.received is None and second.received is None
    first.close()  # a second close() restores the handler of before, now that it can
    assert signal.getsignal(signal.SIGUSR2) is previous


def test_closing_an_earlier_handler_leaves_a_later_one_installed(comm, previous_usr2):
    """The first StopOnSignal closed while the second is open: the second's handler stays, and
    the next signal is the second's, not the handler of before both."""
    _, calls = previous_usr2
    first, second = StopOnSignal(comm, "USR2"), StopOnSignal(comm, "USR2")
    first.close()
    signal.raise_signal(signal.SIGUSR2)
    assert second.received == "SIGUSR2" and first.received is None and calls == []
    second.close()


@pytest.mark.parametrize("first", ["SIGTERM", "SIGUSR1"])
def test_a_sigterm_after_the_first_signal_ends_a_process_that_did_not_stop(first):
    """Slurm's SIGTERM at the limit ends a run that its earlier --signal=USR1 did not stop."""
    code = ("import signal\nfrom hpckfac.comm import Communicator\nfrom hpckfac.stop import StopOnSignal\n"
            f"stop = StopOnSignal(Communicator())\nsignal.raise_signal(signal.{first})\n"
            "print(stop.received, flush=True)\nsignal.raise_signal(signal.SIGTERM)\nprint('still here')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == -signal.SIGTERM and proc.stdout == f"{first}\n", proc.stdout + proc.stderr


def test_a_signal_ignored_before_stays_ignored_after_the_first():
    """A process started with the signal ignored (``nohup``, a launcher's setting) keeps ignoring
    it after the first one, which asks for the stop: passing the second on must not end it."""
    code = ("import signal\nfrom hpckfac.comm import Communicator\nfrom hpckfac.stop import StopOnSignal\n"
            "signal.signal(signal.SIGUSR2, signal.SIG_IGN)\nstop = StopOnSignal(Communicator(), 'USR2')\n"
            "for _ in range(3):\n    signal.raise_signal(signal.SIGUSR2)\n"
            "print(stop.received, stop.should_stop(), flush=True)\nstop.close()\n"
            "print(signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0 and proc.stdout == "SIGUSR2 True\nTrue\n", proc.stdout + proc.stderr


def test_only_the_main_thread_can_install_handlers(comm):
    errors = []

    def make():
        try:
            StopOnSignal(comm)
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    assert errors and "main thread" in errors[0]


def signal_in_step(trainer, number, monkeypatch):
    """SIGUSR1 to this process at the end of ``trainer``'s step ``number`` (counted from 1)."""
    step = trainer.train_step

    def signalled():
        result = step()
        if trainer.step == number:
            signal.raise_signal(signal.SIGUSR1)
        return result

    monkeypatch.setattr(trainer, "train_step", signalled)


def test_the_trainer_stops_after_the_signalled_step_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """A signal during step 5 of 9: the run stops after step 5 with a checkpoint there (not on
    the checkpoint schedule), its log names the signal, and resuming ends with the weights of
    the run that was never stopped, bit for bit."""
    base = dict(optimizer="kfac", batch_size=32, steps=9, eval_every=4, warmup_steps=2, seed=5, progress="none",
                factor_update_interval=2, inverse_update_interval=4, stop_signals="USR1")
    whole = Trainer(TrainConfig(**base)).run()
    before = signal.getsignal(signal.SIGUSR1)
    trainer = Trainer(TrainConfig(**base, out=str(tmp_path)))
    signal_in_step(trainer, 5, monkeypatch)
    trainer.run()
    assert trainer.step == 5 and trainer.stopped_by == {0: "SIGUSR1"}
    assert signal.getsignal(signal.SIGUSR1) is before
    log = json.load(open(tmp_path / "log.json"))
    assert log["summary"]["stopped_by"] == {"0": "SIGUSR1"} and log["summary"]["steps"] == 5
    assert [r["step"] for r in log["records"]] == [4, 5]
    assert os.listdir(tmp_path / "checkpoints") == ["step_00000005.pt"]
    resumed = Trainer(TrainConfig(**base, out=str(tmp_path), resume=str(tmp_path))).run()
    assert resumed.summary["steps"] == 9 and resumed.summary["stopped_by"] == {}
    # The stopped run's records.jsonl held steps 4 and 5: the resumed one has each record once.
    assert [json.loads(line) for line in open(tmp_path / "records.jsonl")] == resumed.records
    assert [r["step"] for r in resumed.records] == [4, 5, 8, 9]
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert whole.records[-1]["test_acc"] == resumed.records[-1]["test_acc"]


def test_train_under_mpiexec_stops_on_a_forwarded_signal_and_resumes(tmp_path):
    """SIGUSR1 to mpiexec reaches both ranks (MPICH and Open MPI pass it on): they stop after the
    same step, checkpoint, say how to go on and exit with 75; ``--resume`` finishes the run."""
    out = tmp_path / "run"
    args = ["--batch-size", 32, "--steps", 300, "--eval-every", 5, "--progress", "lines", "--out", out, "--seed", 1]
    cmd = [*mpiexec(), "-n", "2", sys.executable, "-m", "hpckfac", "train", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 240
        while not (out / "records.jsonl").exists():  # the first evaluation: both ranks are in run()
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first evaluation"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 75, stdout + stderr
    summary = json.load(open(out / "log.json"))["summary"]
    step = summary["steps"]
    assert 5 <= step < 300 and summary["stopped_by"] == {"0": "SIGUSR1", "1": "SIGUSR1"}
    assert f"stopped after step {step} of 300 (SIGUSR1 on rank 0, SIGUSR1 on rank 1); continue with --resume {out}" \
        in stdout
    assert checkpoint(out, step)["step"] == step and "Traceback" not in stderr
    again = train(["--resume", out, "--no-progress"], ranks=2)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.load(open(out / "log.json"))["summary"]["steps"] == 300


def test_a_trainer_run_outside_the_main_thread_says_signals_stay_as_they_are(caplog):
    """Python handles signals in the main thread alone: a run in another thread trains as
    usual and says that its stop signals will not checkpoint."""
    results, before = [], signal.getsignal(signal.SIGTERM)
    config = TrainConfig(optimizer="sgd", batch_size=32, steps=2, progress="none")
    thread = threading.Thread(target=lambda: results.append(Trainer(config).run()))
    with caplog.at_level("WARNING", logger="hpckfac.train"):
        thread.start()
        thread.join()
    assert results and results[0].summary["steps"] == 2 and signal.getsignal(signal.SIGTERM) is before
    assert "stop_signals: run() is not in the main thread" in caplog.text and "SIGTERM, SIGUSR1" in caplog.text


def test_a_signal_in_the_last_step_lets_the_run_finish(monkeypatch):
    """A run that reached its last step is done: a signal in that step does not turn it into
    a stopped run (which would exit with 75 and ask to be resumed)."""
    trainer = Trainer(TrainConfig(optimizer="sgd", batch_size=32, steps=3, progress="none", stop_signals="USR1"))
    signal_in_step(trainer, 3, monkeypatch)
    result = trainer.run()
    assert trainer.step == 3 and trainer.stopped_by == {} and result.summary["stopped_by"] == {}


def test_a_run_without_out_stops_after_the_signalled_step_and_writes_nothing(tmp_path, monkeypatch):
    """Without ``out`` there is nowhere to checkpoint: a signal in step 2 of 5 still stops the run
    after that step, evaluated there, and nothing is written (the CLI then says there is no
    checkpoint to resume from)."""
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(TrainConfig(optimizer="sgd", batch_size=32, steps=5, eval_every=4, progress="none",
                                  stop_signals="USR1"))
    signal_in_step(trainer, 2, monkeypatch)
    result = trainer.run()
    assert trainer.step == 2 and result.summary["stopped_by"] == {"0": "SIGUSR1"}
    assert [r["step"] for r in result.records] == [2] and os.listdir(tmp_path) == []


SIGNAL_IN_SCRIPT = """
import os, signal, sys
from hpckfac.train import cli
from hpckfac.train.loop import Trainer

where, sig = getattr(Trainer, sys.argv[1]), signal.Signals[sys.argv[2]]


def signalled(*args, **kwargs):
    os.kill(os.getpid(), sig)  # the batch system's warning, at this point of the run
    return where(*args, **kwargs)

setattr(Trainer, sys.argv[1], signalled)
sys.exit(cli.main(sys.argv[3:]))
"""


def train_signalled_in(where: str, sig: str, args: list) -> subprocess.CompletedProcess:
    """``hpckfac train args`` in one process that sends itself ``sig`` as ``Trainer.<where>`` starts."""
    return subprocess.run([sys.executable, "-c", SIGNAL_IN_SCRIPT, where, sig, *map(str, args)], capture_output=True,
                          text=True, timeout=240, env=ENV)


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_a_signal_during_the_setup_stops_the_run_after_its_first_step(tmp_path, sig):
    """A signal while the Trainer loads its data or checkpoint, before the first step, is noted
    as any other: the run stops after one step with a checkpoint and exits with 75, where
    SIGTERM ended the process and SIGUSR1 went to MPICH's own handler (installed at MPI_Init),
    which drops it, so the run went on to be killed at the limit. Resuming it ends with the
    weights of the uninterrupted run."""
    out = tmp_path / "run"
    args = ["--optimizer", "sgd", "--batch-size", 32, "--steps", 6, "--checkpoint-every", 3, "--no-progress"]
    proc = train_signalled_in("__init__", sig, [*args, "--out", out])
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert f"stopped after step 1 of 6 ({sig} on rank 0)" in proc.stdout
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001.pt"]
    again = train(["--resume", out, "--no-progress"])
    whole = train([*args, "--out", tmp_path / "whole"])
    assert again.returncode == whole.returncode == 0, again.stderr + whole.stderr
    for name, tensor in checkpoint(tmp_path / "whole", 6)["model"].items():
        assert torch.equal(tensor, checkpoint(out, 6)["model"][name]), name


def test_a_signal_after_the_last_step_lets_the_finished_run_write_its_log(tmp_path):
    """A signal after the last step, while the finished run writes its log and plot, is no
    stop: the run ends with status 0 and all its outputs, instead of the signal ending it."""
    proc = train_signalled_in("_plot", "SIGUSR1", ["--optimizer", "sgd", "--batch-size", 32, "--steps", 3, "--no-progress",
                                        "--out", tmp_path])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.load(open(tmp_path / "log.json"))["summary"]
    assert summary["steps"] == 3 and summary["stopped_by"] == {} and (tmp_path / "training.png").exists()


DATALOADER_SCRIPT = """
import os, sys, time, torch
from torch.utils.data import DataLoader, TensorDataset
from hpckfac.comm import Communicator
from hpckfac.stop import StopOnSignal

stop = StopOnSignal(Communicator())  # before the loader forks its workers: they inherit the handler
out = sys.argv[1]


def started(worker):
    open(os.path.join(out, f"worker_{worker}"), "w").write(str(os.getpid()))

data = TensorDataset(torch.arange(10**6))
loader = DataLoader(data, batch_size=4, num_workers=2, worker_init_fn=started, multiprocessing_context="fork")
for step, (x,) in enumerate(loader):
    time.sleep(0.01)
    if stop.should_stop():
        print("stopped after step", step, flush=True)
        break
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked DataLoader workers")
def test_sigusr1_to_every_process_of_the_job_stops_a_loop_with_dataloader_workers(tmp_path):
    """A batch system signals every process of the job, DataLoader workers included. Workers
    forked after StopOnSignal inherit its handler and only note SIGUSR1, so the loop stops and
    ends its workers as usual, instead of a worker dying and taking the rank with it."""
    proc = subprocess.Popen([sys.executable, "-c", DATALOADER_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("worker_*"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.05)
        workers = [int(path.read_text()) for path in tmp_path.glob("worker_*")]
        for pid in [proc.pid, *workers]:
            os.kill(pid, signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "stopped after step" in stdout, stdout + stderr
