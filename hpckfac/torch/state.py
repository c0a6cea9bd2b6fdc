"""The blocks' running factors and inverses between the engine's host arrays and a
``state_dict()`` of torch tensors, which ``torch.save`` writes and ``torch.load(...,
weights_only=True)`` reads back on any device."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Floating dtypes NumPy lacks (bfloat16, the float8 kinds): read as float32, which holds them exactly.
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def blocks_as_tensors(blocks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The engine's ``state_dict()["blocks"]`` (host arrays, or lists of them, or None) as CPU
    tensors sharing their memory: they are views of the buffer ``state_dict()`` gathered, made
    for this call, so a copy would only double the state's peak memory on every rank."""
    return {name: {key: _to_tensors(value) for key, value in block.items()} for name, block in blocks.items()}


def blocks_as_arrays(blocks: dict[str, Any]) -> dict[str, Any]:
    """A saved ``"blocks"`` entry as host arrays for ``KFACEngine.load_state_dict``; an entry
    that is not a dict is passed on as it is, for the engine to name it malformed. ValueError
    naming the block for values that are not arrays of numbers."""
    return {name: {key: _to_arrays(value, f"block {name!r} has {key}") for key, value in block.items()}
            if isinstance(block, dict) else block for name, block in blocks.items()}


def _to_tensors(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [torch.from_numpy(v) for v in value]
    return torch.from_numpy(value)


def _to_arrays(value: Any, where: str) -> Any:
    """A block's saved factors (an array) or inverses (a list or tuple of them) as host arrays;
    ``where`` names them in the ValueError for a value that is none."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_host_array(v, where) for v in value]
    return _host_array(value, where)


def _host_array(value: Any, where: str) -> np.ndarray:
    """A checkpoint's tensor (or array) as a host array: ``torch.load(map_location="cuda")``
    puts the state's tensors on the GPU, where ``Tensor.numpy()`` refuses them. ValueError
    naming ``where`` for a tensor without values NumPy can hold (meta, sparse, complex32)."""
    try:
        if not isinstance(value, torch.Tensor):
            return np.asarray(value)
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype not in _NUMPY_FLOATS:
            value = value.float()
        return value.numpy()
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as err:
        raise ValueError(f"state: {where} that are not arrays of numbers ({str(err).splitlines()[0]})") from None
