"""Packaging for hpckfac: distributed K-FAC over MPI with CUDA kernels."""
from setuptools import setup

PACKAGES = [
    "hpckfac",
    "hpckfac.comm",
    "hpckfac.ops",
    "hpckfac.layers",
    "hpckfac.stages",
    "hpckfac.torch",
    "hpckfac.bench",
    "hpckfac.train",
    "hpckfac.kernels",
]

setup(
    name="hpckfac",
    version="0.1.0",
    description="Distributed K-FAC natural-gradient training over MPI (Osawa et al. 2018)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    # The CUDA sources live in the top-level kernels/ folder and ship inside the
    # installed package as hpckfac.kernels, so CuPy finds them after `pip install .`.
    package_dir={"hpckfac.kernels": "kernels"},
    package_data={"hpckfac.kernels": ["*.cu", "*.cuh"], "hpckfac.train": ["data/*.npz"]},
    install_requires=[
        "numpy>=1.24",
        "mpi4py>=3.1",
        # Never pinned here: clusters bring their own CUDA build of torch.
        "torch>=2.1",
        "ml_dtypes>=0.3",
        "tqdm>=4.60",
        "threadpoolctl>=3",
        "matplotlib>=3.6",
    ],
    extras_require={
        "mpi": ["mpich"],
        # CuPy for the CUDA major version of the machine's driver and torch build: v14 and later
        # (bfloat16 arrays through ml_dtypes, which bf16 models' buffers are; it needs NumPy 2.1.2+).
        "cuda12": ["cupy-cuda12x>=14", "numpy>=2.1.2"],
        "cuda13": ["cupy-cuda13x>=14", "numpy>=2.1.2"],
        # transformers: the Hugging Face BERT and GPT-2 coverage tests (skipped without it).
        # setuptools: tests/test_packaging.py builds a wheel without build isolation, with the
        # environment's setuptools, which builds wheels by itself from 70.1 on (before, only with
        # the `wheel` package). A venv of Python 3.12+ has no setuptools and 3.10/3.11's is 65.5;
        # torch 2.13 requires a newer one, an older torch may not.
        "test": ["pytest>=7", "pytest-mpi>=0.6", "transformers>=4.40", "setuptools>=70.1"],
    },
    entry_points={"console_scripts": ["hpckfac=hpckfac.cli:main"]},
)
