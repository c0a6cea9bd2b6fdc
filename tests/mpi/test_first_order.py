"""First-order gradients over ranks: allreduce_gradients with gradients missing on some ranks,
and the preconditioner's first-order parameters as they are at each step."""
import pytest
import torch
from torch import nn

from hpckfac.comm import CollectiveMismatchError
from hpckfac.torch import KFACPreconditioner, allreduce_gradients, sync_batchnorm_stats


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (and CuPy)")


@pytest.mark.mpi
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_missing_on_some_ranks_count_as_zeros(comm, dtype, device):
    """Ranks whose batches reached different parameters (stochastic depth): each gradient is
    the mean over every rank with zeros where a rank has none, the same on every rank; a
    parameter no rank has a gradient for keeps None, a frozen one is left alone."""
    params = nn.ParameterList([nn.Parameter(torch.zeros(3 + i, dtype=dtype, device=device)) for i in range(5)])
    params[4].requires_grad_(False)
    used = lambda r, i: i < 3 and (r + i) % 2 == 0  # param 3 unused everywhere; at 1 rank param 1 too
    values = {(r, i): torch.randn(3 + i, dtype=dtype, generator=torch.Generator().manual_seed(10 * r + i)).to(device)
              for r in range(comm.size) for i in range(5)}
    for i, p in enumerate(params):
        if used(comm.rank, i):
            p.grad = values[comm.rank, i].clone()
    allreduce_gradients(params, comm)
    for i, p in enumerate(params):
        users = [r for r in range(comm.size) if used(r, i)]
        if not users:
            assert p.grad is None, i
            continue
        expected = sum(values[r, i] for r in users) / comm.size
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-7)



@pytest.mark.mpi
@pytest.mark.parametrize("change", ["unfrozen", "added"])
def test_a_head_unfrozen_or_added_after_construction_is_averaged(comm, change):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    if change == "unfrozen":
        model[2].requires_grad_(False)
        precond = KFACPreconditioner(model, comm=comm, skip_layers=["2"])
        model[2].requires_grad_(True)
    else:
        head = model.pop(2)
        precond = KFACPreconditioner(model, comm=comm)
        model.append(head)
    inputs = [torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
              for r in range(comm.size)]
    head = []
    for r, x in enumerate(inputs):  # each rank's own head gradient, for the oracle
        model.zero_grad()
        model(x).pow(2).mean().backward()
        head.append([p.grad.clone() for p in model[2].parameters()])
    model.zero_grad()
    model(inputs[comm.rank]).pow(2).mean().backward()
    precond.step()
    for j, p in enumerate(model[2].parameters()):
        torch.testing.assert_close(p.grad, sum(h[j] for h in head) / comm.size, rtol=1e-12, atol=1e-14)


@pytest.mark.mpi
def test_a_bias_given_to_a_bias_free_kfac_layer_after_construction_is_averaged(comm, caplog):
    """The block of a Linear built without a bias covers its weight only: a bias given to it
    later is averaged first-order (the mean of every rank's own gradient) and named as added,
    while the weight stays preconditioned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)).double()
    precond = KFACPreconditioner(model, comm=comm)
    model[0].bias = nn.Parameter(torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    inputs = [torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
              for r in range(comm.size)]
    own = []
    for x in inputs:  # each rank's own bias gradient, for the oracle
        model.zero_grad()
        model(x).pow(2).mean().backward()
        own.append(model[0].bias.grad.clone())
    model.zero_grad()
    model(inputs[comm.rank]).pow(2).mean().backward()
    with caplog.at_level("WARNING", logger="hpckfac"):
        precond.step()
    torch.testing.assert_close(model[0].bias.grad, sum(own) / comm.size, rtol=1e-12, atol=1e-14)
    assert [id(p) for p in precond.other_params] == [id(model[0].bias)]
    if comm.rank == 0:
        assert "averaged first-order, not preconditioned: 0.bias" in caplog.text


@pytest.mark.mpi
def test_parameters_replaced_by_load_state_dict_assign_stay_preconditioned(comm, caplog):
    """``model.load_state_dict(state, assign=True)`` on every rank puts new Parameter objects in
    the K-FAC layers and frees the old ones: the steps are those of a preconditioner built on the
    loaded model, no parameter is averaged first-order or named as added. (The ids kept from
    construction were taken to be the K-FAC parameters: the new ones were averaged first-order
    too, named as added, and where a freed id came back, differently on each rank, the ranks
    disagreed on the allreduce.)"""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()

    state = {k: v + 0.25 for k, v in build().state_dict().items()}
    model = build()
    precond = KFACPreconditioner(model, comm=comm)
    model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    oracle = build()
    oracle.load_state_dict(state)
    reference = KFACPreconditioner(oracle, comm=comm)
    assert precond.other_params == []
    generator = torch.Generator().manual_seed(comm.rank)
    for _ in range(3):
        x = torch.randn(6, 4, dtype=torch.float64, generator=generator)
        for m, p in ((model, precond), (oracle, reference)):
            m.zero_grad()
            m(x).pow(2).mean().backward()
            with caplog.at_level("WARNING", logger="hpckfac"):
                p.step()
        for a, b in zip(model.parameters(), oracle.parameters()):
            assert torch.equal(a.grad, b.grad)
    assert "added to the model" not in caplog.text


@pytest.mark.mpi(min_size=2)
def test_a_helper_without_comm_on_one_rank_meets_the_scripts_communicator(comm):
    """Left without ``comm``, the helpers use the process's Communicator on COMM_WORLD (here
    the one made before): called on one rank alone, they raise on every rank instead of
    creating a Communicator there (a collective the others never join)."""
    import numpy as np

    from hpckfac.comm import CollectiveMismatchError, world_communicator
    from hpckfac.torch import sync_batchnorm_stats

    assert world_communicator() is world_communicator() and world_communicator().mpi == comm.mpi
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(CollectiveMismatchError):
        if comm.rank == 0:
            sync_batchnorm_stats(model)
        else:
            comm.allreduce(np.ones(3))


def _model_of(change: str, last: bool) -> nn.Module:
    """Three Linear layers and a BatchNorm; on the last rank (``last``) changed as ``change`` says."""
    torch.manual_seed(0)
    width = 5 if last and change == "width" else 4
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, width), nn.BatchNorm1d(width),
                          nn.Linear(width, 2), *([nn.Linear(2, 2)] if last and change == "layer" else []))
    if last and change == "dtype":
        model.double()
    if last and change == "frozen":
        model[0].weight.requires_grad_(False)
    return model


@pytest.mark.mpi
@pytest.mark.parametrize("change", ["width", "dtype", "frozen", "layer"])
def test_different_models_name_the_first_trainable_parameter_that_differs(comm, change):
    """The last rank's hidden layer is wider, its model float64, its first weight frozen, or it
    has one more layer: allreduce_gradients names on every rank the first trainable parameter
    of another shape or dtype, each rank's, or each rank's count of them (the collective alone
    says only that the buffers' lengths differ); at one rank the gradients are their own mean."""
    last = comm.rank == comm.size - 1 and comm.size > 1
    model = _model_of(change, last)
    model(torch.randn(6, 3, dtype=next(model.parameters()).dtype)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    if comm.size == 1:
        allreduce_gradients(model, comm)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        return
    others, end = list(range(comm.size - 1)), [comm.size - 1]
    differ = {"width": f"tensor 4 is 2.weight (4, 4) float32 on ranks {others}, 2.weight (5, 4) float32 on ranks {end}",
              "dtype": f"tensor 0 is 0.weight (4, 3) float32 on ranks {others}, 0.weight (4, 3) float64 on ranks {end}",
              "frozen": f"tensor 0 is 0.weight (4, 3) float32 on ranks {others}, 0.bias (4,) float32 on ranks {end}",
              "layer": f"tensors: 10 on ranks {others}, 12 on ranks {end}"}[change]
    with pytest.raises(CollectiveMismatchError) as info:
        allreduce_gradients(model, comm)
    assert str(info.value) == (f"allreduce_gradients(): ranks disagree on the model's trainable parameters: "
                               f"{differ}: the ranks' models differ")
    assert all(torch.equal(p.grad, g) for p, g in zip((p for p in model.parameters() if p.requires_grad), grads))


@pytest.mark.mpi
@pytest.mark.parametrize("change", ["width", "dtype"])
def test_different_models_name_the_first_batchnorm_statistic_that_differs(comm, change):
    """sync_batchnorm_stats on models whose second BatchNorm is wider, or float64, on the last
    rank: every rank names its running mean with each rank's shape and dtype, and no rank's
    statistics change; at one rank they are their own mean."""
    last = comm.rank == comm.size - 1 and comm.size > 1
    model = _model_of(change, last).train()
    model(torch.randn(6, 3, dtype=next(model.parameters()).dtype))
    before = [t.clone() for t in model.buffers()]
    if comm.size == 1:
        sync_batchnorm_stats(model, comm)
    else:
        others, end = list(range(comm.size - 1)), [comm.size - 1]
        kinds = {"width": ("(4,) float32", "(5,) float32"), "dtype": ("(4,) float32", "(4,) float64")}[change]
        index = 2 if change == "width" else 0
        name = "3.running_mean" if change == "width" else "1.running_mean"
        with pytest.raises(CollectiveMismatchError) as info:
            sync_batchnorm_stats(model, comm)
        assert str(info.value) == (f"sync_batchnorm_stats(): ranks disagree on the model's BatchNorm statistics: "
                                   f"tensor {index} is {name} {kinds[0]} on ranks {others}, {name} {kinds[1]} on "
                                   f"ranks {end}: the ranks' models differ")
    assert all(torch.equal(t, b) for t, b in zip(model.buffers(), before))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("names", ["same", "other"])
def test_same_models_with_other_bucket_sizes_keep_the_collectives_message(comm, names):
    """Ranks whose models agree but whose ``bucket_bytes`` differ: the message names the
    bucket sizes, as the collective found them, not a model difference there is none of, also
    where rank 0's layers have other names (the collective pairs tensors by position)."""
    from collections import OrderedDict

    model = _model_of("none", False)
    if names == "other" and comm.rank == 0:
        model = nn.Sequential(OrderedDict(zip("abcde", model)))
    model(torch.randn(6, 3)).sum().backward()
    with pytest.raises(CollectiveMismatchError, match=r"allreduce_many in allreduce_gradients\(\): ranks disagree "
                                                      r"on bucket_bytes \(64 on ranks \[0\]; 128 on ranks"):
        allreduce_gradients(model, comm, bucket_bytes=64 if comm.rank == 0 else 128)


@pytest.mark.mpi(min_size=2)
def test_two_helpers_on_one_collective_keep_the_collectives_message(comm):
    """Rank 0 averages BatchNorm statistics while the others average gradients, both through
    allreduce_many: the message names the two calls, as the collective found them, and no rank
    gathers tensor names for a comparison the others do not make."""
    model = _model_of("none", False)
    model(torch.randn(6, 3)).sum().backward()
    others = list(range(1, comm.size))
    with pytest.raises(CollectiveMismatchError) as info:
        if comm.rank == 0:
            sync_batchnorm_stats(model, comm)
        else:
            allreduce_gradients(model, comm)
    assert str(info.value).endswith(f"ranks disagree on the call (allreduce_many in sync_batchnorm_stats() on ranks "
                                    f"[0]; allreduce_many in allreduce_gradients() on ranks {others})"), str(info.value)


@pytest.mark.mpi
def test_a_sparse_gradient_on_one_rank_fails_on_every_rank(comm):
    """A sparse embedding reached on the last rank only: that rank names the sparse gradient,
    the others learn that its arguments were refused, nobody waits."""
    from hpckfac.comm import CollectiveMismatchError

    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    if comm.rank == comm.size - 1:
        model(torch.randint(0, 10, (3, 5))).sum().backward()
    else:
        model[1](torch.randn(3, 4)).sum().backward()
    if comm.rank == comm.size - 1:
        with pytest.raises(ValueError, match="sparse gradient"):
            allreduce_gradients(model, comm)
    else:
        with pytest.raises(CollectiveMismatchError, match=r"allreduce_many in allreduce_gradients\(\): ranks "
                                                          r"disagree on arguments"):
            allreduce_gradients(model, comm)


@pytest.mark.mpi
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_bfloat16_gradients_and_batchnorm_statistics_are_averaged_in_float32(comm, device):
    """bfloat16 travels as float32 copies written back in place (MPI has no bfloat16 sum): the
    gradients, one of them present on the last rank only (its presence flag in float32), and
    a bfloat16 BatchNorm's running statistics."""
    from hpckfac.torch import sync_batchnorm_stats

    params = nn.ParameterList([nn.Parameter(torch.zeros(5, dtype=torch.bfloat16, device=device)) for _ in range(2)])
    values = [torch.randn(5, generator=torch.Generator().manual_seed(r)).to(torch.bfloat16) for r in range(comm.size)]
    last = comm.rank == comm.size - 1
    params[0].grad = values[comm.rank].to(device, copy=True)
    if last:
        params[1].grad = values[comm.rank].to(device, copy=True)
    allreduce_gradients(params, comm)
    expected = (sum(v.float() for v in values) / comm.size).to(torch.bfloat16)
    assert params[0].grad.dtype == torch.bfloat16 and torch.equal(params[0].grad.cpu(), expected)
    alone = (values[-1].float() / comm.size).to(torch.bfloat16)
    assert params[1].grad.dtype == torch.bfloat16 and torch.equal(params[1].grad.cpu(), alone)
    norm = nn.BatchNorm1d(5).to(device, torch.bfloat16)
    norm.running_mean.copy_(values[comm.rank])
    sync_batchnorm_stats(norm, comm)
    assert norm.running_mean.dtype == torch.bfloat16 and torch.equal(norm.running_mean.cpu(), expected)


@pytest.mark.mpi
def test_a_kfac_layer_no_rank_reached_keeps_grad_none(comm):
    """A preconditioned layer that no rank's batch reached keeps ``.grad`` None, as a
    first-order parameter does, so that AdamW leaves it alone (a zero gradient would decay it and
    step it by its momentum); one that only the last rank reached gets a gradient on every rank."""
    torch.manual_seed(0)
    net = nn.ModuleDict({"trunk": nn.Linear(4, 3), "some": nn.Linear(3, 2), "none": nn.Linear(3, 2)}).double()
    precond = KFACPreconditioner(net, comm=comm)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(comm.rank))
    h = torch.tanh(net["trunk"](x))
    loss = net["some"](h).pow(2).mean() if comm.rank == comm.size - 1 else h.pow(2).mean()
    loss.backward()
    precond.step()
    for name in ("trunk.weight", "trunk.bias", "some.weight", "some.bias"):
        grad = net.get_parameter(name).grad
        assert grad is not None and bool(grad.abs().max() > 0), name
        everyone = comm.mpi.allgather(grad.numpy())
        assert all((g == everyone[0]).all() for g in everyone), name
    assert net["none"].weight.grad is None and net["none"].bias.grad is None
    opt.step()
    for name in ("none.weight", "none.bias"):
        assert torch.equal(net.get_parameter(name), before[name]), name


@pytest.mark.mpi
def test_a_kfac_layer_no_rank_reached_keeps_grad_none_beside_a_frozen_weight(comm):
    """A preconditioned layer with a frozen weight and a trained bias that no rank's backward
    reached keeps the bias's ``.grad`` None (the frozen weight's flag says nothing about what was
    reached), so that AdamW leaves the bias alone; the trained layers' gradients are the mean of
    the ranks' own, alike on every rank."""
    torch.manual_seed(0)
    net = nn.ModuleDict({"trunk": nn.Linear(4, 3), "none": nn.Linear(3, 2)}).double()
    net["none"].weight.requires_grad_(False)
    precond = KFACPreconditioner(net, comm=comm)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.5)
    before = net["none"].bias.detach().clone()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(comm.rank))
    torch.tanh(net["trunk"](x)).pow(2).mean().backward()
    precond.step()
    assert net["none"].weight.grad is None and net["none"].bias.grad is None
    for name in ("trunk.weight", "trunk.bias"):
        grad = net.get_parameter(name).grad
        assert grad is not None and bool(grad.abs().max() > 0), name
        everyone = comm.mpi.allgather(grad.numpy())
        assert all((g == everyone[0]).all() for g in everyone), name
    opt.step()
    assert torch.equal(net["none"].bias, before)


@pytest.mark.mpi
def test_a_kfac_layer_whose_weight_alone_got_a_gradient_was_reached(comm):
    """A preconditioned layer used on the last rank only through its weight
    (``F.linear(h, layer.weight)``: never called, no statistics, no gradient for its bias) was
    reached: its weight gets the mean over ranks of its gradients, passed through
    unpreconditioned, and its bias the zeros a missing gradient counts as, on every rank."""
    torch.manual_seed(0)
    net = nn.ModuleDict({"trunk": nn.Linear(4, 3), "side": nn.Linear(3, 2)}).double()
    precond = KFACPreconditioner(net, comm=comm, kl_clip=None)
    last = comm.size - 1

    def loss(rank):
        x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
        h = torch.tanh(net["trunk"](x))
        side = nn.functional.linear(h, net["side"].weight).pow(2).mean() if rank == last else 0.0
        return h.pow(2).mean() + side

    want = torch.autograd.grad(loss(last), net["side"].weight)[0] / comm.size
    loss(comm.rank).backward()
    precond.step()
    torch.testing.assert_close(net["side"].weight.grad, want, rtol=1e-12, atol=1e-15)
    assert torch.equal(net["side"].bias.grad, torch.zeros(2, dtype=torch.float64))


@pytest.mark.mpi
@pytest.mark.parametrize("first_order", [None, "small", "large"])
def test_presence_flags_and_small_buckets_take_mpis_allreduce(comm, first_order, monkeypatch):
    """The step's presence flags ride the first-order gradients' allreduce when there are
    some, else go alone, and by MPI's allreduce; a bucket whose ring messages would carry under
    RING_MIN_CHUNK_BYTES (a small first-order parameter) takes MPI's allreduce too, a larger
    one the ring (``log2 P`` messages instead of ``2(P-1)`` where latency rules). Either way
    the gradients are those of the same step without the spies, alike on every rank."""
    from hpckfac.comm import communicator

    size = {"small": 2, "large": communicator.RING_MIN_CHUNK_BYTES // 8 * comm.size}.get(first_order)

    def build():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        if first_order:
            net.register_parameter("scale", nn.Parameter(torch.linspace(0.5, 1.5, size, dtype=torch.float64)))
        return net

    def run(net):
        precond = KFACPreconditioner(net, comm=comm)
        x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(comm.rank))
        out = net(x) * net.scale[:2] * net.scale.sum() if first_order else net(x)
        out.pow(2).mean().backward()
        precond.step()
        return [p.grad.clone() for p in net.parameters()]

    expected = run(build())
    calls, rings = [], []
    real, ring = comm.allreduce_many, communicator.ring.allreduce
    monkeypatch.setattr(comm, "allreduce_many", lambda arrays, **kw: calls.append(kw["algorithm"]) or real(arrays, **kw))
    monkeypatch.setattr(communicator.ring, "allreduce", lambda *a, **kw: rings.append(1) or ring(*a, **kw))
    got = run(build())
    # One rank has nothing to average: no collective at all.
    assert calls == ([] if comm.size == 1 else ["auto"])
    assert len(rings) == (1 if first_order == "large" and comm.size > 1 else 0)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    everyone = comm.mpi.allgather([g.numpy() for g in got])
    assert all((a == b).all() for other in everyone for a, b in zip(other, everyone[0]))


@pytest.mark.mpi(min_size=2)
def test_presence_flags_alone_travel_in_float32(comm, monkeypatch):
    """Flags that travel with first-order gradients take the first one's dtype (one fusion
    bucket); alone (every parameter preconditioned) they are float32 whatever the model's dtype:
    float16 flags would take MPI's float16 user op, staged through the host even on a
    CUDA-aware MPI."""
    from hpckfac.torch.distributed import average_grads

    sent = []
    real = comm.allreduce_many
    monkeypatch.setattr(comm, "allreduce_many", lambda arrays, **kw: sent.append([a.dtype for a in arrays])
                        or real(arrays, **kw))
    first, covered = (nn.Parameter(torch.ones(3, dtype=torch.float16)) for _ in range(2))
    covered.grad = torch.ones(3, dtype=torch.float16)
    first.grad = torch.ones(3, dtype=torch.float16)
    assert average_grads([], comm, presence=[covered], held=[comm.rank == 0]) == [True, True]
    assert average_grads([first], comm, presence=[covered]) == [True]
    assert [[str(d) for d in s] for s in sent] == [["float32"], ["float16", "float16"]]
