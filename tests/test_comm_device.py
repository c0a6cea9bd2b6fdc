"""CUDA-aware MPI detection of hpckfac.comm.device (runs without a GPU)."""
import importlib

import pytest

from hpckfac.comm import device


@pytest.fixture(autouse=True)
def fresh_detection():
    device.cuda_aware_mpi.cache_clear()
    yield
    device.cuda_aware_mpi.cache_clear()


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False)])
def test_environment_forces_the_answer(monkeypatch, value, expected):
    monkeypatch.setenv(device.CUDA_AWARE_ENV, value)
    assert device.cuda_aware_mpi() is expected


def test_invalid_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(device.CUDA_AWARE_ENV, "yes")
    with pytest.raises(ValueError, match=device.CUDA_AWARE_ENV):
        device.cuda_aware_mpi()


def test_query_of_the_loaded_mpi(monkeypatch):
    monkeypatch.delenv(device.CUDA_AWARE_ENV, raising=False)
    importlib.import_module("mpi4py.MPI")

    assert device._loaded_mpi_libraries(), "the MPI library should be mapped once mpi4py is imported"
    assert isinstance(device.cuda_aware_mpi(), bool)
