"""The trainer's files: checked up front, replaced atomically, no stray temporaries."""
import os

import pytest

from hpckfac.train.files import atomic_write, check_output_dir


def test_atomic_write_replaces_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "log.json"
    atomic_write(str(target), lambda fh: fh.write("one"))
    atomic_write(str(target), lambda fh: fh.write("two"))
    assert target.read_text() == "two"

    def fail(fh):
        fh.write("half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        atomic_write(str(target), fail)
    assert target.read_text() == "two" and sorted(os.listdir(tmp_path)) == ["log.json"]


def test_a_planted_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in ("log.json.tmp", ".log.json.tmp", f"log.json.tmp{os.getpid()}"):
        os.symlink(victim, tmp_path / name)
    atomic_write(str(tmp_path / "log.json"), lambda fh: fh.write("data"))
    assert victim.read_text() == "precious" and (tmp_path / "log.json").read_text() == "data"


def test_check_output_dir(tmp_path):
    check_output_dir(str(tmp_path / "new"), ("log.json",), ("checkpoints",))
    assert (tmp_path / "new").is_dir() and os.listdir(tmp_path / "new") == []
    (tmp_path / "new" / "checkpoints").write_text("")
    with pytest.raises(ValueError, match="checkpoints is a file"):
        check_output_dir(str(tmp_path / "new"), ("log.json",), ("checkpoints",))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        check_output_dir(str(tmp_path / "file"), (), ())
