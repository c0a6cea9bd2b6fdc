"""Binding each MPI rank to its device: one rank per GPU.

``bind_device`` picks this rank's device and makes it current for torch and
CuPy alike. Call it on every rank, first thing in a training script (before
the first CUDA allocation: a context created earlier on GPU 0 stays there).
``model_device`` is the device a model's parameters are on, where the
preconditioner runs the pipeline.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import nn

from hpckfac.log import get_logger

if TYPE_CHECKING:
    from hpckfac.comm import Communicator

_log = get_logger("hpckfac.torch.device")
DeviceChoice = Literal["auto", "cuda", "cpu"]
DEVICE_CHOICES: tuple[str, ...] = get_args(DeviceChoice)


def _parse(device) -> torch.device | str:
    if device is None:
        return "auto"
    if isinstance(device, str) and device in DEVICE_CHOICES:
        return device
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected one of {DEVICE_CHOICES}, 'cuda:N' or a torch.device, "
                         f"got {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {parsed} is not supported; hpckfac runs on cpu and cuda devices")
    return parsed


def bind_device(device: DeviceChoice | str | torch.device | None = "auto",
                comm: Communicator | None = None) -> torch.device:
    """This rank's device, made current for torch and CuPy; returns it.

    Args:
        device: ``"auto"`` (CUDA when a GPU is visible, else CPU), ``"cuda"``
            (GPU ``local_rank % visible GPUs``: one rank per GPU when a node
            runs as many ranks as it has GPUs), ``"cpu"``, or an explicit
            ``"cuda:N"`` / ``torch.device``. With ``CUDA_VISIBLE_DEVICES`` set
            per rank (``srun --gpu-bind``, PBS per-rank scripts) each rank sees
            one GPU and uses it.
        comm: the ``hpckfac.comm.Communicator`` giving the node-local rank
            (default: ``hpckfac.comm.world_communicator()``, the script's first one on
            ``COMM_WORLD``, made now if there is none: then a collective).

    Raises ValueError naming ``device`` for an unknown device, or for
    ``"cuda"`` when this rank sees no GPU.
    """
    choice = _parse(device)
    if choice == "cpu" or (isinstance(choice, torch.device) and choice.type == "cpu"):
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        if choice == "auto":
            return torch.device("cpu")
        raise ValueError(f"device: {device!r} asks for CUDA but this rank sees no GPU "
                         f"(CUDA_VISIBLE_DEVICES, driver, or a CPU build of torch)")
    if isinstance(choice, torch.device) and choice.index is not None:
        index = choice.index
        if index >= count:
            raise ValueError(f"device: {device!r} but only {count} GPU(s) are visible")
    else:
        if comm is None:
            from hpckfac.comm import world_communicator

            comm = world_communicator()
        index = comm.local_rank % count
        # One GPU under CUDA_VISIBLE_DEVICES is the launcher's per-rank binding (srun --gpus-per-task):
        # each rank sees its own, not one shared.
        per_rank = count == 1 and bool(os.environ.get("CUDA_VISIBLE_DEVICES"))
        if comm.local_size > count and comm.local_rank == 0 and not per_rank:  # a fact of the node: said once
            _log.warning("%d ranks on this node share %d GPU(s)", comm.local_size, count)
    torch.cuda.set_device(index)
    try:
        import cupy
    except ImportError:
        pass
    else:
        cupy.cuda.Device(index).use()
    _log.info("bound to GPU %d of %d visible (%s)", index, count, torch.cuda.get_device_name(index))
    return torch.device("cuda", index)


def model_device(model: nn.Module) -> torch.device:
    """The one device holding ``model``'s parameters (CPU for a model without any);
    ValueError naming ``model`` when they are spread over several."""
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise ValueError(f"model: parameters on several devices {sorted(map(str, devices))}; "
                         f"K-FAC needs the model on one device per rank")
    return devices.pop() if devices else torch.device("cpu")
