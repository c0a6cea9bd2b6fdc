"""Zero-copy views of torch tensors as the arrays ``hpckfac.ops``/``stages`` work on.

CPU tensors become NumPy arrays sharing memory (``Tensor.numpy()``), CUDA
tensors CuPy arrays sharing memory (built from the tensor's pointer and
strides; DLPack for what that does not cover). bfloat16, which neither NumPy
nor DLPack consumers agree on, travels as a 16-bit integer view reinterpreted
as ``ml_dtypes.bfloat16`` on both sides: no copy, no upcast, so bf16
activations under ``torch.autocast`` reach the tensor-core kernels as they are.

``device_scope`` makes CuPy work on the tensor's GPU and on torch's current
stream there, so the pipeline's kernels are ordered with the model's without
any synchronisation.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, ContextManager, Iterator

import ml_dtypes
import numpy as np
import torch


def namespace_for(device: torch.device) -> Any:
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


_NO_SCOPE = contextlib.nullcontext()  # reusable: it holds no state


def device_scope(device: torch.device) -> ContextManager[None]:
    """Within the block, CuPy's current device and stream are ``device`` and torch's
    current stream on it (no-op for CPU)."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type != "cuda":
        # No generator-based context to build and run: the hooks enter this once per layer.
        return _NO_SCOPE
    return _cuda_scope(device)


@contextlib.contextmanager
def _cuda_scope(device: torch.device) -> Iterator[None]:
    """``device_scope`` of a CUDA ``device``."""
    import cupy

    index = torch.cuda.current_device() if device.index is None else device.index
    with cupy.cuda.Device(index), _external_stream(torch.cuda.current_stream(index).cuda_stream, index):
        yield


class _StreamPointer:
    """A raw ``cudaStream_t`` as the CUDA stream protocol describes one (version 0)."""

    def __init__(self, pointer: int) -> None:
        self.pointer = pointer

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.pointer)


@functools.lru_cache(maxsize=64)
def _external_stream(pointer: int, index: int):
    """CuPy's handle of torch's stream ``pointer`` on device ``index`` (made once: the hooks
    enter ``device_scope`` hundreds of times a step). CuPy 14 takes foreign streams through
    the stream protocol (``Stream.from_external``) and deprecates ``ExternalStream``."""
    import cupy

    if hasattr(cupy.cuda.Stream, "from_external"):
        with cupy.cuda.Device(index):
            return cupy.cuda.Stream.from_external(_StreamPointer(pointer))
    return cupy.cuda.ExternalStream(pointer, index)


# dtypes a CUDA tensor is viewed as directly (bfloat16 travels as int16, see the module docstring).
_CUPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
                torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64, torch.uint8: np.uint8}


def _cupy_view(tensor: torch.Tensor):
    """A CuPy array over a CUDA tensor's memory, built from its pointer and strides.

    DLPack does the same but costs ~70 us a call (it records and waits on stream events); the
    hooks and ``step()`` convert hundreds of tensors per step, and CuPy already runs on torch's
    current stream (``device_scope``), so no synchronisation is needed. The array keeps the
    tensor alive. None where this does not apply (an empty tensor, another dtype)."""
    import cupy

    dtype = _CUPY_DTYPES.get(tensor.dtype)
    if dtype is None or tensor.numel() == 0:
        return None
    itemsize = tensor.element_size()
    span = 1 + sum((n - 1) * st for n, st in zip(tensor.shape, tensor.stride()))
    memory = cupy.cuda.UnownedMemory(tensor.data_ptr(), span * itemsize, tensor, tensor.device.index)
    return cupy.ndarray(tuple(tensor.shape), dtype, cupy.cuda.MemoryPointer(memory, 0),
                        strides=tuple(st * itemsize for st in tensor.stride()))


def to_array(tensor: torch.Tensor) -> Any:
    """The data of ``tensor`` (detached) as a NumPy/CuPy array sharing its memory."""
    tensor = tensor.detach()
    bf16 = tensor.dtype == torch.bfloat16
    if bf16:
        tensor = tensor.view(torch.int16)
    if tensor.is_cuda:
        array = _cupy_view(tensor)
        if array is None:
            import cupy

            array = cupy.from_dlpack(tensor)
    else:
        array = tensor.numpy()
    return array.view(ml_dtypes.bfloat16) if bf16 else array


def to_tensor(array: Any) -> torch.Tensor:
    """A torch tensor sharing the memory of a NumPy (CPU) or CuPy (CUDA) array of a standard
    dtype (the pipeline's buffers: float16/32/64)."""
    if isinstance(array, np.ndarray):
        return torch.from_numpy(array)
    return torch.from_dlpack(array)


def copy_into(tensor: torch.Tensor, array: Any) -> None:
    """``tensor[...] = array`` (same number of elements), casting to ``tensor``'s dtype."""
    if isinstance(array, np.ndarray):
        source = torch.from_numpy(np.ascontiguousarray(array))
    else:
        target = _cupy_view(tensor) if tensor.is_cuda else None
        if target is not None and array.dtype.kind == "f":
            target[...] = array.reshape(target.shape)  # one CuPy copy (and cast) on the shared stream
            return
        source = torch.from_dlpack(array)
    with torch.no_grad():
        tensor.copy_(source.reshape(tensor.shape))
