"""``CurvatureBlock``: what the pipeline knows about one layer's curvature.

A block describes one layer's Fisher approximation entirely through this
interface, so that the stages, the owner assignment and the torch bridge never
ask what kind of layer it is:

- **statistics** (stage 1): ``add_input`` and ``add_output_grad`` add one
  forward/backward call's contribution to the block's packed statistics, a 1-D
  buffer of ``stat_size`` elements laid out as ``factor_shapes`` says: for each
  entry ``(count, n)``, ``count`` symmetric ``n x n`` matrices, upper triangles
  in ``hpckfac.ops.pack_sym`` order, one after another;
- **gradient layout**: ``grad_matrix`` turns the parameter gradients into one
  ``grad_shape`` matrix, the unit the collectives carry; ``split_matrix``
  turns it back;
- **cost** for the owner assignment (``cost``: inversion work) and the
  performance model (``precondition_flops``);
- **solving** (stage 3): ``factors`` unpacks the statistics into matrix stacks,
  ``damping`` gives each matrix its damping, ``hpckfac.ops.damped_inverse``
  inverts them (the owner batches same-order matrices of all its blocks into
  one call), and ``precondition`` applies the inverses to a gradient matrix.
  ``solve`` chains the three for one block; the pipeline runs the same steps.

Blocks work on NumPy arrays, or CuPy arrays on the GPU path, and know nothing
of PyTorch modules: ``hpckfac.torch.register_layer`` maps module types to
blocks.
"""
from __future__ import annotations

import abc
import math
from functools import cached_property
from typing import Any, Hashable, Iterable, Sequence

import numpy as np

from hpckfac import arrays, ops
from hpckfac.ops.packing import pack_upper, sym_gather, triu_flat, unpack_upper
from hpckfac.arrays import namespace as array_module

# A NumPy array, or a CuPy array on the GPU path.
Array = Any


def prod(values: Iterable[int]) -> int:
    """Product of integers (1 for none)."""
    return math.prod(int(v) for v in values)


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


def check_shape(x: Any, shape: tuple[int, ...], name: str) -> None:
    """ValueError naming ``name`` unless ``x`` has exactly ``shape``."""
    if tuple(getattr(x, "shape", ())) != tuple(shape) or not hasattr(x, "shape"):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {getattr(x, 'shape', None)}")


# Gather indices of orders up to this are kept on the device (a few KiB each); larger device
# stacks go through the packing kernels instead, so nothing of size n^2 stays cached.
DEVICE_INDEX_MAX_N = 64


def _gather_index(n: int, packing: bool, xp) -> Array:
    """Packing: the flat index of each packed element (``triu_flat``); unpacking: the packed
    index of each dense element (``sym_gather``); as an ``xp`` array (uploaded once per order
    and device)."""
    index = triu_flat(n) if packing else sym_gather(n)
    return arrays.constant(index, xp, ("packed gather", n, packing))


def pack_stack(mats: Array) -> Array:
    """Upper triangles of a ``(count, n, n)`` stack, matrix after matrix (``pack_sym`` order), 1-D."""
    xp = array_module(mats)
    count, n = mats.shape[0], mats.shape[-1]
    if xp is np:
        return pack_upper(mats)
    if n > DEVICE_INDEX_MAX_N:
        return ops.pack_sym([mats[k] for k in range(count)])
    # One gather with a single index array: much less host work than indexing by (rows, cols).
    return xp.take(mats.reshape(count, n * n), _gather_index(n, True, xp), axis=1).reshape(-1)


def unpack_stack(packed: Array, count: int, n: int, out: Array | None = None) -> Array:
    """The ``(count, n, n)`` symmetric stack whose upper triangles ``packed`` holds, in its dtype;
    written into ``out`` (C-contiguous, of that shape and dtype) and returned when given."""
    xp = array_module(packed)
    if xp is np:
        return unpack_upper(packed, count, n, out)
    if out is not None and not out.flags.c_contiguous:  # a reshape of it would be a copy, lost
        raise ValueError("out: expected a C-contiguous array")
    if n > DEVICE_INDEX_MAX_N:
        mats = ops.unpack_sym(packed, [n] * count)
        if out is None:
            return mats[0][None] if count == 1 else xp.stack(mats)
        for k, mat in enumerate(mats):
            out[k] = mat
        return out
    index = _gather_index(n, False, xp)
    if out is None:
        return xp.take(packed.reshape(count, -1), index, axis=1).reshape(count, n, n)
    xp.take(packed.reshape(count, -1), index, axis=1, out=out.reshape(count, n * n))
    return out


class CurvatureBlock(abc.ABC):
    """One layer's curvature: statistics, gradient layout, cost, solve (module docstring).

    Subclasses set ``name`` and implement the abstract members. ``uses_sample``
    says whether the statistics may come from a sub-sample of the micro-batch
    (``statistics_fraction``); blocks whose statistics depend on the whole
    batch (BatchNorm) set it False. ``averages_positions`` says whether the
    output-gradient statistics average over an example's positions (KFC's
    ``G``): then a layer that sees its micro-batch flattened to ``k`` rows per
    example, ``(batch * k, ...)``, weights them by ``1/k``, so that its factors
    are those of the unflattened layer. ``feature_axes`` is None, or the number of
    trailing feature axes of the layer's input and of its output when every axis
    before them is the batch or a position (Linear, Embedding, LayerNorm; not a
    convolution, whose axis 1 is channels): then a sequence-first input
    ``(positions, batch, ..., features)``, PyTorch's ``batch_first=False``, can be
    read batch-first.
    """

    name: str
    uses_sample: bool = True
    averages_positions: bool = False
    feature_axes: tuple[int, int] | None = None

    # ------------------------------------------------------------------ shapes
    @property
    @abc.abstractmethod
    def factor_shapes(self) -> tuple[tuple[int, int], ...]:
        """``(count, n)`` per matrix stack of the statistics, in packed order."""

    @property
    @abc.abstractmethod
    def param_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """Shapes of the layer's weight and bias (None without a bias)."""

    @property
    @abc.abstractmethod
    def grad_shape(self) -> tuple[int, int]:
        """Shape of the gradient matrix the pipeline carries for this block."""

    # Read for every block at every step by the buffer layout and the stages: computed once
    # (a block's shapes do not change after construction).
    @cached_property
    def stat_size(self) -> int:
        """Elements of the packed statistics."""
        return sum(count * n * (n + 1) // 2 for count, n in self.factor_shapes)

    @cached_property
    def grad_size(self) -> int:
        """Elements of the gradient matrix."""
        return prod(self.grad_shape)

    @property
    def inverse_shapes(self) -> list[tuple[int, int, int]]:
        """Shapes of the inverses ``solve`` and the owner keep: ``(count, n, n)`` per stack."""
        return [(count, n, n) for count, n in self.factor_shapes]

    def cost(self) -> float:
        """Inversion work, ``sum count * n^3`` over the stacks: the owner assignment's cost."""
        return float(sum(count * n ** 3 for count, n in self.factor_shapes))

    def precondition_flops(self) -> float:
        """Flops of ``precondition``: each stack's inverses multiply the gradient once."""
        return float(2 * self.grad_size * sum(n for _, n in self.factor_shapes))

    def describe(self) -> str:
        """One line for ``print(preconditioner)``: the matrices this block inverts."""
        return ", ".join(f"{count} x {n}x{n}" if count > 1 else f"{n}x{n}" for count, n in self.factor_shapes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, {self.describe()})"

    # -------------------------------------------------------------- statistics
    @property
    def input_key(self) -> Hashable | None:
        """Blocks with equal keys (not None) add the same input part for the same input:
        ``add_input`` is ``add_input_part(stats, input_part(a))``, and one part serves every
        such block that takes the same input (a transformer's query, key and value
        projections of one hidden state). None: the block's part is its own."""
        return None

    @abc.abstractmethod
    def add_input(self, stats: Array, a: Array) -> Any:
        """Add the contribution of the layer input ``a`` of one call to ``stats``;
        return what ``add_output_grad`` of the same call needs (None if nothing)."""

    @abc.abstractmethod
    def add_output_grad(self, stats: Array, g: Array, scale: float, saved: Any) -> None:
        """Add ``scale`` times the contribution of the per-example output gradients
        ``g`` of one call to ``stats`` (``saved``: what ``add_input`` returned)."""

    def statistics(self, a: Array, g: Array, scale: float = 1.0) -> Array:
        """Packed statistics of one call, ``scale`` applied to every part (``1/B`` gives
        the block's curvature for a batch of ``B``); float32, or float64 for float64 ``a``/``g``."""
        # The wider of the two accumulation dtypes, without a promotion of the inputs' own: NumPy has
        # none for bfloat16 (no float kind to it) with float16, and an integer a (token indices) has no say.
        dtype = np.result_type(*[ops.checks.accumulation_dtype(x.dtype) for x in (a, g)])
        stats = array_module(g).zeros(self.stat_size, dtype=dtype)
        saved = self.add_input(stats, a)
        self.add_output_grad(stats, g, 1.0, saved)
        stats *= scale
        return stats

    # --------------------------------------------------------------- gradients
    @abc.abstractmethod
    def grad_matrix(self, weight_grad: Array, bias_grad: Array | None = None, out: Array | None = None) -> Array:
        """The ``grad_shape`` matrix of the parameter gradients; written into ``out`` (a
        ``grad_shape`` array, cast to its dtype) and returned when given, which saves the
        engine a copy (``KFACEngine.gradient_slots``)."""

    @abc.abstractmethod
    def split_matrix(self, mat: Array) -> tuple[Array, Array | None]:
        """Inverse of ``grad_matrix``: (weight-shaped array, bias-shaped array or None)."""

    def _check_params(self, weight_grad: Array, bias_grad: Array | None) -> None:
        weight_shape, bias_shape = self.param_shapes
        check_shape(weight_grad, weight_shape, "weight_grad")
        if bias_shape is None:
            if bias_grad is not None:
                raise ValueError(f"bias_grad: block {self.name!r} has no bias")
        else:
            check_shape(bias_grad, bias_shape, "bias_grad")

    # ------------------------------------------------------------------- solve
    def factors(self, stats: Array, out: Sequence[Array] | None = None) -> list[Array]:
        """The symmetric ``(count, n, n)`` stacks held in the packed ``stats``, in its dtype;
        written into ``out`` (one C-contiguous array per stack, of its shape and that dtype)
        when given, which spares the owner a copy of every stack into its batch."""
        check_shape(stats, (self.stat_size,), "stats")
        stacks, at = [], 0
        for slot, (count, n) in enumerate(self.factor_shapes):
            size = count * n * (n + 1) // 2
            stacks.append(unpack_stack(stats[at:at + size], count, n, None if out is None else out[slot]))
            at += size
        return stacks

    @abc.abstractmethod
    def damping(self, factors: Sequence[Array], damping: float) -> list[Array]:
        """Damping of every matrix of ``factors``: one ``(count,)`` float64 array per stack,
        in the factors' namespace (formed there, without a read-back to the host)."""

    @abc.abstractmethod
    def precondition(self, grad: Array, inverses: Sequence[Array]) -> Array:
        """The preconditioned ``grad_shape`` gradient, from the damped ``inverses``."""

    @property
    def batch_key(self) -> Hashable | None:
        """Blocks with the same key (not None) can be preconditioned together by
        ``precondition_batch``: one batched product for all of them instead of a few
        small ones each (on a GPU, each costs a launch). None: this block alone."""
        return None

    def precondition_batch(self, grads: Array, inverses: Sequence[Array]) -> Array:
        """``precondition`` of consecutive blocks sharing this block's ``batch_key``, at once.

        ``grads``: their gradient matrices flattened and concatenated (1-D); ``inverses[s]``:
        their stack ``s`` of inverses concatenated along the first axis. Returns the
        preconditioned gradients, flattened and concatenated the same way, equal to each
        block's ``precondition``. The owner calls it only for kinds with a ``batch_key``, and
        those implement it."""
        raise NotImplementedError(f"{type(self).__name__}: a kind with a batch_key implements precondition_batch")

    def precondition_batch_into(self, grads: Array, inverses: Sequence[Array], out: Array) -> None:
        """``precondition_batch`` written into ``out`` (contiguous, 1-D, as long as ``grads``;
        cast to its dtype), as the owner calls it. A kind whose product can write there
        directly overrides it to skip the copy."""
        out[...] = self.precondition_batch(grads, inverses)

    def outside_statistics(self, stats: Array, grad: Array) -> Array | None:
        """Whether the gradient matrix ``grad`` has parts that the layer's own calls, summed up
        in ``stats``, cannot have produced: a sign that something else reads the weight (an
        output head tied through ``F.linear``, a penalty on the weight in the loss), whose share
        of the gradient this block's curvature does not describe. A 0-d boolean array in
        ``grad``'s namespace (read by the caller, once for all blocks), or None where the kind
        cannot tell cheaply (the default)."""
        return None

    def inverses(self, stats: Array, damping: float) -> list[Array]:
        """Damped inverses of the block's factors (one ``damped_inverse`` call per stack)."""
        stacks = self.factors(stats)
        return [ops.damped_inverse(mats, damp).inverse for mats, damp in zip(stacks, self.damping(stacks, damping))]

    def solve(self, stats: Array, grad: Array, damping: float) -> Array:
        """``precondition(grad, inverses(stats, damping))``: the block's natural gradient."""
        check_shape(grad, self.grad_shape, "grad")
        return self.precondition(grad, self.inverses(stats, damping))
