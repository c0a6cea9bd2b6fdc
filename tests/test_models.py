"""The torch ResNet-50 is the model whose layer shapes the scaling studies use."""
import torch

from hpckfac.bench import shapes
from hpckfac.layers import BatchNormBlock, KronBlock
from hpckfac.models import resnet50
from hpckfac.torch import KFACPreconditioner
from hpckfac.comm import Communicator
from mpi4py import MPI


def test_resnet50_blocks_are_the_shapes_table():
    model = resnet50()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    kron = {b.name: (b.d_A, b.d_G) for b in precond.engine.blocks if isinstance(b, KronBlock)}
    bn = {b.name: b.num_features for b in precond.engine.blocks if isinstance(b, BatchNormBlock)}
    table = shapes.resnet50()
    assert kron == {k.name: (k.d_A, k.d_G) for k in table.kron}
    assert bn == {b.name: b.channels for b in table.batchnorm}
    # Spatial sizes too: one forward at 224x224 gives the table's output sizes.
    sizes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, o.shape[-1]))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert sizes == {k.name: k.h_out for k in table.kron if not k.linear}
