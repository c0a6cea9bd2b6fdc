"""Training checkpoints: one ``torch.save`` file per checkpointed step, written
atomically (temporary file, fsync, rename), loaded with ``weights_only=True``.

A checkpoint holds ``{"format", "version", "step", "config", "data", "model",
"optimizer", "preconditioner", "data_order", "history", "wall", "torch_rng"}``
(``preconditioner`` is None for SGD/Adam). Files are ``step_XXXXXXXX.pt`` in
``OUT/checkpoints``; ``--resume`` takes such a file or a directory holding them
(the latest step wins). Loading compares every part of the file with the CRC-32
checksum recorded when it was written, which ``torch.load`` does not do.
"""
from __future__ import annotations

import glob
import math
import os
import re
import reprlib
import warnings
import zipfile
from typing import Any

import torch

from hpckfac.train.config import TrainConfig
from hpckfac.train.files import atomic_write

FORMAT = "hpckfac-train-checkpoint"
VERSION = 1
KEYS = ("format", "version", "step", "config", "data", "model", "optimizer", "preconditioner",
        "data_order", "history", "wall", "torch_rng")
_NAME = re.compile(r"step_(\d+)\.pt$")
_DEFAULTS = TrainConfig().as_dict()


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or from a different run setup."""


def checkpoint_path(directory: str, step: int) -> str:
    """Where the checkpoint of ``step`` goes inside ``directory``."""
    return os.path.join(directory, f"step_{step:08d}.pt")


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: readers see the old file or the whole new one."""
    missing = [k for k in KEYS if k not in state and k not in ("format", "version")]
    if missing:
        raise ValueError(f"state: missing {missing}")
    def write(fh) -> None:
        try:
            torch.save({"format": FORMAT, "version": VERSION, **state}, fh)
        except RuntimeError as exc:
            # A failed write (a full disk) surfaces as the zip writer's "unexpected pos ..." raised
            # while torch closes the archive; the OSError that says why is only its context.
            cause = exc.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise OSError(cause.errno, cause.strerror or str(cause), path) from exc

    atomic_write(path, write, binary=True)


def _by_step(directory: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the ``step_*.pt`` files in ``directory``, oldest step first."""
    return sorted((int(m.group(1)), f) for f in glob.glob(os.path.join(glob.escape(directory), "step_*.pt"))
                  if (m := _NAME.search(f)))


def list_checkpoints(directory: str) -> list[str]:
    """The ``step_*.pt`` files in ``directory``, oldest step first."""
    return [f for _, f in _by_step(directory)]


def prune_checkpoints(directory: str, step: int, keep: int) -> list[str]:
    """Remove all but the ``keep`` latest checkpoints of ``directory`` up to ``step`` (the one
    just written; ``keep=0``: remove none); those of later steps (another run's) are left alone
    and returned."""
    found = _by_step(directory)
    if keep:
        for _, old in [item for item in found if item[0] <= step][:-keep]:
            os.remove(old)
    return [f for s, f in found if s > step]


def find_checkpoint(path: str) -> str:
    """``path`` itself if a file, else the latest ``step_*.pt`` in ``path`` or ``path/checkpoints``."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"resume: no checkpoint file or directory at {path}")
    for directory in (path, os.path.join(path, "checkpoints")):
        found = list_checkpoints(directory)
        if found:
            return found[-1]
    raise CheckpointError(f"resume: no step_*.pt checkpoint in {path} or {os.path.join(path, 'checkpoints')}")


def verify_checksums(path: str) -> None:
    """Read every member of the zip archive ``torch.save`` wrote to ``path``, which raises
    ``zipfile.BadZipFile`` for one whose bytes differ from the CRC-32 recorded at writing, and
    for a file cut short (``File is not a zip file``): ``torch.load`` does not compare them, so
    damaged tensor data would load as other weights. Any ``torch.save`` file, a training
    script's own checkpoint too (README, "Using it in your training script").
    Members written without a checksum (CRC 0, after ``torch.serialization.set_crc32_options(False)``)
    are not checked."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.CRC:
                with archive.open(info) as member:
                    while member.read(1 << 24):
                        pass


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read and check the structure of a checkpoint written by ``save_checkpoint``
    (its checksums first: ``verify_checksums``)."""
    try:
        verify_checksums(path)
        with warnings.catch_warnings():  # torch warns about the "protocol" of arbitrary bytes
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    # Damaged bytes can make the unpickler fail in any way (IndexError, KeyError, ...): all mean the same.
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an hpckfac training checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('version')!r}, "
                              f"this hpckfac reads {VERSION}")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)})")
    for key, valid, expected in _FIELDS:
        if not valid(state[key]):
            raise CheckpointError(f"checkpoint {path} is corrupt: {key} is {reprlib.repr(state[key])}, "
                                  f"expected {expected}")
    kfac = state["preconditioner"]
    if kfac is not None and kfac.get("steps") != state["step"]:  # one step() per training step
        raise CheckpointError(f"checkpoint {path} is corrupt: its preconditioner has taken "
                              f"{reprlib.repr(kfac.get('steps'))} steps, the run {state['step']}")
    return state


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# The fields of an evaluation record that a resumed run reads back (summary, plot, progress).
RECORD_KEYS = ("step", "epoch", "loss", "test_loss", "test_acc", "wall")


def check_history(state: dict[str, Any], path: str) -> None:
    """CheckpointError unless every record of the checkpoint's history holds the numbers a
    resumed run reads back (``RECORD_KEYS``): a hand-edited one would fail at the run's end."""
    for record in state["history"]:
        bad = [k for k in RECORD_KEYS if not isinstance(record.get(k), (int, float)) or isinstance(record.get(k), bool)]
        if bad:
            raise CheckpointError(f"checkpoint {path} is corrupt: history record {reprlib.repr(record)} has no "
                                  f"number {bad[0]!r}")


def _finite_tensors(value: Any) -> bool:
    """Whether every floating-point tensor in ``value`` (nested dicts, lists, tuples) is finite:
    a NaN momentum buffer or Adam moment would turn the first resumed step's update NaN."""
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(_finite_tensors(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite_tensors(item) for item in value)
    return True


# What each field of a checkpoint must be (damaged or hand-edited files fail here, by name).
_FIELDS = (
    ("step", _count, "an integer >= 0"),
    ("config", lambda v: isinstance(v, dict), "a dict of settings"),
    ("data", lambda v: isinstance(v, str), "a data fingerprint (str)"),
    ("model", lambda v: isinstance(v, dict) and _finite_tensors(v), "a model state_dict with finite values"),
    ("optimizer", lambda v: isinstance(v, dict) and _finite_tensors(v.get("state")),
     "an optimizer state_dict with finite values"),
    ("preconditioner", lambda v: v is None or isinstance(v, dict), "None or a preconditioner state_dict"),
    ("data_order", lambda v: isinstance(v, dict), "a dict"),
    ("history", lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of records"),
    ("wall", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
     "a finite number of seconds >= 0"),
    ("torch_rng", lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1,
     "torch's RNG state (a uint8 tensor)"),
)


def check_compatible(state: dict[str, Any], config: dict[str, Any], data_fingerprint: str,
                     keys: tuple[str, ...], path: str) -> None:
    """Raise CheckpointError naming the first setting in ``keys`` (or the data) that differs."""
    for key in keys:
        # A setting newer than the checkpoint: it was trained with the setting's default.
        saved = state["config"].get(key, _DEFAULTS.get(key))
        if saved != config.get(key):
            raise CheckpointError(f"checkpoint {path} does not match this run: {key} is "
                                  f"{saved!r} there, {config.get(key)!r} here")
    if state["data"] != data_fingerprint:
        def source(settings: dict[str, Any]) -> str:
            return settings.get("data") or "the embedded digits"

        raise CheckpointError(f"checkpoint {path} was trained on different data: {source(state['config'])} "
                              f"(fingerprint {state['data']}) there, {source(config)} "
                              f"(fingerprint {data_fingerprint}) here")
