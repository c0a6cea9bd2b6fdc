"""``G⁻¹ X A⁻¹`` for stacks of gradient matrices on the CPU, in torch's thread pool.

The owner's preconditioning products (``KronBlock.precondition_batch_into``) are most of a
step without statistics. With NumPy they run on its BLAS's one thread (``hpckfac.threads``
gives the rank's cores to torch's pool); as torch products of zero-copy views of the same
arrays they run in the pool the step's forward and backward use, on all of the rank's
cores, as the factor products do (``hpckfac.ops.factors``). The values are those of
another GEMM library: equal to NumPy's up to float rounding.
"""
from __future__ import annotations

import numpy as np
import torch

from hpckfac.ops.factors import full_precision


def _tensor(x: np.ndarray, dtype: np.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` as a tensor sharing its memory where it can (torch needs writable
    memory: a read-only array is copied)."""
    x = np.asarray(x, dtype=dtype)
    return torch.from_numpy(x if x.flags.writeable else x.copy())


@full_precision
def kron_apply(inv_g: np.ndarray, grads: np.ndarray, inv_a: np.ndarray, out: np.ndarray) -> None:
    """``out[j] = inv_g[j] @ grads[j] @ inv_a[j]`` for stacks ``(k, d_G, d_G)``, ``(k, d_G, d_A)``
    and ``(k, d_A, d_A)``, in their common dtype; ``out`` is ``(k, d_G, d_A)``, written in place
    (cast to its dtype when it differs)."""
    dtype = np.result_type(inv_g.dtype, grads.dtype, inv_a.dtype)
    left = torch.matmul(_tensor(inv_g, dtype), _tensor(grads, dtype))
    target = torch.from_numpy(out)
    if target.dtype == left.dtype:
        torch.matmul(left, _tensor(inv_a, dtype), out=target)
    else:
        target.copy_(torch.matmul(left, _tensor(inv_a, dtype)))
