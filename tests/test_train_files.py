"""The trainer's files: checked up front, replaced atomically, no stray temporaries."""
import os
import stat

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


def test_the_rename_is_synced_to_disk_after_the_data(tmp_path, monkeypatch):
    """The new name lives in the folder: it is flushed after the file's contents, or a crash
    right after the write could bring back the old file. The rename comes between the two: a
    crash after a rename made before the data reached the disk leaves an empty file under the
    target's name, in place of the old one."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(os.fstat(fd).st_mode), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda *paths: (events.append("rename"), real_replace(*paths)))
    atomic_write(str(tmp_path / "log.json"), lambda fh: fh.write("data"))
    assert len(events) == 3 and events[1] == "rename", events
    assert stat.S_ISREG(events[0]) and stat.S_ISDIR(events[2])
    assert (tmp_path / "log.json").read_text() == "data"


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
    (tmp_path / "other" / "log.json").mkdir(parents=True)
    with pytest.raises(ValueError, match="log.json is a directory; the run writes a file there"):
        check_output_dir(str(tmp_path / "other"), ("records.jsonl", "log.json"), ())


@pytest.mark.parametrize("name", ["run", "run[1]", "lr=0.1*"])
def test_temporary_files_of_a_killed_run_are_removed_and_nothing_else(tmp_path, name):
    """Also in a folder, or of a file, whose name holds glob characters (".x.json.abc.tmp" is
    matched by the pattern of "[x].json" unescaped), and a symlink in a temporary's place, not
    what it points to."""
    out = tmp_path / name
    (out / "checkpoints").mkdir(parents=True)
    (out / "keep").mkdir()
    left = [out / ".log.json.k2j9x.tmp", out / ".[x].json.u7t1c.tmp", out / "checkpoints" / ".step_00000010.pt.a8f0q.tmp"]
    kept = [out / "log.json", out / "notes.tmp", out / ".mine.abc.tmp", out / ".x.json.abc.tmp", out / "keep" / "f",
            out / "checkpoints" / "step_00000010.pt"]
    for path in left + kept:
        path.write_text("x")
    os.symlink(out / "keep", out / ".log.json.p0q1r.tmp")
    check_output_dir(str(out), ("log.json", "[x].json"), ("checkpoints",))
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)
    assert not os.path.lexists(out / ".log.json.p0q1r.tmp")


def test_the_temporary_of_a_write_killed_before_its_rename_is_removed_by_the_next_check(tmp_path, monkeypatch):
    """What a killed atomic_write leaves is what check_output_dir removes: a process killed
    between write and rename runs neither the rename nor the cleanup."""
    def killed(*args):
        raise KeyboardInterrupt

    (tmp_path / "checkpoints").mkdir()
    for target in (tmp_path / "log.json", tmp_path / "checkpoints" / "step_00000004.pt"):
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", killed)
            patch.setattr(os, "remove", lambda path: None)
            with pytest.raises(KeyboardInterrupt):
                atomic_write(str(target), lambda fh: fh.write("data"))
        assert len(os.listdir(target.parent)) == (2 if target.parent == tmp_path else 1)
    check_output_dir(str(tmp_path), ("log.json",), ("checkpoints",))
    assert os.listdir(tmp_path) == ["checkpoints"] and os.listdir(tmp_path / "checkpoints") == []


def test_a_write_interrupted_by_ctrl_c_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "log.json"
    atomic_write(str(target), lambda fh: fh.write("old"))

    def interrupted(fh):
        fh.write("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(target), interrupted)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["log.json"]


def test_any_damaged_checkpoint_is_a_checkpoint_error(tmp_path):
    """Random bytes make torch's unpickler fail in many ways (IndexError, KeyError, ...):
    every one of them must come out as the one-line CheckpointError."""
    import numpy as np

    from hpckfac.train.checkpoint import CheckpointError, load_checkpoint

    rng = np.random.default_rng(0)
    path = tmp_path / "step_00000001.pt"
    for _ in range(300):
        path.write_bytes(rng.bytes(int(rng.integers(1, 4000))))
        with pytest.raises(CheckpointError, match="is corrupt or unreadable|is not an hpckfac training checkpoint"):
            load_checkpoint(str(path))


def _flip_a_tensor_bit(path, byte):
    """Flip the lowest bit of byte ``byte`` of the first tensor's data in the ``torch.save`` file
    ``path``; returns the file's new bytes."""
    import zipfile

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if "/data/" in i.filename)
    local = data[member.header_offset:member.header_offset + 30]
    start = member.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    data[start + byte] ^= 0x01
    path.write_bytes(bytes(data))
    return data


def test_verify_checksums_refuses_what_torch_load_reads_as_other_weights(tmp_path):
    """A training script's own ``torch.save`` file (the README's pattern): one flipped bit in a
    tensor's bytes loads silently as another value, a file cut short fails in torch's words;
    ``verify_checksums`` refuses both as ``zipfile.BadZipFile``."""
    import zipfile

    import torch

    from hpckfac.train.checkpoint import verify_checksums

    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.arange(256.0)}}, path)
    verify_checksums(path)
    data = _flip_a_tensor_bit(path, 8)
    loaded = torch.load(path, weights_only=True)["model"]["w"]
    assert not torch.equal(loaded, torch.arange(256.0))  # why the checksums must be read
    with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
        verify_checksums(path)
    path.write_bytes(bytes(data[:len(data) // 2]))
    with pytest.raises(zipfile.BadZipFile, match="not a zip file"):
        verify_checksums(path)


def test_verify_checksums_reads_a_tensor_larger_than_one_read_to_its_end(tmp_path):
    """The CRC-32 is compared when a member has been read to its end: a tensor of more than one
    read's 16 MiB with a bit flipped near its start is refused as well."""
    import zipfile

    import numpy as np
    import torch

    from hpckfac.train.checkpoint import verify_checksums

    path = tmp_path / "checkpoint.pt"
    weights = np.random.default_rng(2).standard_normal((1 << 22) + 1000).astype(np.float32)
    torch.save({"model": {"w": torch.from_numpy(weights)}}, path)
    verify_checksums(path)
    _flip_a_tensor_bit(path, 100)
    with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
        verify_checksums(path)


def test_keep_only_the_newest_checkpoints(tmp_path):
    import subprocess
    import sys

    # A checkpoint of a later step, left by another run, is neither counted nor removed, and a
    # planted symlink at the plot's path is replaced rather than written through.
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000100.pt").write_bytes(b"another run")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "training.png")
    cmd = [sys.executable, "-m", "hpckfac", "train", "--steps", "8", "--batch-size", "32", "--no-progress",
           "--checkpoint-every", "2", "--keep-checkpoints", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000006.pt", "step_00000008.pt",
                                                            "step_00000100.pt"]
    assert "later steps than this run's (step_00000100.pt)" in proc.stderr
    assert victim.read_text() == "precious" and not os.path.islink(tmp_path / "training.png")
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoints_of_another_run_are_named_without_keep_checkpoints(tmp_path):
    """A fresh run writing checkpoints beside a later step of another run says so, since
    ``--resume`` would pick that one, and removes nothing."""
    import subprocess
    import sys

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000100.pt").write_bytes(b"another run")
    cmd = [sys.executable, "-m", "hpckfac", "train", "--steps", "4", "--batch-size", "32", "--no-progress",
           "--checkpoint-every", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000002.pt", "step_00000004.pt",
                                                            "step_00000100.pt"]
    assert proc.stderr.count("later steps than this run's (step_00000100.pt)") == 1


def test_append_lines_refuses_symlinks(tmp_path):
    from hpckfac.train.files import append_lines

    append_lines(str(tmp_path / "records.jsonl"), ["a", "b"])
    append_lines(str(tmp_path / "records.jsonl"), ["c"])
    assert (tmp_path / "records.jsonl").read_text() == "a\nb\nc\n"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "planted.jsonl")
    with pytest.raises(OSError):
        append_lines(str(tmp_path / "planted.jsonl"), ["x"])
    assert victim.read_text() == "precious"


def test_written_files_get_the_permissions_of_an_ordinary_open(tmp_path):
    """mkstemp creates 0600 files; the logs and checkpoints get what the user's umask gives
    any new file (readable by the group on a shared cluster with the usual 022 or 027)."""
    import stat

    from hpckfac.train import files

    mask = os.umask(0o027)
    try:
        files._UMASK, saved = 0o027, files._UMASK
        files.atomic_write(str(tmp_path / "log.json"), lambda fh: fh.write("{}"))
        files.append_lines(str(tmp_path / "records.jsonl"), ["{}"])
    finally:
        files._UMASK = saved
        os.umask(mask)
    for name in ("log.json", "records.jsonl"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640, name


def test_a_full_disk_while_saving_a_checkpoint_is_named_as_such(tmp_path):
    """torch.save hides the failed write behind a RuntimeError of its zip writer
    ("unexpected pos ..."), raised while it closes the archive: the error names the disk
    (here the file-size limit standing in for it: EFBIG, as ENOSPC would be) and the file."""
    import errno

    import torch

    resource = pytest.importorskip("resource")

    from hpckfac.train.checkpoint import save_checkpoint

    state = {"step": 1, "config": {}, "data": "", "model": {"w": torch.zeros(100_000)}, "optimizer": {},
             "preconditioner": None, "data_order": {}, "history": [], "wall": 0.0,
             "torch_rng": torch.get_rng_state()}
    path = tmp_path / "step_00000001.pt"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # Python ignores SIGXFSZ: writes get EFBIG
    try:
        with pytest.raises(OSError) as info:
            save_checkpoint(str(path), state)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.errno == errno.EFBIG and str(path) in str(info.value), info.value
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["run[1]", "lr=0.1*", "what?"])
def test_checkpoints_are_found_and_pruned_in_a_folder_named_like_a_glob(tmp_path, name):
    """A folder whose name holds glob characters ('run[1]', a sweep's naming) matched nothing:
    --keep-checkpoints kept every file and --resume found no checkpoint."""
    from hpckfac.train.checkpoint import find_checkpoint, list_checkpoints, prune_checkpoints

    folder = tmp_path / name / "checkpoints"
    folder.mkdir(parents=True)
    for step in (2, 4, 6):
        (folder / f"step_{step:08d}.pt").write_bytes(b"x")
    assert list_checkpoints(str(folder)) == [str(folder / f"step_{s:08d}.pt") for s in (2, 4, 6)]
    assert find_checkpoint(str(tmp_path / name)) == str(folder / "step_00000006.pt")
    prune_checkpoints(str(folder), 6, 1)
    assert os.listdir(folder) == ["step_00000006.pt"]
