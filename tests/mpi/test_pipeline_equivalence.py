"""The main correctness test: P ranks with one micro-batch each equal one
process taking the same P micro-batches with accumulation_steps=P (and, without
BatchNorm, one process taking the whole batch at once), in float64.

The reference runs inside every rank on a size-1 communicator (COMM_SELF).
The same check runs on the device code path: with the stand-in device array
(every machine) and with a CUDA model (where a GPU exists; ranks may share it).
"""
import contextlib

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from hpckfac.comm import Communicator
from hpckfac.layers import conv, conv_lags
from hpckfac.torch import KFACPreconditioner, bind_device

from test_device_path import ON_CUDA, device_path
from torch_features import needs_rmsnorm

MICRO, STEPS, LR = 4, 10, 0.1
# The device path against the host path: the stand-in runs the device path's generic factor
# routes on NumPy, where the host takes CPU-only ones for convolutions (batched G, lag-product A),
# so they agree to rounding; CUDA's float64 kernels sum in yet another order.
HOST_RTOL = {"standin": 1e-12, "cuda": 1e-9}


def bn_model():
    """PReLU's weight is first-order there (``FIRST_ORDER_PRELU``): averaged by the ring allreduce, on the
    device path too."""
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=True), nn.BatchNorm2d(3), nn.PReLU(3),
                         nn.Flatten(), nn.Linear(27, 4, bias=False))


# Keeps bn_model's PReLU first-order, whatever block nn.PReLU is registered with: its weight is the one
# parameter the ring averages.
FIRST_ORDER_PRELU = dict(skip_layers=[nn.PReLU])


def plain_model():
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=True), nn.Tanh(),
                         nn.Flatten(), nn.Linear(27, 4, bias=False))


def wide_conv_model():
    """A 16-channel stride-1 convolution, whose A factor comes from lag products (``conv_lags``)."""
    return nn.Sequential(nn.Conv2d(2, 16, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.Tanh(), nn.Flatten(), nn.Linear(16 * 8 * 8, 4, bias=False))


def two_layer_model():
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))


class KindsModel(nn.Module):
    """Every other block kind: token and position embeddings (positions shared by the batch),
    LayerNorm, a Linear and a 1-d transposed convolution on the sequence; a grouped convolution,
    GroupNorm, a depthwise convolution and a grouped 2-d transposed convolution on the image."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(5, 4), nn.Embedding(6, 4)
        self.ln, self.seq, self.up1 = nn.LayerNorm(4), nn.Linear(4, 4), nn.ConvTranspose1d(4, 2, 3, stride=2)
        self.conv, self.gn = nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.GroupNorm(2, 4)
        self.dw = nn.Conv2d(4, 4, 3, stride=2, groups=4)
        self.up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.head = nn.Linear(38, 4)

    def forward(self, x):
        tokens = (x[:, 0, 0, :] * 2).floor().clamp(-2, 2).long() + 2  # (B, 6) from the data
        h = self.ln(self.tok(tokens) + self.pos(torch.arange(6, device=x.device).unsqueeze(0)))
        h = torch.tanh(self.seq(h))
        s = torch.tanh(self.up1(h.transpose(1, 2))).mean(2)
        c = torch.tanh(self.dw(torch.tanh(self.gn(self.conv(x)))))
        return self.head(torch.cat([h.mean(1), s, self.up(c).flatten(1)], 1))


class InstanceNormModel(nn.Module):
    """InstanceNorm 1d, 2d and 3d with affine parameters (unit-wise blocks, per-example statistics,
    so a sample of each micro-batch may take them), and one without (no block, no parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.in2 = nn.Conv2d(2, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True)
        self.plain = nn.InstanceNorm2d(4, track_running_stats=True)
        self.in1, self.in3 = nn.InstanceNorm1d(4, affine=True), nn.InstanceNorm3d(4, affine=True)
        self.head = nn.Linear(4 * 36, 4)

    def forward(self, x):
        h = torch.tanh(self.in2(self.conv(x)))
        h = torch.tanh(self.in1(self.plain(h).flatten(2)))                  # (B, 4, 36)
        h = torch.tanh(self.in3(h.reshape(-1, 4, 4, 3, 3)))                 # (B, 4, 4, 3, 3)
        return self.head(h.flatten(1))


class RMSNormModel(nn.Module):
    """RMSNorm over a sequence's features (eps=None: the dtype's) and over two trailing dimensions (a
    given eps), unit-wise blocks with per-example statistics; and one without weight (no block)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.seq = nn.Conv2d(2, 4, 3, padding=1), nn.RMSNorm(4)
        self.plain, self.maps = nn.RMSNorm(4, elementwise_affine=False), nn.RMSNorm((6, 6), eps=1e-3)
        self.head = nn.Linear(4 * 36, 4)

    def forward(self, x):
        h = torch.tanh(self.seq(self.conv(x).flatten(2).transpose(1, 2)))   # (B, 36, 4)
        h = torch.tanh(self.maps(self.plain(h).transpose(1, 2).reshape(-1, 4, 6, 6)))
        return self.head(h.flatten(1))


class PReLUModel(nn.Module):
    """PReLU with a slope per channel on a convolution's maps and on the logits, and one slope
    shared by a sequence's features: full Fishers of the slopes from per-example statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.maps = nn.Conv2d(2, 4, 3, padding=1), nn.PReLU(4)
        self.seq, self.shared = nn.Linear(4, 3), nn.PReLU()
        self.head, self.logits = nn.Linear(3 * 36, 4), nn.PReLU(4)

    def forward(self, x):
        h = self.maps(self.conv(x))                                          # (B, 4, 6, 6)
        h = self.shared(self.seq(h.flatten(2).transpose(1, 2)))             # (B, 36, 3)
        return self.logits(self.head(h.flatten(1)))                         # (B, 4)


class SequenceFirstModel(nn.Module):
    """LayerNorm and Linear on a sequence-first ``(positions, batch, features)`` view of the image
    (PyTorch's ``batch_first=False`` layout), then a Linear head on the batch-first mean. Nine
    positions: no micro-batch of these tests (a multiple of 4) has that size, where the layout
    could not be told apart."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc, self.head = nn.LayerNorm(8), nn.Linear(8, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = x.reshape(x.shape[0], 9, 8).transpose(0, 1)                     # (9, B, 8)
        return self.head(torch.tanh(self.fc(self.ln(h))).mean(0))


class AttentionModel(nn.Module):
    """An ``nn.TransformerEncoderLayer`` (its attention's in-projection and out_proj K-FAC blocks,
    seen inside ``F.multi_head_attention_forward``) on the image as 9 tokens of 8 features,
    batch-first or sequence-first, with a key padding mask from the data; a Linear head on the
    mean token."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = x.reshape(x.shape[0], 9, 8)
        padded = h[:, :, 0] > 1.0
        padded[:, 0] = False
        h = self.layer(h if self.batch_first else h.transpose(0, 1), src_key_padding_mask=padded)
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


class BranchModel(nn.Module):
    """A Linear applied only to the examples whose first pixel exceeds 1 (about one in six), and not
    called at all on a micro-batch without one: some ranks' forwards skip it on a step where others'
    take it."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.branch, self.head = nn.Linear(72, 6), nn.Linear(6, 6), nn.Linear(6, 4)

    @staticmethod
    def taken(x):
        return x[:, 0, 0, 0] > 1.0

    def forward(self, x):
        h = torch.tanh(self.trunk(x.flatten(1)))
        keep = self.taken(x)
        if keep.any():
            h = h.clone()
            h[keep] = torch.tanh(self.branch(h[keep]))
        return self.head(h)


def batches(shape, classes, parts):
    """Per step the global batch as ``parts`` micro-batches, identical on every rank."""
    gen = torch.Generator().manual_seed(1234)
    for _ in range(STEPS):
        x = torch.randn((parts * MICRO,) + shape, generator=gen, dtype=torch.float64)
        y = torch.randint(0, classes, (parts * MICRO,), generator=gen)
        yield x.split(MICRO), y.split(MICRO)


def train(make_model, shape, classes, comm, micro_ids, parts, device="cpu", **options):
    """Parameters after STEPS steps (and the KL factors) processing micro-batches ``micro_ids`` per step,
    on ``device``: "cpu", "cuda" or "standin" (the CPU model seen as device arrays)."""
    torch.manual_seed(0)
    where = bind_device("cuda", comm) if device == "cuda" else torch.device("cpu")
    model = make_model().double().to(where)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    nus = []
    with device_path() if device == "standin" else contextlib.nullcontext():
        precond = KFACPreconditioner(model, lr=LR, comm=comm, accumulation_steps=len(micro_ids), **options)
        if device != "cpu":
            assert precond.xp.__name__ in ("cupy", "standin"), precond.xp
        for xs, ys in batches(shape, classes, parts):
            opt.zero_grad()
            for i in micro_ids:
                loss = nn.functional.cross_entropy(model(xs[i].to(where)), ys[i].to(where)) / len(micro_ids)
                loss.backward()
            precond.step()
            opt.step()
            nus.append(precond.last_nu)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu().numpy(), nus


def check(make_model, shape, classes, comm, device="cpu", **options):
    dist, nus = train(make_model, shape, classes, comm, [comm.rank], comm.size, device, **options)
    ref, ref_nus = train(make_model, shape, classes, Communicator(MPI.COMM_SELF),
                         list(range(comm.size)), comm.size, device, **options)
    np.testing.assert_allclose(dist, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(nus, ref_nus, rtol=1e-9)
    return dist, nus


def check_host(make_model, comm, device, dist, nus, **options):
    """The parameters ``dist`` and KL factors ``nus`` of a run on ``device`` equal this rank's run
    of the same micro-batches on the host path."""
    host, host_nus = train(make_model, (2, 6, 6), 4, comm, [comm.rank], comm.size, "cpu", **options)
    np.testing.assert_allclose(dist, host, rtol=HOST_RTOL[device], atol=1e-12)
    np.testing.assert_allclose(nus, host_nus, rtol=HOST_RTOL[device])


@pytest.mark.mpi
@pytest.mark.parametrize("device", ["standin", ON_CUDA])
def test_device_path_equals_one_process(comm, device):
    options = dict(damping=1e-2, factor_update_interval=2, inverse_update_interval=3, kl_clip=1e-3,
                   **FIRST_ORDER_PRELU)
    dist, nus = check(bn_model, (2, 6, 6), 4, comm, device, **options)
    assert min(nus) < 1.0  # the KL clip was active
    check_host(bn_model, comm, device, dist, nus, **options)


@pytest.mark.mpi
def test_bn_model_with_intervals_and_active_kl_clip(comm):
    _, nus = check(bn_model, (2, 6, 6), 4, comm, damping=1e-2, factor_update_interval=2,
                   inverse_update_interval=3, kl_clip=1e-3, **FIRST_ORDER_PRELU)
    assert min(nus) < 1.0  # the KL clip was active


def whole_batch(make, ranks, **options):
    """The flat parameters after one process trains ``make()`` on every rank's micro-batches
    of each step at once: one forward/backward of the whole global batch."""
    torch.manual_seed(0)
    model = make().double()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    precond = KFACPreconditioner(model, lr=LR, comm=Communicator(MPI.COMM_SELF), **options)
    for xs, ys in batches((2, 6, 6), 4, ranks):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.cat(xs)), torch.cat(ys)).backward()
        precond.step()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


def check_whole_batch(make, comm, dist, **options):
    """The parameters ``dist`` of the ranks' run equal one process's taking the whole global batch."""
    np.testing.assert_allclose(dist, whole_batch(make, comm.size, **options), rtol=1e-9, atol=1e-12)


def check_clipped(make, comm, device, fraction):
    """``check`` of ``make`` with an active KL clip and ``statistics_fraction=fraction``; with every
    example's statistics (per-example kinds), one process taking the whole global batch in one
    pass agrees too, and off the CPU so does the host path. Returns a one-process preconditioner
    of ``make()``, to look at its blocks."""
    options = dict(damping=1e-2, factor_update_interval=1, inverse_update_interval=2, kl_clip=1e-2,
                   statistics_fraction=fraction)
    dist, nus = check(make, (2, 6, 6), 4, comm, device, **options)
    assert min(nus) < 1.0  # the KL clip was active
    if fraction == 1.0:
        check_whole_batch(make, comm, dist, **options)
    if device != "cpu":
        check_host(make, comm, device, dist, nus, **options)
    torch.manual_seed(0)
    return KFACPreconditioner(make().double(), comm=Communicator(MPI.COMM_SELF))


@pytest.mark.mpi
def test_plain_model_equals_whole_batch_on_one_rank(comm):
    options = dict(damping=1e-2, factor_update_interval=1, inverse_update_interval=1, kl_clip=None)
    dist, _ = check(plain_model, (2, 6, 6), 4, comm, **options)
    check_whole_batch(plain_model, comm, dist, **options)


@pytest.mark.mpi
@pytest.mark.parametrize("device", ["cpu", "standin", ON_CUDA])
def test_every_block_kind_equals_one_process(comm, device):
    options = dict(damping=1e-2, factor_update_interval=1, inverse_update_interval=2, kl_clip=1e-2)
    dist, nus = check(KindsModel, (2, 6, 6), 4, comm, device, **options)
    assert min(nus) < 1.0
    if device != "cpu":
        check_host(KindsModel, comm, device, dist, nus, **options)


@pytest.mark.mpi
@pytest.mark.parametrize("device", ["cpu", "standin", ON_CUDA])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("make,kind,count", [(InstanceNormModel, "InstanceNormBlock", 3),
                                             pytest.param(RMSNormModel, "RMSNormBlock", 2, marks=needs_rmsnorm),
                                             (PReLUModel, "PReLUBlock", 3)],
                         ids=["instancenorm", "rmsnorm", "prelu"])
def test_per_example_kind_equals_one_process_and_the_whole_batch(comm, device, fraction, make, kind, count):
    probe = check_clipped(make, comm, device, fraction)
    assert [type(b).__name__ for b in probe.engine.blocks].count(kind) == count


@pytest.mark.mpi
@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_sequence_first_layers_equal_the_whole_batch(comm, device):
    """The sequence-first layers' factors do not depend on the ranks' share of the batch: P ranks
    equal one process taking the whole global batch in one pass (on CUDA, through the device
    copies of the transposed inputs and output gradients)."""
    options = dict(damping=1e-2, factor_update_interval=1, inverse_update_interval=2, kl_clip=1e-2)
    dist, _ = check(SequenceFirstModel, (2, 6, 6), 4, comm, device, **options)
    check_whole_batch(SequenceFirstModel, comm, dist, **options)


@pytest.mark.mpi
@pytest.mark.parametrize("device", ["cpu", "standin", ON_CUDA])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_attention_equals_one_process_and_the_whole_batch(comm, device, fraction, batch_first):
    """nn.MultiheadAttention's two projection blocks (and the encoder layer's others) at P ranks
    equal one process taking the P micro-batches, and, with every example's statistics, one
    process taking the whole global batch in one pass."""
    probe = check_clipped(lambda: AttentionModel(batch_first), comm, device, fraction)
    assert len(probe.modules) == 7 and not probe.other_params  # self_attn, out_proj, 2 Linear, 2 LayerNorm, head


@pytest.mark.mpi
@pytest.mark.parametrize("device", ["cpu", "standin", ON_CUDA])
def test_a_layer_some_ranks_skip_equals_one_process_and_the_whole_batch(comm, device):
    """A layer that some ranks' micro-batches bypass on a step has zero statistics there, not
    none: one process taking every micro-batch divides the layer's sums by all the examples."""
    taken = [[bool(BranchModel.taken(x).any()) for x in xs] for xs, _ in batches((2, 6, 6), 4, comm.size)]
    if comm.size > 1:  # the data make some steps take the branch on some ranks and not on others
        assert any(any(step) and not all(step) for step in taken)
    options = dict(damping=1e-2, factor_update_interval=1, inverse_update_interval=2, kl_clip=1e-2)
    dist, _ = check(BranchModel, (2, 6, 6), 4, comm, device, **options)
    check_whole_batch(BranchModel, comm, dist, **options)


@pytest.mark.mpi
@pytest.mark.parametrize("method", ["fft", "gemm"])
def test_wide_conv_from_lags_equals_one_process(comm, monkeypatch, method):
    calls = []
    monkeypatch.setattr(conv, "lagged_a_factor", lambda *a, **kw: calls.append(1) or conv_lags.lagged_a_factor(*a, **kw))
    # A few examples per rank: the rule would take the patches there, the route is exact anyway;
    # each of its two methods in turn.
    monkeypatch.setattr(conv, "lags_pay", lambda *a: True)
    monkeypatch.setattr(conv_lags, "lag_method", lambda *a: method)
    check(wide_conv_model, (2, 16, 16), 4, comm, damping=1e-2, inverse_update_interval=2, kl_clip=1e-2)
    assert calls  # the 16-channel convolution took the lag route on every rank and in the reference


@pytest.mark.mpi
def test_two_layers_more_ranks_than_layers(comm):
    check(two_layer_model, (5,), 3, comm, damping=1e-2, inverse_update_interval=2, kl_clip=1e-2,
          assignment="contiguous")


@pytest.mark.mpi
@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_a_rank_with_an_empty_batch_adds_no_statistics(comm, device):
    """The last rank's shard is empty (an uneven split): the factors are those of the other ranks'
    examples alone, so the preconditioned gradient is the one process's over those micro-batches,
    scaled by the share of ranks that had data (the empty rank's gradient is zero). On CUDA the
    empty rank's hooks see empty device tensors."""
    full = max(comm.size - 1, 1)  # ranks with data
    where = bind_device("cuda", comm) if device == "cuda" else torch.device("cpu")

    def grads(comm_, micro_ids, scale):
        torch.manual_seed(0)
        model = plain_model().double().to(where)
        precond = KFACPreconditioner(model, lr=LR, comm=comm_, damping=1e-2, kl_clip=None,
                                     accumulation_steps=max(len(micro_ids), 1))
        xs, ys = next(batches((2, 6, 6), 4, full))
        if not micro_ids:  # this rank's shard is empty
            model(xs[0][:0].to(where)).sum().backward()
        for i in micro_ids:
            (nn.functional.cross_entropy(model(xs[i].to(where)), ys[i].to(where)) / len(micro_ids)).backward()
        precond.step()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).cpu().numpy() * scale

    mine = [comm.rank] if comm.rank < full else []
    dist = grads(comm, mine, comm.size / full)
    ref = grads(Communicator(MPI.COMM_SELF), list(range(full)), 1.0)
    np.testing.assert_allclose(dist, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.mpi
def test_micro_batches_of_different_sizes_weigh_each_rank_equally(comm):
    """Rank r takes r + 2 examples: its statistics, divided by its own examples, and its mean
    gradient count 1/P each (not the concatenated batch's weighting): the factors are the mean of
    those of each rank's micro-batch alone, and the next step's gradient is preconditioned as one
    process's mean of the ranks' mean gradients."""
    sizes = [r + 2 for r in range(comm.size)]
    x = torch.randn(sum(sizes), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, 3, (sum(sizes),), generator=torch.Generator().manual_seed(8))
    xs, ys = x.split(sizes), y.split(sizes)
    options = dict(lr=LR, damping=1e-2, kl_clip=1e-2, factor_update_interval=2, inverse_update_interval=2)

    def setup(comm_, accumulation_steps=1):
        torch.manual_seed(0)
        model = two_layer_model().double()
        return model, KFACPreconditioner(model, comm=comm_, accumulation_steps=accumulation_steps, **options)

    def backward(model, ids):
        for i in ids:
            (nn.functional.cross_entropy(model(xs[i]), ys[i]) / len(ids)).backward()

    def running(precond):
        return [block["factors"].numpy() for block in precond.state_dict()["blocks"].values()]

    model, precond = setup(comm)
    for _ in range(2):  # a factor-update step, then one that preconditions with its inverses
        model.zero_grad()
        backward(model, [comm.rank])
        precond.step()
        if precond.steps == 1:
            state = precond.state_dict()
    alone = []
    for r in range(comm.size):
        one_model, one = setup(Communicator(MPI.COMM_SELF))
        backward(one_model, [r])
        one.step()
        alone.append(running(one))
    for got, *each in zip([block["factors"].numpy() for block in state["blocks"].values()], *alone):
        np.testing.assert_allclose(got, np.mean(each, axis=0), rtol=1e-12, atol=1e-15)
    ref_model, ref = setup(Communicator(MPI.COMM_SELF), comm.size)
    ref.load_state_dict(state)
    backward(ref_model, range(comm.size))
    ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-10, atol=1e-14)
