"""Files the trainer writes: checked before training, replaced atomically.

``check_output_dir`` runs on rank 0 before the first step (through
``agree``, so every rank gets its error): the folder must be creatable and
writable, and the names the run writes must not be taken by something of the
wrong kind. ``atomic_write`` writes a sibling temporary file created with
``O_EXCL`` under an unpredictable name (``tempfile.mkstemp``: it never follows
a planted symlink), then renames it over the target and syncs the folder;
readers see the old file or the whole new one, and a failure leaves no temporary file behind; those of a
run killed mid-write are removed by the next run's ``check_output_dir``.
``append_lines`` adds lines to a file without following a symlink, so a
growing record costs what is added, not what is already there.
"""
from __future__ import annotations

import glob
import os
import tempfile
from typing import IO, Callable

from hpckfac.log import get_logger

_log = get_logger("hpckfac.train")

# The process's umask, read once (reading it means setting it): the files written through
# mkstemp (created 0600) get the permissions an ordinary open() would give them, so that the
# logs of a run on a shared cluster are as readable as the user's other files.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def check_output_dir(out: str, files: tuple[str, ...], folders: tuple[str, ...]) -> None:
    """ValueError naming the problem unless ``out`` can hold ``files`` and ``folders``."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out: {out} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".hpckfac-write-test.")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"out: cannot write into {out} ({exc.strerror or exc})") from None
    for name in files:
        if os.path.isdir(os.path.join(out, name)):
            raise ValueError(f"out: {os.path.join(out, name)} is a directory; the run writes a file there")
    for name in folders:
        path = os.path.join(out, name)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"out: {path} is a file; the run writes a directory there")
    _remove_stale_temporaries(out, files, folders)


def _remove_stale_temporaries(out: str, files: tuple[str, ...], folders: tuple[str, ...]) -> None:
    """Remove the temporary files of ``atomic_write`` that a killed run left in ``out`` (those
    of ``files``) and in its ``folders`` (all of them: the run owns those folders)."""
    patterns = [os.path.join(glob.escape(out), f".{glob.escape(name)}.*.tmp") for name in files]
    patterns += [os.path.join(glob.escape(os.path.join(out, name)), ".*.tmp") for name in folders]
    stale = [path for pattern in patterns for path in glob.glob(pattern)]
    for path in stale:
        if os.path.isfile(path) or os.path.islink(path):
            os.remove(path)
    if stale:
        _log.info("removed %d temporary file(s) left by an interrupted run in %s", len(stale), out)


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call ``write(fh)`` on a fresh temporary file beside ``path``, flush it to disk,
    then rename it to ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _sync_directory(directory)


def _sync_directory(directory: str) -> None:
    """Flush ``directory``'s entries to disk, so that a rename survives a power loss or a node
    crash (the file's data alone is not enough: the new name lives in the directory). Skipped
    where the platform or file system cannot open or sync a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_lines(path: str, lines: list[str]) -> None:
    """Append ``lines`` (each without its newline) to the regular file ``path``, creating it;
    OSError if ``path`` is a symlink (``O_NOFOLLOW``) rather than writing through it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "a") as fh:
        fh.write("".join(line + "\n" for line in lines))
