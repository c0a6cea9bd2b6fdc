"""Curvature blocks: what K-FAC knows about each layer kind, on arrays.

``LinearBlock`` and ``ConvBlock`` (``KronBlock`` subclasses) turn a layer's
captured input ``a`` and per-example output gradients ``g`` into the
Kronecker factors ``A`` and ``G`` and precondition its gradient as
``G^-1 grad A^-1``; ``BatchNormBlock`` holds per-channel 2x2 Fishers of
``(gamma, beta)``; ``pi_damping`` splits the Tikhonov damping between the
factors. Blocks take NumPy arrays (CuPy arrays on the GPU path) and know
nothing of PyTorch modules. Conventions: docs/design.md "Math conventions" and
docs/curvature.md.
"""
from hpckfac.layers.base import KronBlock
from hpckfac.layers.batchnorm import BatchNormBlock
from hpckfac.layers.conv import ConvBlock
from hpckfac.layers.damping import damped_kron_inverses, pi_damping, pi_damping_terms
from hpckfac.layers.linear import LinearBlock

__all__ = ["KronBlock", "LinearBlock", "ConvBlock", "BatchNormBlock", "pi_damping", "pi_damping_terms",
           "damped_kron_inverses"]
