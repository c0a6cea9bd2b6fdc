"""CUDA C++ sources of hpckfac's GPU kernels, shipped as package data."""
from importlib import resources


def source(name: str) -> str:
    """Return the text of the CUDA source file ``name`` (e.g. ``"pack.cu"``)."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def names() -> list[str]:
    """Names of all CUDA source files shipped with the package."""
    return sorted(p.name for p in resources.files(__name__).iterdir() if p.name.endswith(".cu"))
