"""``python -m hpckfac.bench kernels``: a clear refusal without a GPU, a
complete table and JSON with one."""
import json

import pytest

from gpu_helpers import DEVICES, requires_gpu
from hpckfac.bench import kernels


@pytest.mark.skipif(DEVICES > 0, reason="checks the behaviour on machines without a CUDA device")
def test_refuses_without_gpu(capsys):
    assert kernels.main(["--repeat", "1"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_rejects_invalid_repeat():
    with pytest.raises(SystemExit):
        kernels.main(["--repeat", "0"])


@pytest.mark.parametrize("wins, want", [
    ([True, True, True, True], 64), ([True, True, False, True], 16), ([False, True, True, True], 0),
    ([True, False, False, False], 2), ([], 0)])
def test_the_kernel_limit_is_the_last_size_of_its_first_run_of_wins(wins, want):
    """CHOLESKY_KERNEL_MAX_N as measured: the kernel serves every n up to it, so a win after a
    loss (here at 64 after the loss at 32) does not raise it."""
    assert kernels.last_winning_size([2, 16, 32, 64][:len(wins)], wins) == want


@requires_gpu
def test_runs_and_writes_json(tmp_path, capsys):
    rows = kernels.bench_factors(1, shape_list=((300, 70),))
    assert {r["dtype"] for r in rows} == set(kernels.FACTOR_DTYPES)
    # Device-event and synchronised-call times of the same calls: both positive, finite.
    assert all(0 < r["ours_ms"] < 1e4 and 0 < r["ours_call_ms"] < 1e4 for r in rows)
    sweep, switch = kernels.bench_factor_crossover(1, widths=(64, 128), rows=300)
    assert len(sweep) == 4 and set(switch) == set(kernels.CROSSOVER_DTYPES)
    assert all(d in (None, 64, 128) for d in switch.values())
    cholesky, crossover = kernels.bench_cholesky(1, sizes=(2, 16))
    assert len(cholesky) == 2 and crossover in (0, 2, 16)
    path = tmp_path / "kernels.json"
    assert kernels.main(["--repeat", "1", "--only", "pack", "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "kernels" and len(payload["results"]["pack"]) == 4
    assert payload["results"]["device"]["gpu"]
    assert "pack fp32->float16" in capsys.readouterr().out


def test_peak_device_bytes_is_none_on_the_cpu():
    import torch

    from hpckfac.bench.memory import peak_device_bytes

    assert peak_device_bytes(torch.device("cpu")) is None


@requires_gpu
def test_peak_device_bytes_counts_torch_and_cupy_allocations():
    import cupy
    import torch

    from hpckfac.bench.memory import peak_device_bytes

    device = torch.device("cuda", 0)
    kept = (torch.empty(2**22, dtype=torch.uint8, device=device), cupy.empty(2**22, dtype=cupy.uint8))
    held = torch.cuda.memory_allocated(device) + cupy.get_default_memory_pool().used_bytes()
    assert peak_device_bytes(device) >= held >= 2 * 2**22
    del kept
