"""``KronBlock``: the Kronecker-factored curvature block shared by Linear and Conv.

A block sees a layer as ``W~ = [W | b]`` of shape ``(d_G, d_A)`` acting on
rows ``a~ = [a, 1]`` (docs/design.md, "Math conventions"). Subclasses say how the
captured layer input ``a`` becomes rows ``a~`` (``a_rows``) and the output
gradients ``g`` become rows (``g_rows``), and how many positions ``|T|`` one
example has; the factor products themselves go through
``hpckfac.ops.accumulate_factor`` so that CuPy arrays reach the GPU kernels.

Vectorisation: ``vec`` stacks the columns of the ``(d_G, d_A)`` gradient
matrix (column-major), so the Fisher block is ``A kron G`` and
``(A kron G)^-1 vec(M) = vec(G^-1 M A^-1)``.
"""
from __future__ import annotations

import abc
import math
import numbers
from typing import Any

import numpy as np

from hpckfac import ops
from hpckfac.arrays import namespace as array_module

# A NumPy array, or a CuPy array on the GPU path.
Array = Any


def prod(values) -> int:
    """Product of integers (1 for none)."""
    return math.prod(int(v) for v in values)


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an int if it is an integer >= 1; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def check_name(name: Any) -> str:
    """A block's name: a string (ValueError naming ``name`` otherwise)."""
    if not isinstance(name, str):
        raise ValueError(f"name: expected a string, got {name!r}")
    return name


def check_array(x: Any, name: str, ndim_min: int) -> None:
    """ValueError naming ``name`` unless ``x`` is an array with at least ``ndim_min`` dims."""
    if getattr(x, "ndim", -1) < ndim_min:
        raise ValueError(f"{name}: expected an array with at least {ndim_min} dimensions, "
                         f"got {type(x).__name__} of shape {getattr(x, 'shape', None)}")


class KronBlock(abc.ABC):
    """Curvature block ``A kron G`` of a layer with weight ``weight_shape``.

    Attributes: ``name``; ``d_A`` (input rows' width, +1 with a bias);
    ``d_G`` (output rows' width); ``has_bias``; ``weight_shape`` (the
    layer's weight shape, ``(d_G, ...)``).
    """

    def __init__(self, name: str, d_in: int, d_out: int, bias: bool, weight_shape: tuple[int, ...]) -> None:
        if not isinstance(bias, (bool, np.bool_)):
            raise ValueError(f"bias: expected a bool, got {bias!r}")
        self.name = check_name(name)
        self.has_bias = bool(bias)
        self.d_A = int(d_in) + self.has_bias
        self.d_G = int(d_out)
        self.weight_shape = tuple(int(s) for s in weight_shape)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, d_A={self.d_A}, d_G={self.d_G}, "
                f"has_bias={self.has_bias})")

    # ------------------------------------------------------------ subclasses
    @abc.abstractmethod
    def a_rows(self, a: Array) -> Array:
        """Input rows ``(rows, d_A)``, a trailing column of ones with a bias."""

    @abc.abstractmethod
    def g_rows(self, g: Array) -> Array:
        """Output-gradient rows ``(rows, d_G)``, in the same row order as ``a_rows``."""

    @abc.abstractmethod
    def positions(self, g: Array) -> int:
        """``|T|``: positions per example (spatial or extra dimensions; 1 for a plain batch)."""

    # ---------------------------------------------------------------- shared
    def _with_ones(self, rows: Array) -> Array:
        """``rows`` (rows, d_A - has_bias) with a column of ones appended if the layer has a bias."""
        if not self.has_bias:
            return rows
        xp = array_module(rows)
        out = xp.empty((rows.shape[0], self.d_A), dtype=rows.dtype)
        out[:, :-1] = rows
        out[:, -1] = 1
        return out

    def a_factor(self, a: Array, scale: float = 1.0, *, packed: bool = False) -> Array:
        """``scale * sum_i sum_t a~ a~^T``: the ``A`` of docs/design.md with ``scale = 1/B``.

        Dense ``(d_A, d_A)`` or, with ``packed``, its upper triangle in
        ``hpckfac.ops.pack_sym`` order; float32 (float64 for float64 input).
        """
        return ops.accumulate_factor(self.a_rows(a), scale, packed=packed)

    def g_factor(self, g: Array, scale: float = 1.0, *, packed: bool = False) -> Array:
        """``scale / |T| * sum_i sum_t g g^T``: the ``G`` of docs/design.md with ``scale = 1/B``.

        ``g`` must be the gradients of the *per-example* losses with respect
        to the layer output (undo a mean reduction). Layout as ``a_factor``.
        """
        return ops.accumulate_factor(self.g_rows(g), scale / self.positions(g), packed=packed)

    def grad_matrix(self, weight_grad: Array, bias_grad: Array | None = None) -> Array:
        """``[W.reshape(d_G, -1) | b]`` of shape ``(d_G, d_A)`` from the parameter gradients."""
        if tuple(getattr(weight_grad, "shape", ())) != self.weight_shape:
            raise ValueError(f"weight_grad: expected shape {self.weight_shape}, "
                             f"got {getattr(weight_grad, 'shape', None)}")
        weight = weight_grad.reshape(self.d_G, -1)
        if not self.has_bias:
            if bias_grad is not None:
                raise ValueError(f"bias_grad: block {self.name!r} has no bias")
            return weight
        if tuple(getattr(bias_grad, "shape", ())) != (self.d_G,):
            raise ValueError(f"bias_grad: expected shape ({self.d_G},), got {getattr(bias_grad, 'shape', None)}")
        out = array_module(weight).empty((self.d_G, self.d_A), dtype=np.result_type(weight.dtype, bias_grad.dtype))
        out[:, :-1] = weight
        out[:, -1] = bias_grad
        return out

    def split_matrix(self, mat: Array) -> tuple[Array, Array | None]:
        """Inverse of ``grad_matrix``: (weight-shaped array, bias array or None)."""
        self._check_matrix(mat, "mat")
        if not self.has_bias:
            return mat.reshape(self.weight_shape), None
        return mat[:, :-1].reshape(self.weight_shape), mat[:, -1]

    def precondition(self, grad_mat: Array, a_inv: Array, g_inv: Array) -> Array:
        """``g_inv @ grad_mat @ a_inv``, i.e. ``(A kron G)^-1 vec(grad)`` as a ``(d_G, d_A)`` matrix.

        ``a_inv``/``g_inv`` are the damped inverses, e.g. from
        ``hpckfac.layers.damped_kron_inverses`` (``hpckfac.ops.damped_inverse``).
        """
        self._check_matrix(grad_mat, "grad_mat")
        for mat, name, n in ((a_inv, "a_inv", self.d_A), (g_inv, "g_inv", self.d_G)):
            if tuple(getattr(mat, "shape", ())) != (n, n):
                raise ValueError(f"{name}: expected shape ({n}, {n}), got {getattr(mat, 'shape', None)}")
        return g_inv @ grad_mat @ a_inv

    def _check_matrix(self, mat: Array, name: str) -> None:
        if tuple(getattr(mat, "shape", ())) != (self.d_G, self.d_A):
            raise ValueError(f"{name}: expected shape ({self.d_G}, {self.d_A}), got {getattr(mat, 'shape', None)}")

