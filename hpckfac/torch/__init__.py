"""PyTorch front end of hpckfac: the K-FAC preconditioner and data-parallel helpers.

```python
from hpckfac.torch import KFACPreconditioner, broadcast_parameters, allreduce_gradients
```
"""
from hpckfac.torch.distributed import allreduce_gradients, broadcast_parameters, sync_batchnorm_stats
from hpckfac.torch.preconditioner import KFACPreconditioner

__all__ = ["KFACPreconditioner", "broadcast_parameters", "allreduce_gradients", "sync_batchnorm_stats"]
