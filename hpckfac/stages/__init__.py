"""The distributed K-FAC pipeline on arrays (no PyTorch), one module per stage.

- ``local_factors``: stage 1, each rank's packed statistics of one step.
- ``layout``: where each block's statistics and gradient sit in the
  ReduceScatterV buffer and its preconditioned gradient in the AllGatherV buffer.
- ``owner``: stage 3, running averages, damped inversion, preconditioning.
- ``gather``: stage 4, the KL-clip factor from the owners' partial sums.
- ``engine``: ``KFACEngine``, stages 2-4 for a list of blocks.
- ``options``: validation of every hyperparameter, in one place.
"""
__all__ = ["KFACEngine"]


def __getattr__(name: str):
    # Imported on first use so that ``layout`` and ``options`` load without the numerical core.
    if name == "KFACEngine":
        from hpckfac.stages.engine import KFACEngine

        return KFACEngine
    raise AttributeError(f"module 'hpckfac.stages' has no attribute {name!r}")
