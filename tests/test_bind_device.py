"""bind_device's rank -> GPU choice on simulated nodes (no GPU needed)."""
import sys
import types

import pytest
import torch

from hpckfac.torch import bind_device


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
