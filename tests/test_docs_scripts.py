"""The complete scripts of the docs run as they say.

A python block of README.md or docs/ whose first line reads
``# NAME.py -- run with: [mpiexec -n P ]python NAME.py`` is a whole script: it is saved as
``NAME.py`` in an empty folder and run there with that command, and must exit with status 0.
Blocks with parts for the user to fill in are run elsewhere with those parts supplied
(test_examples.py: README.md's training script).
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from test_multirank import mpiexec

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HEADER = re.compile(r"# (\w+\.py) -- run with: (?:mpiexec -n (\d+) )?python (\w+\.py)\n")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _scripts():
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in re.finditer(r"```python\n(.*?)```", text, re.S):
            header = HEADER.match(match.group(1))
            if header:
                line = text.count("\n", 0, match.start()) + 1
                found.append(pytest.param(header, match.group(1), id=f"{doc.name}:{line}"))
    return found


SCRIPTS = _scripts()


def test_the_docs_mark_their_complete_scripts():
    assert len(SCRIPTS) >= 2  # docs/preconditioner.md's quick start, docs/comm.md's collectives


@pytest.mark.parametrize("header,source", SCRIPTS)
def test_script_runs_as_its_first_line_says(header, source, tmp_path):
    name, ranks, launched = header.groups()
    assert launched == name, f"the block is {name} but its command runs {launched}"
    (tmp_path / name).write_text(source, encoding="utf-8")
    cmd = [sys.executable, name] if ranks is None else [*mpiexec(), "-n", ranks, sys.executable, name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, f"{' '.join(cmd)} (rc={proc.returncode}):\n{proc.stdout}{proc.stderr}"
