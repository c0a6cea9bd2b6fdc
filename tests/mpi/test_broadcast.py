"""broadcast_parameters: rank 0's weights everywhere (bfloat16 models too); ranks whose models
differ raise on every rank instead of hanging."""
import copy
import time

import pytest
import torch
from torch import nn

from hpckfac.comm import CollectiveMismatchError
from hpckfac.torch import broadcast_parameters, sync_batchnorm_stats
from liveness import LIVENESS_S


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_zero_weights_everywhere(comm, dtype):
    torch.manual_seed(comm.rank)  # different weights on every rank
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(dtype)
    model[1].num_batches_tracked += comm.rank
    broadcast_parameters(model, comm)
    torch.manual_seed(0)
    root = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(dtype)
    for mine, theirs in zip(model.state_dict().values(), root.state_dict().values()):
        assert torch.equal(mine, theirs)
    model[1].running_mean.fill_(comm.rank)
    sync_batchnorm_stats(model, comm)
    assert torch.equal(model[1].running_mean, torch.full((4,), (comm.size - 1) / 2, dtype=dtype))


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_last_ranks_weights_everywhere(comm, dtype):
    """``root`` other than 0: every tensor, the float ones and those that travel as bytes
    (bfloat16, the integer count of batches), comes from that rank."""
    root = comm.size - 1

    def make(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(dtype)
        model[1].num_batches_tracked += 7 * seed + 1
        return model

    model = make(comm.rank)
    broadcast_parameters(model, comm, root=root)
    for mine, theirs in zip(model.state_dict().values(), make(root).state_dict().values()):
        assert torch.equal(mine, theirs)


@pytest.mark.mpi(min_size=2)
def test_different_models_raise_on_every_rank(comm):
    width = 5 if comm.rank == comm.size - 1 else 4
    model = nn.Sequential(nn.Linear(3, width))
    with pytest.raises(CollectiveMismatchError, match="parameters and buffers"):
        broadcast_parameters(model, comm)


@pytest.mark.mpi
@pytest.mark.parametrize("change", ["width", "layer"])
def test_different_models_name_the_first_tensor_that_differs(comm, change):
    """The last rank's head is wider, or it has one more layer: every rank names the first tensor
    of another shape with each rank's, or each rank's count of tensors (the lists of every
    tensor's shape and dtype were printed cut at 200 characters, before the head's)."""
    last = comm.rank == comm.size - 1 and comm.size > 1
    layers = [nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 5 if last and change == "width" else 2)]
    model = nn.Sequential(*layers, *([nn.Linear(2, 2)] if last and change == "layer" else []))
    if comm.size == 1:
        broadcast_parameters(model, comm)
        return
    start = time.perf_counter()
    with pytest.raises(CollectiveMismatchError) as info:
        broadcast_parameters(model, comm)
    others = list(range(comm.size - 1))
    differ = (f"tensor 6 is 3.weight (2, 4) float32 on ranks {others}, 3.weight (5, 4) float32 on ranks "
              f"[{comm.size - 1}]" if change == "width" else f"tensors: 8 on ranks {others}, 10 on ranks [{comm.size - 1}]")
    assert str(info.value) == f"ranks disagree on the root and the model's parameters and buffers: {differ}: the ranks' models differ"
    assert time.perf_counter() - start < LIVENESS_S


@pytest.mark.mpi
def test_different_models_name_the_first_tensor_of_another_shape_not_of_another_name(comm):
    """The last rank's layers have other names (its own Sequential of named modules) and its head
    is wider: the first tensor of another shape is named, not the first of another name, which
    the broadcast pairs by position all the same."""
    from collections import OrderedDict

    last = comm.rank == comm.size - 1 and comm.size > 1
    layers = [nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 5 if last else 2)]
    model = nn.Sequential(OrderedDict(zip("abcd", layers)) if last else layers[0], *([] if last else layers[1:]))
    if comm.size == 1:
        broadcast_parameters(model, comm)
        return
    with pytest.raises(CollectiveMismatchError) as info:
        broadcast_parameters(model, comm)
    assert str(info.value) == (f"ranks disagree on the root and the model's parameters and buffers: tensor 6 is "
                               f"3.weight (2, 4) float32 on ranks {list(range(comm.size - 1))}, d.weight (5, 4) "
                               f"float32 on ranks [{comm.size - 1}]: the ranks' models differ")


@pytest.mark.mpi
def test_a_rank_in_broadcast_parameters_while_the_others_step_names_the_calls(comm):
    """Two checks that compare digests, each under its own name: the error names the calls alone,
    not their digests as arguments that differ."""
    from hpckfac.torch import KFACPreconditioner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    precond = KFACPreconditioner(model, comm=comm)
    for step in range(2):
        model.zero_grad()
        model(torch.randn(5, 3)).pow(2).mean().backward()
        if step == 0 or comm.size == 1:
            precond.step()
            continue
        last = comm.rank == comm.size - 1
        with pytest.raises(CollectiveMismatchError) as info:
            broadcast_parameters(model, comm) if last else precond.step()
        assert str(info.value).endswith(
            f"ranks disagree on the call (the model's structure in step() on ranks {list(range(comm.size - 1))}; "
            f"the root and the model's parameters and buffers in broadcast_parameters() on ranks [{comm.size - 1}])")
    precond.remove_hooks()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("model", ["bfloat16", "integer buffers"])
def test_ranks_naming_different_roots_raise_on_every_rank(comm, model):
    """bfloat16 and integer tensors travel as bytes by MPI's Bcast, which checks nothing: ranks
    naming different roots kept their own values there. The root is compared with the model."""
    torch.manual_seed(comm.rank)
    if model == "bfloat16":
        net = nn.Linear(3, 4).to(torch.bfloat16)
    else:
        net = nn.BatchNorm1d(4, affine=False, track_running_stats=False)
        net.register_buffer("count", torch.tensor([comm.rank]))
    with pytest.raises(CollectiveMismatchError, match="root: rank 0 has 0, rank 1 has 1"):
        broadcast_parameters(net, comm, root=min(comm.rank, 1))


@pytest.mark.mpi
def test_a_root_that_is_no_rank_is_named_on_every_rank(comm):
    """The same out-of-range root on every rank: ValueError naming it, for a model whose tensors
    all go by MPI's Bcast too, not MPI's own error."""
    net = nn.Linear(3, 4).to(torch.bfloat16)
    with pytest.raises(ValueError, match=rf"root must be a rank in \[0, {comm.size}\), got {comm.size}"):
        broadcast_parameters(net, comm, root=comm.size)


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_check_replicas_names_the_tensor_that_drifted(comm, dtype):
    from hpckfac.torch import check_replicas

    torch.manual_seed(comm.rank)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(dtype)
    broadcast_parameters(model, comm)
    check_replicas(model, comm)  # identical after the broadcast
    model[1].running_mean.fill_(comm.rank)  # buffers differ by design until synced
    check_replicas(model, comm)
    if comm.size > 1:
        with pytest.raises(CollectiveMismatchError, match="running_mean"):
            check_replicas(model, comm, buffers=True)
        with torch.no_grad():
            if comm.rank == comm.size - 1:
                model[2].bias[0] += 1e-3  # a drift of one element on one rank
        with pytest.raises(CollectiveMismatchError, match=rf"2\.bias has 2 different values \(ranks \[0(, \d)*\]; ranks \[{comm.size - 1}\]\)"):
            check_replicas(model, comm)



@pytest.mark.mpi
@pytest.mark.parametrize("change", ["width", "dtype"])
def test_check_replicas_names_a_tensor_of_another_shape_or_dtype(comm, change):
    """The last rank's model has a wider first layer, or is float64: check_replicas names the
    tensor, each rank's shape and dtype and that the models differ, on every rank (it read the
    other bytes as other values, which no broadcast_parameters can make alike)."""
    from hpckfac.torch import check_replicas

    last = comm.rank == comm.size - 1 and comm.size > 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5 if last and change == "width" else 4), nn.Linear(4, 2))
    if last and change == "dtype":
        model.double()
    if comm.size == 1:
        check_replicas(model, comm)
        return
    start = time.perf_counter()
    with pytest.raises(CollectiveMismatchError) as info:
        check_replicas(model, comm)
    others = list(range(comm.size - 1))
    other = "(5, 3) float32" if change == "width" else "(4, 3) float64"
    assert str(info.value) == (f"replicas differ: 0.weight is (4, 3) float32 on ranks {others}, {other} on ranks "
                               f"[{comm.size - 1}]: the ranks' models differ")
    assert time.perf_counter() - start < LIVENESS_S


@pytest.mark.mpi
def test_check_replicas_with_buffers_on_one_rank_only_names_the_calls(comm):
    """buffers=True on the last rank alone: every rank raises naming each rank's call, where the
    last rank's BatchNorm buffers read as tensors of its model alone ('the ranks' models differ')."""
    from hpckfac.torch import check_replicas

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    last = comm.rank == comm.size - 1
    if comm.size == 1:
        check_replicas(model, comm, buffers=True)
        return
    start = time.perf_counter()
    with pytest.raises(CollectiveMismatchError) as info:
        check_replicas(model, comm, buffers=last)
    assert str(info.value).endswith(f"ranks compare different things (check_replicas() on ranks "
                                    f"{list(range(comm.size - 1))}; check_replicas(buffers=True) on ranks "
                                    f"[{comm.size - 1}])")
    assert time.perf_counter() - start < LIVENESS_S


@pytest.mark.mpi(min_size=2)
def test_first_step_without_broadcast_raises_on_every_rank(comm):
    """Averaged gradients would keep replicas that start apart apart for good: the first
    step() compares the weights and names the remedy."""
    from hpckfac.torch import KFACPreconditioner

    torch.manual_seed(comm.rank)  # different weights on every rank, never broadcast
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    precond = KFACPreconditioner(model, comm=comm)
    model(torch.randn(5, 3)).sum().backward()
    with pytest.raises(CollectiveMismatchError, match=r"first step\(\): 0\.weight has .*broadcast_parameters"):
        precond.step()
    precond.remove_hooks()


@pytest.mark.mpi
def test_optimizer_step_before_the_first_step_is_named(comm, caplog):
    """optimizer.step() before precond.step() applies each rank's own plain gradient: over
    several ranks the replicas then differ at the first step(), which names that order rather
    than a missing broadcast_parameters; on one rank nothing differs, and a warning says it
    (there the step is plain SGD's, silently). The right order, with an Embedding whose max_norm
    renormalises rows in place during the forward (one rank only), gets neither."""
    from hpckfac.torch import KFACPreconditioner

    for wrong in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(6, 3, max_norm=1.0 if comm.size == 1 else None), nn.Tanh(),
                              nn.Linear(3, 2))
        broadcast_parameters(model, comm)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        precond = KFACPreconditioner(model, comm=comm)
        gen = torch.Generator().manual_seed(comm.rank + 1)
        model(torch.randint(0, 6, (5,), generator=gen)).sum().backward()
        caplog.clear()
        with caplog.at_level("WARNING", logger="hpckfac"):
            if wrong:
                optimizer.step()
            if wrong and comm.size > 1:
                with pytest.raises(CollectiveMismatchError, match=r"first step\(\): 0\.weight has .*changed in place "
                                   r"after this step's backward: optimizer\.step\(\) before precond\.step\(\)"):
                    precond.step()
            else:
                precond.step()
        assert ("optimizer.step() before precond.step()" in caplog.text) is (wrong and comm.size == 1)
        precond.remove_hooks()


def _tanh_net(comm) -> tuple[nn.Module, list[torch.Tensor], torch.optim.Optimizer, torch.Generator]:
    """A small model built alike on every rank, its starting weights, SGD on it, and this rank's
    data generator."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return (model, [p.detach().clone() for p in model.parameters()], torch.optim.SGD(model.parameters(), lr=0.1),
            torch.Generator().manual_seed(comm.rank + 1))


@pytest.mark.mpi
@pytest.mark.parametrize("order", ["right", "step before backward", "zero_grad between", "zeros between",
                                   "last rank idle"])
def test_a_step_with_no_gradient_anywhere_is_named(comm, caplog, order):
    """A loop that calls step() before backward(), or zero_grad() between them, leaves step() no
    gradient on any rank and no error of torch's: the optimizer then applies each rank's own plain
    gradient (the weights are those of plain SGD on this rank's batches alone) or nothing (the
    weights stay as built). Rank 0 says so, once. A rank without a backward while others have one
    (an empty shard) is not that mistake, except where it is the only rank. zero_grad() to zeros
    between them leaves the gradients all zero, which the first step() names as such."""
    from hpckfac.torch import KFACPreconditioner

    model, start, optimizer, gen = _tanh_net(comm)
    plain = copy.deepcopy(model)  # before the preconditioner: its hooks are not copied along
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    precond = KFACPreconditioner(model, comm=comm, lr=0.1)
    with caplog.at_level("WARNING", logger="hpckfac"):
        for _ in range(3):
            x, y = torch.randn(5, 3, generator=gen), torch.randint(0, 2, (5,), generator=gen)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if order == "step before backward":
                precond.step()
                loss.backward()
            elif order in ("zero_grad between", "zeros between"):
                loss.backward()
                optimizer.zero_grad(set_to_none=order == "zero_grad between")
                precond.step()
            elif order == "last rank idle" and comm.rank == comm.size - 1:
                precond.step()  # this rank's forward is not backpropagated
            else:
                loss.backward()
                precond.step()
            optimizer.step()
            plain_optimizer.zero_grad()
            nn.functional.cross_entropy(plain(x), y).backward()
            plain_optimizer.step()
    precond.remove_hooks()
    said = caplog.text.count("step() found no gradient on any rank")
    wrong = order in ("step before backward", "zero_grad between") or (order == "last rank idle" and comm.size == 1)
    assert said == (1 if wrong and comm.rank == 0 else 0), caplog.text
    zeros = caplog.text.count("every gradient is zero at the first step(), on every rank")
    assert zeros == (1 if order == "zeros between" and comm.rank == 0 else 0), caplog.text
    if order in ("zero_grad between", "zeros between") or (order == "last rank idle" and comm.size == 1):
        for p, q in zip(model.parameters(), start):
            assert torch.equal(p, q)
    elif order == "step before backward":
        for p, q in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    else:
        assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), start))


@pytest.mark.mpi
@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_first_loss_without_any_gradient_is_not_named(comm, caplog, set_to_none):
    """A loss whose weight warms up from 0 gives every rank zero gradients at the first step,
    right as they are: not the zero_grad() between backward() and step() that the first step()
    names, which leaves zeros where the backward left others. optimizer.zero_grad() to None or
    to zeros before the forward; the model trains from the second step on."""
    from hpckfac.torch import KFACPreconditioner

    model, start, optimizer, gen = _tanh_net(comm)
    precond = KFACPreconditioner(model, comm=comm, lr=0.1)
    with caplog.at_level("WARNING", logger="hpckfac"):
        for k in range(3):
            x, y = torch.randn(5, 3, generator=gen), torch.randint(0, 2, (5,), generator=gen)
            optimizer.zero_grad(set_to_none=set_to_none)
            (k / 2 * nn.functional.cross_entropy(model(x), y)).backward()
            precond.step()
            if k == 0:
                assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
            optimizer.step()
    precond.remove_hooks()
    assert caplog.text == ""
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), start))
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


@pytest.mark.mpi
def test_zeros_between_backward_and_step_are_named_where_every_backward_left_some_zero_entries(comm, caplog):
    """zero_grad() to zeros between backward() and step(), on a model whose every gradient has
    zero entries of its own (an input feature that is always 0, a hidden unit whose weights are 0):
    the backward still left nonzero entries, so the first step() names the zeroing, on rank 0,
    and the model never changes."""
    from hpckfac.torch import KFACPreconditioner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight[0].zero_()  # hidden unit 0 is always 0: a zero column in the head's gradient
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(comm.rank + 1)
    precond = KFACPreconditioner(model, comm=comm, lr=0.1)
    with caplog.at_level("WARNING", logger="hpckfac"):
        for _ in range(2):
            x, y = torch.randn(5, 3, generator=gen), torch.randint(0, 2, (5,), generator=gen)
            x[:, 0] = 0.0  # a zero column in the first layer's gradient
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            assert all(p.grad.eq(0).any() and p.grad.ne(0).any() for p in model.parameters())
            optimizer.zero_grad(set_to_none=False)
            precond.step()
            optimizer.step()
    precond.remove_hooks()
    said = caplog.text.count("every gradient is zero at the first step(), on every rank")
    assert comm.allgather_object(said) == [1] + [0] * (comm.size - 1), caplog.text  # failing on every rank
    for p, q in zip(model.parameters(), start):
        assert torch.equal(p, q)


@pytest.mark.mpi
def test_parameters_added_after_construction_are_named_by_rank_zero_alone(comm, caplog):
    """A layer appended to the model after the preconditioner was built, alike on every rank, is
    averaged first-order: its gradient is the mean of the ranks' (computed here from every rank's
    batch), and rank 0 alone names it, once."""
    from hpckfac.torch import KFACPreconditioner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    precond = KFACPreconditioner(model, comm=comm)
    model.append(nn.Linear(2, 2).double())
    reference = copy.deepcopy(model)
    xs = [torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(r)) for r in range(comm.size)]
    with caplog.at_level("WARNING", logger="hpckfac"):
        for _ in range(2):
            model.zero_grad()
            model(xs[comm.rank]).pow(2).mean().backward()
            precond.step()
    precond.remove_hooks()
    said = caplog.text.count("added to the model after the preconditioner was built are averaged first-order")
    assert comm.allgather_object(said) == [1] + [0] * (comm.size - 1), caplog.text  # failing on every rank
    assert "3.weight, 3.bias" in caplog.text or comm.rank != 0
    want = [torch.zeros_like(p) for p in reference[3].parameters()]
    for x in xs:
        for total, g in zip(want, torch.autograd.grad(reference(x).pow(2).mean(), list(reference[3].parameters()))):
            total += g / comm.size
    for p, w in zip(model[3].parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-15)


@pytest.mark.mpi(min_size=2)
def test_first_step_names_a_module_added_on_one_rank_only(comm):
    """A module added after construction on one rank is in no layer list that construction
    compared; the first step() names its tensor and that broadcasting weights cannot mend it
    (it said "different numbers of tensors" and advised broadcast_parameters)."""
    from hpckfac.torch import KFACPreconditioner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    precond = KFACPreconditioner(model, comm=comm)
    if comm.rank == comm.size - 1:
        model.add_module("extra", nn.Linear(2, 2))
    model(torch.randn(5, 3)).sum().backward()
    with pytest.raises(CollectiveMismatchError, match=rf"first step\(\): extra\.weight is a tensor of ranks "
                       rf"\[{comm.size - 1}\] only: the ranks' models differ; every rank must build the same model"):
        precond.step()
    precond.remove_hooks()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("same_batch", [True, False])
def test_first_step_names_the_same_batch_on_every_rank(comm, caplog, same_batch):
    """Ranks that all take the same batch (a DataLoader without a sampler, seeded alike) train
    as one process would: the first step() says so, once; ranks with their own shards hear nothing."""
    from hpckfac.torch import KFACPreconditioner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    precond = KFACPreconditioner(model, comm=comm)
    generator = torch.Generator().manual_seed(0 if same_batch else comm.rank)
    with caplog.at_level("WARNING", logger="hpckfac"):
        for _ in range(2):
            model.zero_grad()
            model(torch.randn(5, 3, generator=generator)).sum().backward()
            precond.step()
    named = caplog.text.count("every rank has the same gradients at the first step()")
    assert named == (1 if same_batch and comm.rank == 0 else 0)
    precond.remove_hooks()


@pytest.mark.mpi(min_size=2)
def test_gradients_averaged_by_distributed_data_parallel_are_not_misread(comm, caplog, monkeypatch):
    """Under DistributedDataParallel (named at construction) every rank's gradients are the
    average of all batches: alike on every rank, and an Embedding's with columns of tokens only
    other ranks looked up. Neither first-step check speaks of them, and the gradients are not
    compared at all (no copy of every gradient to the host for an answer thrown away)."""
    import os
    import tempfile

    import torch.distributed as dist

    from hpckfac.torch import KFACPreconditioner
    from hpckfac.torch import usage_checks as module

    compared = []
    real = module.gradients_alike
    monkeypatch.setattr(module, "gradients_alike", lambda *a: compared.append(1) or real(*a))

    folder = comm.mpi.bcast(tempfile.mkdtemp() if comm.rank == 0 else None, root=0)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'store')}", rank=comm.rank,
                            world_size=comm.size)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Embedding(4 * comm.size, 3), nn.Linear(3, 2)))
        with caplog.at_level("WARNING", logger="hpckfac"):
            precond = KFACPreconditioner(model, comm=comm)
            tokens = torch.arange(4 * comm.rank, 4 * comm.rank + 4).reshape(2, 2)  # this rank's tokens only
            model(tokens).square().mean().backward()
            precond.step()
        precond.remove_hooks()
    finally:
        dist.destroy_process_group()
    assert "wrapped in DistributedDataParallel" in caplog.text or comm.rank != 0
    assert "cannot give" not in caplog.text and "same gradients" not in caplog.text, caplog.text
    assert compared == []
