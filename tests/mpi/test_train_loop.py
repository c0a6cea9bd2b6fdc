"""The training loop at any number of ranks: every rank ends with the same model and
log, and the SGD path equals an independent single-process emulation (each shard's
gradient computed separately, averaged, one SGD step)."""
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

from hpckfac.models import resnet
from hpckfac.train.config import TrainConfig
from hpckfac.train.data import load_dataset
from hpckfac.train.loop import Trainer

BATCH = 24  # splits over 1, 2, 3 and 4 ranks


@pytest.fixture
def out(comm):
    """A fresh folder that every rank writes to: made by rank 0, removed after the test."""
    folder = comm.mpi.bcast(tempfile.mkdtemp() if comm.rank == 0 else None, root=0)
    yield folder
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(folder)


def _state(model):
    return np.concatenate([t.detach().double().numpy().ravel() for t in model.state_dict().values()
                           if t.is_floating_point()])


@pytest.mark.mpi
@pytest.mark.parametrize("optimizer", ["kfac", "adam"])
def test_every_rank_ends_with_the_same_model_and_log(comm, optimizer):
    config = TrainConfig(optimizer=optimizer, batch_size=BATCH, steps=4, eval_every=2, width=4, progress=False)
    result = Trainer(config, comm).run()
    mine = _state(result.model)  # parameters and the averaged BatchNorm statistics
    for other in comm.allgather_object(mine):
        np.testing.assert_array_equal(other, mine)
    records = [{k: v for k, v in r.items() if k != "wall"} for r in result.records]
    assert [r["step"] for r in records] == [2, 4]
    for other in comm.allgather_object(records):
        assert other == records


@pytest.mark.mpi
def test_sgd_path_equals_single_process_shard_emulation(comm):
    seed, steps, lr = 4, 3, 0.05
    config = TrainConfig(optimizer="sgd", batch_size=BATCH, steps=steps, lr=lr, decay_power=0.0, width=4,
                         seed=seed, eval_every=steps, progress=False)
    trained = Trainer(config, comm).run().model

    data = load_dataset()
    torch.manual_seed(seed)
    model = resnet(depth=8, width=4, in_channels=1, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    perm = np.random.default_rng([seed, 0]).permutation(len(data.x_train))
    local = BATCH // comm.size
    for step in range(steps):
        batch = perm[step * BATCH:(step + 1) * BATCH]
        grads = [torch.zeros_like(p) for p in model.parameters()]
        for r in range(comm.size):  # each rank's shard: its own forward/backward (own BatchNorm statistics)
            shard = torch.from_numpy(batch[r * local:(r + 1) * local])
            model.zero_grad()
            nn.functional.cross_entropy(model(torch.from_numpy(data.x_train)[shard]),
                                        torch.from_numpy(data.y_train)[shard]).backward()
            for g, p in zip(grads, model.parameters()):
                g += p.grad / comm.size
        for g, p in zip(grads, model.parameters()):
            p.grad = g
        opt.step()
    for (name, p), q in zip(model.named_parameters(), trained.parameters()):
        np.testing.assert_allclose(q.detach().numpy(), p.detach().numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.mpi
def test_records_follow_the_schedule_and_equal_a_single_process_emulation(comm):
    """A decaying schedule after a warmup, an evaluation after every step: each record's training
    loss and accuracy are those of the global batch's shards (weighted by their examples), its
    lr the schedule's formula at the step just taken, and the last record's test loss and
    accuracy those of the final model on the whole test set, evaluated in one process."""
    seed, steps, lr, warmup, power = 2, 3, 0.05, 1, 1.5
    config = TrainConfig(optimizer="sgd", batch_size=BATCH, steps=steps, lr=lr, warmup_steps=warmup,
                         decay_power=power, width=4, seed=seed, eval_every=1, progress=False)
    result = Trainer(config, comm).run()

    def schedule(k):
        return lr * (k + 1) / warmup if k < warmup else lr * (1 - (k - warmup) / (steps - warmup)) ** power

    data = load_dataset()
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    torch.manual_seed(seed)
    model = resnet(depth=8, width=4, in_channels=1, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    perm = np.random.default_rng([seed, 0]).permutation(len(data.x_train))
    local = BATCH // comm.size
    want = []
    for step in range(steps):
        batch = perm[step * BATCH:(step + 1) * BATCH]
        grads = [torch.zeros_like(p) for p in model.parameters()]
        loss_sum, correct = 0.0, 0
        for r in range(comm.size):
            shard = torch.from_numpy(batch[r * local:(r + 1) * local])
            model.zero_grad()
            logits = model(x[shard])
            loss = nn.functional.cross_entropy(logits, y[shard])
            loss.backward()
            loss_sum += float(loss.detach()) * local
            correct += int((logits.argmax(1) == y[shard]).sum())
            for g, p in zip(grads, model.parameters()):
                g += p.grad / comm.size
        for g, p in zip(grads, model.parameters()):
            p.grad = g
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        opt.step()
        want.append({"step": step + 1, "epoch": (step + 1) / (len(data.x_train) // BATCH),
                     "loss": loss_sum / BATCH, "train_acc": correct / BATCH, "lr": schedule(step)})
    assert len(result.records) == steps
    for got, expected in zip(result.records, want):
        assert got["step"] == expected["step"] and got["epoch"] == pytest.approx(expected["epoch"], rel=1e-12)
        assert got["lr"] == pytest.approx(expected["lr"], rel=1e-12)
        assert got["train_acc"] == expected["train_acc"]
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4)
    final = result.model
    final.eval()
    with torch.no_grad():
        logits = final(torch.from_numpy(data.x_test))
        labels = torch.from_numpy(data.y_test)
        test_loss = float(nn.functional.cross_entropy(logits.double(), labels))
        test_acc = float((logits.argmax(1) == labels).double().mean())
    assert result.records[-1]["test_loss"] == pytest.approx(test_loss, rel=1e-4)
    assert result.records[-1]["test_acc"] == pytest.approx(test_acc, rel=1e-12)


def _without_wall(records):
    return [{k: v for k, v in r.items() if k != "wall"} for r in records]


@pytest.mark.mpi
def test_a_resumed_trainer_restores_its_step_wall_and_history_and_finishes_alike(comm, out):
    """Checkpoints every 3 steps of 4 (and at the last), evaluations every 2 and at checkpoints:
    a Trainer resumed from step 3 starts at its step, wall time and records, and ends with the
    weights and records of the uninterrupted run; a decay power other than the checkpoint's is
    refused, as is another value of any setting the trajectory depends on."""
    from hpckfac.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint

    config = dict(optimizer="sgd", batch_size=BATCH, steps=4, lr=0.05, warmup_steps=1, width=4, seed=3,
                  eval_every=2, checkpoint_every=3, progress=False, stop_signals="none")
    whole = Trainer(TrainConfig(**config, out=out), comm).run()
    folder = os.path.join(out, "checkpoints")
    assert [os.path.basename(f) for f in list_checkpoints(folder)] == ["step_00000003.pt", "step_00000004.pt"]
    assert [r["step"] for r in whole.records] == [2, 3, 4]
    best = max(whole.records, key=lambda r: r["test_acc"])
    assert (whole.summary["best_test_acc"], whole.summary["best_step"]) == (best["test_acc"], best["step"])
    saved = load_checkpoint(os.path.join(folder, "step_00000003.pt"))
    resumed = Trainer(TrainConfig(**config, out=out, resume=os.path.join(folder, "step_00000003.pt")), comm)
    # Each rank times its own steps; the checkpoint holds rank 0's records and wall time.
    assert resumed.step == 3 and resumed.wall == saved["wall"] > 0 and resumed.records == saved["history"]
    assert _without_wall(resumed.records) == _without_wall(whole.records[:2])
    result = resumed.run()
    assert _without_wall(result.records) == _without_wall(whole.records)
    assert result.records[-1]["wall"] > saved["wall"]
    np.testing.assert_array_equal(_state(result.model), _state(whole.model))
    with pytest.raises(CheckpointError, match="decay_power is 2.0 there, 1.0 here"):
        Trainer(TrainConfig(**dict(config, decay_power=1.0), out=out, resume=folder), comm)
    # Every setting the trajectory depends on must match the checkpoint's.
    for name, value, compared in (("momentum", 0.5, "momentum"), ("weight_decay", 0.0, "weight_decay"),
                                  ("seed", 4, "seed"), ("lr", 0.1, "lr"), ("warmup_steps", 0, "warmup_steps"),
                                  ("steps", 5, "total_steps"), ("batch_size", 2 * BATCH, "batch_size")):
        with pytest.raises(CheckpointError, match=f"does not match this run: {compared} is "):
            Trainer(TrainConfig(**dict(config, **{name: value}), out=out, resume=folder), comm)


@pytest.mark.mpi
def test_a_kfac_checkpoint_resumes_only_with_its_own_kfac_settings(comm, out):
    """Each K-FAC setting shapes the trajectory: a K-FAC Trainer resumed with another value of
    any of them is refused, naming it (loaded anyway, the preconditioner would take the
    checkpoint's damping with a warning, and the run's intervals and statistics fraction silently)."""
    from hpckfac.train.checkpoint import CheckpointError

    config = dict(optimizer="kfac", batch_size=BATCH, steps=2, width=4, seed=2, eval_every=2, checkpoint_every=2,
                  damping=0.003, factor_decay=0.9, factor_update_interval=1, inverse_update_interval=2,
                  kl_clip=0.01, statistics_fraction=0.75, progress=False, stop_signals="none")
    Trainer(TrainConfig(**config, out=out), comm).run()
    folder = os.path.join(out, "checkpoints")
    assert Trainer(TrainConfig(**config, out=out, resume=folder), comm).step == 2
    for name, value in (("damping", 0.01), ("factor_decay", 0.95), ("factor_update_interval", 2),
                        ("inverse_update_interval", 1), ("kl_clip", 0.0), ("statistics_fraction", 1.0)):
        with pytest.raises(CheckpointError, match=f"does not match this run: {name} is {config[name]!r} there, "
                                                  f"{value!r} here"):
            Trainer(TrainConfig(**dict(config, **{name: value}), out=out, resume=folder), comm)


@pytest.mark.mpi
def test_a_checkpoint_of_replicas_that_drifted_apart_is_refused_on_every_rank(comm, out):
    """Rank 0 writes the weights of every rank: replicas that differ (one rank's weights moved
    apart) make save() raise CollectiveMismatchError on every rank, and nothing is written."""
    from hpckfac.comm import CollectiveMismatchError

    if comm.size == 1:
        return  # one replica cannot differ from another
    trainer = Trainer(TrainConfig(optimizer="sgd", batch_size=BATCH, steps=2, width=4, seed=1, out=out,
                                  progress=False, stop_signals="none"), comm)
    trainer.train_step()
    if comm.rank == comm.size - 1:
        weight = next(trainer.model.parameters())
        with torch.no_grad():
            weight.add_(1e-3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(7)))
    with pytest.raises(CollectiveMismatchError, match="replicas differ"):
        trainer.save()
    assert not os.path.exists(os.path.join(out, "checkpoints"))


@pytest.mark.mpi
def test_rank_0_alone_writes_the_runs_files(comm, out, monkeypatch):
    """Ranks that share a file system would otherwise race on the same files, and prune the
    same old checkpoints twice."""
    from hpckfac.train import loop

    written = []
    real_replace, real_append = os.replace, loop.append_lines

    def replace(src, dst):
        written.append(os.path.basename(dst))
        real_replace(src, dst)

    def append(path, lines):
        written.append(os.path.basename(path))
        real_append(path, lines)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(loop, "append_lines", append)
    config = TrainConfig(optimizer="sgd", batch_size=BATCH, steps=4, eval_every=2, checkpoint_every=2,
                         keep_checkpoints=1, width=4, progress=False, stop_signals="none", out=out)
    Trainer(config, comm).run()
    everyone = comm.allgather_object(sorted(set(written)))
    assert {"step_00000002.pt", "step_00000004.pt", "log.json"} <= set(everyone[0]), everyone[0]
    assert everyone[1:] == [[]] * (comm.size - 1)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_00000004.pt"]
