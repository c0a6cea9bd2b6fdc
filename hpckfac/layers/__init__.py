"""Curvature blocks: what K-FAC knows about each layer kind, on arrays.

Every block implements ``CurvatureBlock`` (``hpckfac.layers.block``): its
statistics and their packing, its gradient layout, its cost and how it is
solved. Kronecker blocks (``KronBlock``: ``LinearBlock``, ``ConvBlock``,
``ConvTransposeBlock``, one pair per group) precondition ``G^-1 grad A^-1``;
unit-wise blocks (``UnitWiseBlock``: ``BatchNormBlock``, ``LayerNormBlock``,
``RMSNormBlock``, ``GroupNormBlock``, ``InstanceNormBlock``) hold a small Fisher per unit of a normalisation layer;
``EmbeddingBlock`` has a diagonal ``A``; ``PReLUBlock`` holds the full Fisher of a PReLU's
slopes. ``pi_damping`` splits the Tikhonov damping between two factors. Blocks take NumPy arrays (CuPy arrays on the GPU
path) and know nothing of PyTorch modules. Conventions: docs/design.md "Math
conventions" and docs/curvature.md.
"""
from hpckfac.layers.batchnorm import BatchNormBlock
from hpckfac.layers.block import CurvatureBlock
from hpckfac.layers.conv import ConvBlock
from hpckfac.layers.conv_transpose import ConvTransposeBlock
from hpckfac.layers.damping import pi_damping, pi_damping_terms
from hpckfac.layers.embedding import EmbeddingBlock
from hpckfac.layers.groupnorm import GroupNormBlock
from hpckfac.layers.instancenorm import InstanceNormBlock
from hpckfac.layers.kron import KronBlock
from hpckfac.layers.layernorm import LayerNormBlock
from hpckfac.layers.linear import LinearBlock
from hpckfac.layers.prelu import PReLUBlock
from hpckfac.layers.rmsnorm import RMSNormBlock
from hpckfac.layers.unitwise import UnitWiseBlock

__all__ = ["CurvatureBlock", "KronBlock", "LinearBlock", "ConvBlock", "ConvTransposeBlock", "UnitWiseBlock",
           "BatchNormBlock", "LayerNormBlock", "RMSNormBlock", "GroupNormBlock", "InstanceNormBlock", "EmbeddingBlock",
           "PReLUBlock", "pi_damping", "pi_damping_terms"]
