"""Benchmarks: ``python -m hpckfac.bench {comm,step,kernels,convergence,scaling,model}``."""
