"""sync_batchnorm_stats weighted by each rank's examples: the float64 weighted mean of the
ranks' running statistics, a rank without examples left out, bad weights refused on every
rank with the statistics unchanged."""
import pytest
import torch
from torch import nn

from hpckfac.comm import CollectiveMismatchError
from hpckfac.torch import sync_batchnorm_stats


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (and CuPy)")


def _model(rank: int, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    """Two BatchNorms whose running statistics are drawn per rank (variances positive)."""
    model = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 5), nn.BatchNorm2d(3)).to(device, dtype)
    g = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for norm in (model[0], model[2]):
            norm.running_mean.copy_(torch.randn(norm.num_features, generator=g).to(device))
            norm.running_var.copy_((torch.rand(norm.num_features, generator=g) + 0.5).to(device))
    return model


def _stats(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().cpu().clone() for m in (model[0], model[2]) for t in (m.running_mean, m.running_var)]


def _examples(rank: int) -> int:
    """Uneven shards, rank 1 (of two or more) without any example."""
    return 0 if rank == 1 else 7 + 13 * rank


@pytest.mark.mpi
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_statistics_are_the_examples_weighted_mean(comm, dtype, device):
    """Every rank ends with sum_r n_r s_r / sum_r n_r of the float64 statistics, rounded once
    to the buffers' dtype (float32: within its rounding; float16 within half a unit in the last
    place, as one rounding gives, not each rank's share rounded; bfloat16 within its rounding);
    a rank with 0 examples contributes nothing, even where its statistics are NaN."""
    model = _model(comm.rank, dtype, device)
    if comm.rank == 1:
        with torch.no_grad():
            model[0].running_mean.fill_(float("nan"))
    weights = [_examples(r) for r in range(comm.size)]
    stats = [_stats(_model(r, dtype)) for r in range(comm.size)]
    expected = [sum(w * s[i].double() for w, s in zip(weights, stats) if w) / sum(weights)
                for i in range(len(stats[0]))]
    sync_batchnorm_stats(model, comm, examples=_examples(comm.rank))
    rtol, atol = {torch.float64: (1e-14, 1e-14), torch.float32: (1e-6, 1e-6), torch.float16: (4.9e-4, 3e-8),
                  torch.bfloat16: (1e-2, 1e-2)}[dtype]
    for got, want in zip(_stats(model), expected):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    if comm.size > 1:  # the weights matter: the plain mean differs
        plain = sum(s[0].double() for s in stats) / comm.size
        assert (plain - expected[0]).abs().max() > 1e-3


@pytest.mark.mpi
def test_equal_examples_give_the_plain_mean(comm):
    """The same count on every rank is the unweighted average the call makes without it."""
    weighted, plain = _model(comm.rank, torch.float64), _model(comm.rank, torch.float64)
    sync_batchnorm_stats(weighted, comm, examples=32)
    sync_batchnorm_stats(plain, comm)
    for a, b in zip(_stats(weighted), _stats(plain)):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)


def _refused(comm, examples, error: type, match: str | None) -> None:
    """``sync_batchnorm_stats`` with this rank's ``examples`` raises ``error`` matching ``match``
    here (every rank calls it alike) and leaves the statistics as they were."""
    model = _model(comm.rank, torch.float64)
    before = _stats(model)
    with pytest.raises(error, match=match):
        sync_batchnorm_stats(model, comm, examples=examples)
    for got, want in zip(_stats(model), before):
        assert torch.equal(got, want)


@pytest.mark.mpi
@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), pytest.param(10**400, id="beyond-float64"),
                                 True, "12"])
def test_an_invalid_count_on_the_last_rank_raises_everywhere_and_changes_nothing(comm, bad):
    last = comm.rank == comm.size - 1
    _refused(comm, bad if last else 10, ValueError,
             "examples: " + ("expected a finite number" if last else "1 other rank"))


@pytest.mark.mpi
def test_zero_examples_on_every_rank_raise_everywhere_and_change_nothing(comm):
    _refused(comm, 0, ValueError, "examples: every rank passed 0")


@pytest.mark.mpi(min_size=2)
def test_a_rank_without_examples_argument_raises_everywhere(comm):
    """Rank 0 weighs, the others average plainly: the collectives differ, every rank raises
    and the statistics stay as they were."""
    _refused(comm, 5 if comm.rank == 0 else None, CollectiveMismatchError, None)


@pytest.mark.mpi(min_size=2)
def test_counts_whose_total_overflows_raise_everywhere_and_change_nothing(comm):
    """Each count a finite float64 but their sum not: every share would be 0, every statistic
    zeroed; every rank raises instead."""
    _refused(comm, 1e308, ValueError, "examples: the ranks' counts add up")


@pytest.mark.mpi(min_size=2)
def test_float16_statistics_are_rounded_once(comm):
    """Rank r's float16 running means r + 1 (times a per-channel factor) weighted by r + 1
    examples: within half a unit in the last place of the float64 weighted mean of the values
    the ranks hold, which rounding each rank's share to float16 before the sum misses (here
    at 3 and 4 ranks)."""
    norm = nn.BatchNorm1d(64).to(torch.float16)
    scale = 1 + torch.arange(64, dtype=torch.float64) / 7
    with torch.no_grad():
        norm.running_mean.copy_((comm.rank + 1) * scale)
    sync_batchnorm_stats(norm, comm, examples=comm.rank + 1)
    held = [((r + 1) * scale).to(torch.float16).double() for r in range(comm.size)]  # as each rank stores them
    want = sum((r + 1) * h for r, h in enumerate(held)) / sum(range(1, comm.size + 1))
    torch.testing.assert_close(norm.running_mean.double(), want, rtol=4.9e-4, atol=0)
