"""Zero-copy views of torch tensors as the arrays ``hpckfac.ops``/``stages`` work on.

CPU tensors become NumPy arrays sharing memory (``Tensor.numpy()``), CUDA
tensors CuPy arrays sharing memory (DLPack). bfloat16, which neither NumPy
nor DLPack consumers agree on, travels as a 16-bit integer view reinterpreted
as ``ml_dtypes.bfloat16`` on both sides: no copy, no upcast, so bf16
activations under ``torch.autocast`` reach the tensor-core kernels as they are.

``device_scope`` makes CuPy work on the tensor's GPU and on torch's current
stream there, so the pipeline's kernels are ordered with the model's without
any synchronisation.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import ml_dtypes
import numpy as np
import torch


def namespace_for(device: torch.device):
    """Array namespace of a torch device: ``numpy`` for CPU, ``cupy`` for CUDA."""
    device = torch.device(device)
    if device.type == "cpu":
        return np
    if device.type == "cuda":
        try:
            import cupy
        except ImportError:
            raise ImportError("a model on CUDA needs CuPy: pip install 'hpckfac[cuda12]' (CUDA 12) "
                              "or 'hpckfac[cuda13]' (CUDA 13)") from None
        return cupy
    raise ValueError(f"device: {device} is not supported; hpckfac runs on cpu and cuda devices")


@contextlib.contextmanager
def device_scope(device: torch.device) -> Iterator[None]:
    """Within the block, CuPy's current device and stream are ``device`` and torch's
    current stream on it (no-op for CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    import cupy

    index = torch.cuda.current_device() if device.index is None else device.index
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
        yield


def to_array(tensor: torch.Tensor):
    """The data of ``tensor`` (detached) as a NumPy/CuPy array sharing its memory."""
    tensor = tensor.detach()
    bf16 = tensor.dtype == torch.bfloat16
    if bf16:
        tensor = tensor.view(torch.int16)
    if tensor.is_cuda:
        import cupy

        array = cupy.from_dlpack(tensor)
    else:
        array = tensor.numpy()
    return array.view(ml_dtypes.bfloat16) if bf16 else array


def copy_into(tensor: torch.Tensor, array) -> None:
    """``tensor[...] = array`` (same number of elements), casting to ``tensor``'s dtype."""
    if isinstance(array, np.ndarray):
        source = torch.from_numpy(np.ascontiguousarray(array))
    else:
        source = torch.from_dlpack(array)
    with torch.no_grad():
        tensor.copy_(source.reshape(tensor.shape))
