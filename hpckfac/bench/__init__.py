"""Benchmarks: ``python -m hpckfac.bench {comm,step,conv,kernels,convergence,scaling,model}``."""
