"""The scripts in examples/ run as the README says (2 ranks, a minute at most) and learn."""
import ast
import os
import re
import subprocess
import sys
import zipfile

import pytest

from test_multirank import mpiexec
from torch_features import import_transformers

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
ENV = dict(os.environ, PYTHONWARNINGS="ignore")


def run(script, *args, ranks=2):
    cmd = [*mpiexec(), "-n", str(ranks), sys.executable, os.path.join(EXAMPLES, script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_cnn_with_batchnorm(tmp_path):
    out = run("cnn_batchnorm.py", "--out", tmp_path)
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))
    assert accuracy > 0.9  # chance is 0.25
    assert (tmp_path / "checkpoint.pt").is_file()
    assert "K-FAC (16 units, 2x2 each)" in out and "max_ms" in out



def test_a_batch_that_does_not_split_is_one_message_from_rank_0():
    cmd = [*mpiexec(), "-n", "3", sys.executable, os.path.join(EXAMPLES, "cnn_batchnorm.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("--batch 64 does not split over 3 ranks") == 1, proc.stderr
    assert "give a multiple of 3, e.g. --batch 66" in proc.stderr, proc.stderr

def test_transformer_on_token_sequences():
    out = run("transformer_tokens.py")
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", out)]
    assert losses[-1] < 0.5 < losses[0]  # reversal learnt (chance: log 12 = 2.48)
    assert "Embedding    K-FAC (A diagonal 12" in out and "LayerNorm    K-FAC (32 units" in out
    assert "first-order" in out  # the model's own position table


@pytest.mark.parametrize("ranks", [1, 2])
def test_accumulation_and_resume(ranks):
    out = run("accumulate_and_resume.py", ranks=ranks)
    assert "resumed run matches the uninterrupted one: True" in out


def test_kfac_pytorch_port(tmp_path):
    out = run("kfac_pytorch_port.py", "--out", tmp_path, "--kfac-skip-layers", "BatchNorm2d")
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))
    assert accuracy > 0.9  # chance is 0.25
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", out)]
    assert losses[-1] < losses[0]
    assert "BatchNorm2d  first-order: in skip_layers" in out and out.count("K-FAC (A") == 3
    assert re.findall(r"damping ([0-9.]+)", out) == ["0.0300"] * 3 + ["0.0150"]  # halved at epoch 3
    assert "resumes at step 64" in out and (tmp_path / "checkpoint.pt").is_file()


def test_huggingface_gpt2():
    import_transformers()
    out = run("huggingface_gpt2.py")
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", out)]
    assert losses[-1] < 1.0 < losses[0]  # counting learnt (chance: log 16 = 2.77)
    assert out.count("Conv1D       K-FAC") == 8 and "(tied weights)" in out


def test_the_commands_of_the_examples_docstrings_give_options_they_have():
    """Each example's docstring shows how to run it: the script it runs is the example itself and
    every option it passes is one the script's parser defines."""
    problems = []
    for name in sorted(os.listdir(EXAMPLES)):
        if not name.endswith(".py"):
            continue
        source = open(os.path.join(EXAMPLES, name), encoding="utf-8").read()
        defined = set(re.findall(r"add_argument\(\"(--[\w-]+)\"", source))
        commands = re.findall(r"^ +(?:mpiexec -n \d+ )?python (examples/\S+)(.*)$", ast.get_docstring(ast.parse(source)), re.M)
        if not commands:
            problems.append(f"{name}: no command in its docstring")
        for script, rest in commands:
            if script != f"examples/{name}":
                problems.append(f"{name}: its docstring runs {script}")
            options = re.findall(r"(?<![\w-])--[a-z][\w-]*", rest.split("#")[0])
            problems += [f"{name}: no option {o}" for o in options if o not in defined]
    assert not problems, problems


def _readme_script(tmp_path, extra=""):
    """The README's "Using it in your training script" block, with a model and data filled in
    (and ``extra`` run before it), as ``tmp_path/train.py``."""
    readme = open(os.path.join(os.path.dirname(EXAMPLES), "README.md"), encoding="utf-8").read()
    snippet = re.search(r"```python\n(import torch\nfrom torch.utils.data.*?)```", readme, re.S).group(1)
    setup = ("import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
             "torch.manual_seed(0)\n"
             "dataset = TensorDataset(torch.randn(256, 3, 8, 8), torch.randint(0, 4, (256,)))\n"
             "global_batch, epochs = 64, 2\n"
             "def MyModel():\n"
             "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),\n"
             "                         nn.Flatten(), nn.Linear(512, 4))\n")
    (tmp_path / "train.py").write_text(setup + extra + snippet)
    return subprocess.run([*mpiexec(), "-n", "2", sys.executable, "train.py"], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=tmp_path)


def test_the_readme_snippet_runs_at_two_ranks(tmp_path):
    proc = _readme_script(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "checkpoint.pt").is_file() and "total" in proc.stdout


def test_the_readme_snippet_killed_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """Rank 0 killed (SIGKILL: nothing runs after it) halfway through the README's save: the
    checkpoint of an earlier job is still there, whole, and loads; the half-written bytes are
    in a temporary file beside it, which ``verify_checksums`` refuses."""
    import torch

    from hpckfac.train.checkpoint import verify_checksums

    torch.save({"step": 7}, tmp_path / "checkpoint.pt")
    previous = (tmp_path / "checkpoint.pt").read_bytes()
    # torch.save, as the README calls it, cut off halfway by a kill of its process.
    extra = ("import io, os, signal\n"
             "_save = torch.save\n"
             "def _killed_halfway(obj, f, *args, **kwargs):\n"
             "    buffer = io.BytesIO()\n"
             "    _save(obj, buffer)\n"
             "    fh = open(f, 'wb') if isinstance(f, (str, os.PathLike)) else f\n"
             "    fh.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])\n"
             "    fh.flush()\n"
             "    os.kill(os.getpid(), signal.SIGKILL)\n"
             "torch.save = _killed_halfway\n")
    proc = _readme_script(tmp_path, extra)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert (tmp_path / "checkpoint.pt").read_bytes() == previous
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True) == {"step": 7}
    torn = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert len(torn) == 1 and torn[0].startswith(".checkpoint.pt."), os.listdir(tmp_path)
    with pytest.raises(zipfile.BadZipFile):
        verify_checksums(tmp_path / torn[0])
