"""bind_device's rank -> GPU choice on simulated nodes (no GPU needed)."""
import sys
import types

import pytest
import torch

from hpckfac.torch import bind_device
from hpckfac.torch.device import model_device


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this rank sees ``count`` GPUs; returns the indices set current. The simulated
    node has no CuPy: on a machine with CuPy and fewer GPUs, bind_device would make CuPy use
    a device that does not exist (an invalid device ordinal)."""
    current = []
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy: ImportError

    def see(count):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", current.append)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU{i}")
        return current
    return see


def node(local_rank, local_size):
    return types.SimpleNamespace(local_rank=local_rank, local_size=local_size)


def test_all_gpus_visible_one_rank_each(gpus, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus(4)
    assert [bind_device("cuda", node(r, 4)).index for r in range(4)] == [0, 1, 2, 3]


@pytest.mark.parametrize("visible, warned", [(None, True), ("0,1", True), ("3", False)])
def test_sharing_warning(gpus, monkeypatch, caplog, visible, warned):
    """More ranks than GPUs is said once per node, unless the launcher gave each rank its own GPU."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    count = 1 if visible is None else len(visible.split(","))
    gpus(count)
    with caplog.at_level("WARNING", logger="hpckfac"):
        indices = [bind_device("cuda", node(r, 4)).index for r in range(4)]
    assert indices == [r % count for r in range(4)]
    assert caplog.text.count("ranks on this node share") == warned


def test_no_gpu(gpus):
    gpus(0)
    assert bind_device("auto", node(0, 2)) == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no GPU"):
        bind_device("cuda", node(0, 2))


@pytest.mark.parametrize("device", ["cuda:2", torch.device("cuda", 2)])
def test_an_explicit_index_is_that_gpu_whatever_the_local_rank(gpus, device):
    current = gpus(3)
    assert [bind_device(device, node(r, 3)) for r in range(3)] == [torch.device("cuda", 2)] * 3
    assert current == [2, 2, 2]


@pytest.mark.parametrize("device", ["cuda:3", torch.device("cuda", 3)])
def test_an_index_past_the_visible_gpus_is_refused(gpus, device):
    current = gpus(3)
    with pytest.raises(ValueError, match=r"device: .* but only 3 GPU\(s\) are visible"):
        bind_device(device, node(0, 1))
    assert current == []


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_the_cpu_is_chosen_beside_visible_gpus(gpus, device):
    current = gpus(2)
    assert bind_device(device, node(1, 2)) == torch.device("cpu")
    assert current == []


def test_none_is_auto(gpus):
    current = gpus(2)
    assert bind_device(None, node(1, 2)) == torch.device("cuda", 1)
    assert current == [1]


@pytest.mark.parametrize("device, message", [
    ("gpu", r"device: expected one of \('auto', 'cuda', 'cpu'\), 'cuda:N' or a torch.device, got 'gpu'"),
    (3.5, r"device: expected one of .* got 3.5"),
    ("meta", r"device: meta is not supported; hpckfac runs on cpu and cuda devices"),
    (torch.device("meta"), r"device: meta is not supported"),
])
def test_unknown_devices_are_refused_naming_them(gpus, device, message):
    current = gpus(2)
    with pytest.raises(ValueError, match=message):
        bind_device(device, node(0, 1))
    assert current == []


def test_model_device_is_the_one_device_of_the_parameters():
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters
    assert model_device(torch.nn.Linear(2, 3, device="meta")) == torch.device("meta")
    spread = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1, device="meta"))
    with pytest.raises(ValueError, match=r"model: parameters on several devices \['cpu', 'meta'\]"):
        model_device(spread)
