"""The python blocks of the docs that are neither whole scripts (test_docs_scripts.py) nor
examples run as they stand (test_layers_docs.py, test_ops_docs.py) nor README.md's training
script (test_examples.py): each runs here as the doc shows it, with what it leaves to the user
(a model, data, a loss) supplied, and a block that no test runs fails
``test_every_python_block_is_run``."""
import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from torch_features import import_transformers, needs_amp_grad_scaler

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks():
    """(doc name, first line, source) of every python block of README.md and docs/."""
    found = []
    for doc in DOCS:
        for source in re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            found.append((doc.name, source.splitlines()[0], source))
    return found


BLOCKS = _blocks()


def block(doc: str, first_line: str) -> str:
    """The one block of ``doc`` that begins with ``first_line``."""
    sources = [s for d, line, s in BLOCKS if d == doc and line.startswith(first_line)]
    assert len(sources) == 1, f"{doc}: {len(sources)} python blocks begin with {first_line!r}"
    return sources[0]


# (doc, first line) of the blocks this file runs
FRAGMENTS = {
    ("preconditioner.md", "from transformers.pytorch_utils import Conv1D"),
    ("preconditioner.md", "from torch import nn"),
    ("preconditioner.md", "from hpckfac.comm import Communicator"),
    ("preconditioner.md", 'scaler = torch.amp.GradScaler("cuda")'),
    ("training.md", "from hpckfac.train.config import TrainConfig"),
    ("training.md", "from hpckfac.stop import StopOnSignal"),
    ("gpu.md", "from hpckfac.torch import KFACPreconditioner, bind_device"),
}


def test_every_python_block_is_run():
    header = re.compile(r"# \w+\.py -- run with: ")  # test_docs_scripts.py
    run_elsewhere = {"curvature.md", "numerics.md"}  # test_layers_docs.py, test_ops_docs.py
    readme_script = "import torch"  # test_examples.py: the README's training script
    missed = [f"{doc}: {line}" for doc, line, _ in BLOCKS
              if not header.match(line) and doc not in run_elsewhere
              and not (doc == "README.md" and line == readme_script)
              and not any(doc == d and line.startswith(first) for d, first in FRAGMENTS)]
    assert not missed, f"python blocks no test runs: {missed}"


def _losses(model, precond, steps=3, shape=(16, 8), classes=2):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(*shape, generator=gen), torch.randint(0, classes, (shape[0],), generator=gen)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()


def test_registering_gpt2_conv1d():
    import_transformers()
    from hpckfac.torch import KFACPreconditioner

    scope = {}
    exec(block("preconditioner.md", "from transformers.pytorch_utils import Conv1D"), scope)
    model = nn.Sequential(scope["Conv1D"](6, 8), nn.Tanh(), scope["Conv1D"](2, 6))  # Conv1D(out, in)
    precond = KFACPreconditioner(model, lr=0.1)
    _losses(model, precond)
    assert len(precond.modules) == 2 and not precond.other_params
    assert "Conv1D       K-FAC (A 9x9, G 6x6)" in repr(precond), repr(precond)


def test_activation_checkpointing_block_keeps_every_layer_statistics():
    from hpckfac.torch import KFACPreconditioner

    scope = {}
    exec(block("preconditioner.md", "from torch import nn"), scope)
    model = scope["Net"]()
    precond = KFACPreconditioner(model, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recomputed call taken for a second one would warn
        _losses(model, precond)
    assert len(precond.modules) == 2 and "2 of 2 layers" in repr(precond), repr(precond)


def test_binding_the_device_block():
    scope = {}
    exec(block("preconditioner.md", "from hpckfac.comm import Communicator"), scope)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert scope["device"].type == expected
    assert next(scope["model"].parameters()).device.type == expected


@needs_amp_grad_scaler
def test_mixed_precision_block():
    """As the doc shows it, on a GPU; without one, GradScaler("cuda") and autocast("cuda")
    disable themselves (with a warning) and the same lines run in float32."""
    from hpckfac.torch import KFACPreconditioner

    source = block("preconditioner.md", 'scaler = torch.amp.GradScaler("cuda")')
    source = source.replace("grad_scaler=scaler, ...)", "grad_scaler=scaler, lr=0.1)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = {"torch": torch, "KFACPreconditioner": KFACPreconditioner, "model": model,
             "optimizer": optimizer, "loss_fn": nn.functional.cross_entropy,
             "x": torch.randn(16, 8, device=device), "y": torch.randint(0, 2, (16,), device=device)}
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
        exec(source, scope)
    assert scope["precond"].steps == 1
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_trainer_from_python(tmp_path):
    """training.md's "From Python", 20 steps instead of 200 (the same calls, a tenth of the
    time), in a process of its own with one torch thread (two spin on a loaded machine)."""
    source = block("training.md", "from hpckfac.train.config import TrainConfig")
    assert "steps=200" in source
    check = "\nassert result.records[-1]['step'] == 20 and 0.5 < result.summary['test_acc'] <= 1.0\n"
    (tmp_path / "from_python.py").write_text(source.replace("steps=200", "steps=20") + check)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "from_python.py"], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "'step': 20" in proc.stdout


def test_stop_on_signal_block():
    """training.md's loop with StopOnSignal: a signal during step 3 of 10 stops it after step 3,
    checkpointed there, and the handlers that were there before are back."""
    import signal

    from hpckfac.comm import Communicator

    taken, saved = [], []

    def train_one_step():
        taken.append(len(taken))
        if len(taken) == 4:  # steps 0-3: the fourth raises the signal
            signal.raise_signal(signal.SIGUSR1)

    before = signal.getsignal(signal.SIGUSR1)
    scope = {"comm": Communicator(), "start": 0, "steps": 10, "train_one_step": train_one_step,
             "save_checkpoint": lambda: saved.append(len(taken))}
    exec(block("training.md", "from hpckfac.stop import StopOnSignal"), scope)
    assert taken == [0, 1, 2, 3] and saved == [4] and scope["stop"].stopping_ranks == {0: "SIGUSR1"}
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_block():
    from hpckfac.torch import KFACPreconditioner

    def MyModel():
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    scope = {"MyModel": MyModel}
    exec(block("gpu.md", "from hpckfac.torch import KFACPreconditioner, bind_device"), scope)
    precond = scope["precond"]
    assert isinstance(precond, KFACPreconditioner) and precond.device.type == "cuda"
    x = torch.randn(16, 8, device=scope["device"])
    scope["model"](x).sum().backward()
    precond.step()

