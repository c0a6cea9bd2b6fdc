"""Zero-copy views of torch tensors as the arrays ``hpckfac.ops``/``stages`` work on.

CPU tensors become NumPy arrays sharing memory (``Tensor.numpy()``); bfloat16,
which NumPy lacks, through a 16-bit integer view reinterpreted as
``ml_dtypes.bfloat16``. CUDA tensors become CuPy arrays through DLPack
(bfloat16 ones are upcast to float32 first, CuPy having no bfloat16).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import torch


def to_array(tensor: torch.Tensor):
    """The data of ``tensor`` (detached) as a NumPy/CuPy array, without copying on CPU."""
    tensor = tensor.detach()
    if tensor.is_cuda:
        import cupy

        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return cupy.from_dlpack(tensor)
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def copy_into(tensor: torch.Tensor, array) -> None:
    """``tensor[...] = array`` (same number of elements), casting to ``tensor``'s dtype."""
    if isinstance(array, np.ndarray):
        source = torch.from_numpy(np.ascontiguousarray(array))
    else:
        source = torch.from_dlpack(array)
    with torch.no_grad():
        tensor.copy_(source.reshape(tensor.shape))
