"""The training loop at any number of ranks: every rank ends with the same model and
log, and the SGD path equals an independent single-process emulation (each shard's
gradient computed separately, averaged, one SGD step)."""
import numpy as np
import pytest
import torch
from torch import nn

from hpckfac.models import resnet
from hpckfac.train.config import TrainConfig
from hpckfac.train.data import load_dataset
from hpckfac.train.loop import Trainer

BATCH = 24  # splits over 1, 2, 3 and 4 ranks


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
