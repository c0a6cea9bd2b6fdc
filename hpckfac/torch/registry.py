"""Which curvature block a PyTorch module gets: ``register_layer`` and the built-in kinds.

A *builder* takes ``(name, module)`` and returns an
``hpckfac.layers.CurvatureBlock`` for that module (or None: no curvature for
this instance, e.g. a BatchNorm without affine parameters); raising ValueError
keeps the module first-order with the message as the reason. Lookup follows
the module's class hierarchy, so a subclass of a registered type gets its
parent's builder unless it has its own. The block covers the module's
``weight`` and, when present, ``bias`` (other attribute names: ``params``).

Built in: ``Linear``, ``Conv1d/2d/3d`` (groups included), ``ConvTranspose1d/2d/3d``,
``BatchNorm1d/2d/3d``, ``LayerNorm``, ``RMSNorm`` (torch >= 2.4), ``GroupNorm``,
``InstanceNorm1d/2d/3d``, ``Embedding``, ``PReLU`` and ``MultiheadAttention`` (its packed
``in_proj_weight``/``in_proj_bias`` as one ``E -> 3E`` Linear map on the query, taken from
self-attention calls; its ``out_proj`` is a Linear, and ``hpckfac.torch.attention`` says how
the hooks see both). A type of your own that computes one of these
(Hugging Face's GPT-2 ``Conv1D`` is a Linear with an ``(in, out)`` weight) is one call::

    from hpckfac.layers import LinearBlock
    from hpckfac.torch import register_layer
    from transformers.pytorch_utils import Conv1D

    register_layer(Conv1D, lambda name, m: LinearBlock(
        name, m.weight.shape[0], m.weight.shape[1], bias=m.bias is not None, transposed=True))
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from hpckfac.layers import (BatchNormBlock, ConvBlock, ConvTransposeBlock, CurvatureBlock, EmbeddingBlock,
                            GroupNormBlock, InstanceNormBlock, LayerNormBlock, LinearBlock, PReLUBlock,
                            RMSNormBlock)

Builder = Callable[[str, nn.Module], "CurvatureBlock | None"]


class _Kind(NamedTuple):
    build: Builder
    broadcast_batch: bool
    params: tuple[str, str | None]


_BUILDERS: dict[type, _Kind] = {}


def register_layer(module_type: type, build: Builder, *, broadcast_batch: bool = False,
                   params: tuple[str, str | None] = ("weight", "bias")) -> None:
    """Precondition modules of ``module_type`` (and its subclasses) with the block ``build(name, module)``
    returns. Register before constructing the ``KFACPreconditioner``, identically on every rank.

    ``params``: the names of the module's attributes holding the parameters the block
    covers, in the block's order ``(weight, bias)``; the bias name may be None, and a
    module whose bias attribute is None has none.

    ``broadcast_batch``: a call whose input has batch size 1 while the micro-batch
    has ``B > 1`` examples (position ids shared by the whole batch) is taken as
    that input broadcast to all ``B`` examples: the module's output is returned
    expanded to batch ``B`` (the same values, as a view), so that each example's
    own output gradient reaches the statistics. Right for outputs that are
    added to per-example tensors, as position embeddings are; the Embedding
    registration sets it.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ValueError(f"module_type: expected a torch.nn.Module subclass, got {module_type!r}")
    if not callable(build):
        raise ValueError(f"build: expected a callable (name, module) -> CurvatureBlock, got {build!r}")
    if not (isinstance(params, tuple) and len(params) == 2 and isinstance(params[0], str)
            and (params[1] is None or isinstance(params[1], str))):
        raise ValueError(f"params: expected (weight name, bias name or None), got {params!r}")
    _BUILDERS[module_type] = _Kind(build, bool(broadcast_batch), params)


def _entry(module: nn.Module) -> _Kind | None:
    return next((_BUILDERS[t] for t in type(module).__mro__ if t in _BUILDERS), None)


def block_for(name: str, module: nn.Module) -> CurvatureBlock | None:
    """The curvature block of ``module`` (None: no registered kind); ValueError
    with the reason when its kind cannot precondition this instance."""
    entry = _entry(module)
    if entry is not None:
        computed = [n for n in entry.params if n is not None and parametrize.is_parametrized(module, n)]
        if computed:
            raise ValueError(f"{'/'.join(computed)} computed by a parametrization (torch.nn.utils.parametrize, e.g. "
                             "weight_norm, spectral_norm): the trained parameters are its inputs, not the "
                             "layer's weight, and are only averaged")
        # The deprecated torch.nn.utils.weight_norm sets the weight in a forward pre-hook, from its
        # weight_g and weight_v, as a plain tensor: otherwise a mismatch of shapes "None" is all that
        # would be said.
        plain = [n for n in entry.params if n is not None and isinstance(getattr(module, n, None), torch.Tensor)
                 and not isinstance(getattr(module, n), nn.Parameter)]
        if plain:
            raise ValueError(f"{'/'.join(plain)} is a tensor, not a parameter of the layer (computed from "
                             "other parameters in forward, as by the deprecated torch.nn.utils.weight_norm, or "
                             "a buffer): the layer's parameters are only averaged")
    block = None if entry is None else entry.build(name, module)
    if block is None:
        return None
    if not isinstance(block, CurvatureBlock):
        raise ValueError(f"the builder registered for {type(module).__name__} returned {block!r}, "
                         f"not an hpckfac.layers.CurvatureBlock")
    shapes = tuple(None if p is None else tuple(p.shape) for p in block_params(module))
    if shapes != tuple(None if s is None else tuple(s) for s in block.param_shapes):
        names = entry.params
        raise ValueError(f"the block's parameter shapes {block.param_shapes} do not match the module's "
                         f"{names[0]}/{names[1]} {shapes}")
    return block


def param_names(module: nn.Module) -> tuple[str, str | None]:
    """The attribute names of the parameters the block of ``module`` covers, ``(weight, bias)``,
    as its kind was registered (``("weight", "bias")`` for a module of no registered kind)."""
    entry = _entry(module)
    return ("weight", "bias") if entry is None else entry.params


def block_params(module: nn.Module, names: tuple[str, str | None] | None = None
                 ) -> tuple[nn.Parameter | None, nn.Parameter | None]:
    """The parameters the block of ``module`` covers, ``(weight, bias)`` (None where absent),
    from the attribute ``names`` (default ``param_names(module)``: a caller reading them every
    step passes the names it looked up once)."""
    weight_name, bias_name = param_names(module) if names is None else names
    weight = getattr(module, weight_name, None)
    bias = None if bias_name is None else getattr(module, bias_name, None)
    return (weight if isinstance(weight, nn.Parameter) else None, bias if isinstance(bias, nn.Parameter) else None)


def broadcasts_batch(module: nn.Module) -> bool:
    """Whether ``module``'s kind was registered with ``broadcast_batch``."""
    entry = _entry(module)
    return entry is not None and entry.broadcast_batch


def conv_padding(module: nn.Module) -> tuple[int, ...]:
    """Explicit zero padding of a convolution, also for ``padding="valid"`` and ``"same"``
    (stride 1; ValueError where "same" pads one side more than the other)."""
    if not isinstance(module.padding, str):
        return tuple(module.padding)
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    totals = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
    if any(t % 2 for t in totals):
        raise ValueError("padding: 'same' with an even (dilated) kernel pads one side more than the other, "
                         "which im2col does not model")
    return tuple(t // 2 for t in totals)


def _zeros_padding(module: nn.Module) -> None:
    if module.padding_mode != "zeros":
        raise ValueError(f"padding_mode: {module.padding_mode!r} padding is not supported (zeros only)")


def _linear(name: str, module: nn.Linear) -> LinearBlock:
    return LinearBlock(name, module.in_features, module.out_features, bias=module.bias is not None)


def _attention(name: str, module: nn.MultiheadAttention) -> LinearBlock:
    """The in-projection of self-attention, one ``E -> 3E`` linear map on the query (its
    ``out_proj`` is an ``nn.Linear`` of its own); the hooks see it through
    ``hpckfac.torch.attention``."""
    if not module._qkv_same_embed_dim:
        raise ValueError("kdim/vdim differ from embed_dim: the query, key and value projections are separate "
                         "weights (q_proj_weight, k_proj_weight, v_proj_weight) on inputs of other widths, "
                         "which one Kronecker pair does not describe (out_proj is preconditioned)")
    embed = module.embed_dim
    return LinearBlock(name, embed, 3 * embed, bias=module.in_proj_bias is not None)


def _conv(name: str, module: nn.modules.conv._ConvNd) -> ConvBlock:
    _zeros_padding(module)
    return ConvBlock(name, module.in_channels, module.out_channels, module.kernel_size, module.stride,
                     conv_padding(module), module.dilation, bias=module.bias is not None, groups=module.groups)


def _conv_transpose(name: str, module: nn.modules.conv._ConvTransposeNd) -> ConvTransposeBlock:
    _zeros_padding(module)
    return ConvTransposeBlock(name, module.in_channels, module.out_channels, module.kernel_size, module.stride,
                              module.padding, module.output_padding, module.dilation,
                              bias=module.bias is not None, groups=module.groups)


def _batchnorm(name: str, module: nn.modules.batchnorm._BatchNorm) -> BatchNormBlock | None:
    return BatchNormBlock(name, module.num_features, module.eps) if module.affine else None


def _layernorm(name: str, module: nn.LayerNorm) -> LayerNormBlock | None:
    if not module.elementwise_affine:
        return None
    return LayerNormBlock(name, module.normalized_shape, module.eps, bias=module.bias is not None)


def _rmsnorm(name: str, module: nn.RMSNorm) -> RMSNormBlock | None:
    return RMSNormBlock(name, module.normalized_shape, module.eps) if module.elementwise_affine else None


def _groupnorm(name: str, module: nn.GroupNorm) -> GroupNormBlock | None:
    return GroupNormBlock(name, module.num_groups, module.num_channels, module.eps) if module.affine else None


def _instancenorm(spatial_dims: int) -> Builder:
    """The builder of ``nn.InstanceNorm{spatial_dims}d`` (affine only)."""
    def build(name: str, module: nn.Module) -> InstanceNormBlock | None:
        return InstanceNormBlock(name, module.num_features, module.eps, spatial_dims) if module.affine else None
    return build


def _embedding(name: str, module: nn.Embedding) -> EmbeddingBlock:
    if module.sparse:
        raise ValueError("sparse: sparse gradients are not supported (use sparse=False)")
    if module.scale_grad_by_freq:
        # Each row's gradient is divided by the token's count in the micro-batch: not a sum of
        # per-example gradients, so no per-example Fisher describes it.
        raise ValueError("scale_grad_by_freq: the gradient is divided by each token's count in the batch, "
                         "which the per-example statistics of K-FAC do not model")
    return EmbeddingBlock(name, module.num_embeddings, module.embedding_dim, module.padding_idx)


def _prelu(name: str, module: nn.PReLU) -> PReLUBlock:
    return PReLUBlock(name, module.num_parameters)


for _type, _build in ((nn.Linear, _linear), (nn.Conv1d, _conv), (nn.Conv2d, _conv), (nn.Conv3d, _conv),
                      (nn.ConvTranspose1d, _conv_transpose), (nn.ConvTranspose2d, _conv_transpose),
                      (nn.ConvTranspose3d, _conv_transpose), (nn.modules.batchnorm._BatchNorm, _batchnorm),
                      (nn.LayerNorm, _layernorm), (nn.GroupNorm, _groupnorm), (nn.InstanceNorm1d, _instancenorm(1)),
                      (nn.InstanceNorm2d, _instancenorm(2)), (nn.InstanceNorm3d, _instancenorm(3)),
                      (nn.PReLU, _prelu)):
    register_layer(_type, _build)
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    register_layer(nn.RMSNorm, _rmsnorm)
register_layer(nn.Embedding, _embedding, broadcast_batch=True)
register_layer(nn.MultiheadAttention, _attention, params=("in_proj_weight", "in_proj_bias"))
