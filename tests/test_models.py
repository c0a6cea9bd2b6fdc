"""The torch ResNet-50 is the model whose layer shapes the scaling studies use."""
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
    # The table's forward pass has zero examples: a real one gives the same shapes.
    assert shapes.from_torch("resnet50", model, (1, 3, 224, 224)) == table
