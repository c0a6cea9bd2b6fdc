"""The distributed K-FAC pipeline on arrays (arrays in, arrays out: no torch modules), one module per stage.

- ``local_factors``: stage 1, each rank's packed statistics of one step.
- ``layout``: where each block's statistics and gradient sit in the
  ReduceScatterV buffer and its preconditioned gradient in the AllGatherV buffer.
- ``reduce_scatter``: stage 2, the send buffer and the ReduceScatterV.
- ``owner``: stage 3, running averages, damped inversion, preconditioning.
- ``all_gather``: stage 4, the AllGatherV and the KL clip.
- ``engine``: ``KFACEngine``, stages 2-4 in order for a list of blocks.
- ``options``: the defaults and the validation of every hyperparameter.
- ``state_buffer``: every block's running factors and inverses packed in one flat
  array, so that ``state_dict()`` gathers them in one AllGatherV.
"""
__all__ = ["KFACEngine"]


def __getattr__(name: str):
    # Imported on first use so that ``layout`` and ``options`` load without the numerical core.
    if name == "KFACEngine":
        from hpckfac.stages.engine import KFACEngine

        return KFACEngine
    raise AttributeError(f"module 'hpckfac.stages' has no attribute {name!r}")
