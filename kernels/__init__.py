"""CUDA C++ sources of hpckfac's GPU kernels, shipped as package data.

``hpckfac.ops.cuda_module`` reads them from here in an installed package, or
from the ``kernels/`` folder of a checkout.
"""
