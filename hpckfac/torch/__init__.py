"""PyTorch front end of hpckfac: the K-FAC preconditioner and data-parallel helpers.

```python
from hpckfac.torch import bind_device, KFACPreconditioner, broadcast_parameters, allreduce_gradients
from hpckfac.torch import register_layer  # precondition a module type of your own
from hpckfac.torch import checkpoint_context_fn  # torch.utils.checkpoint(..., context_fn=...)
```
"""
from hpckfac.torch.device import bind_device
from hpckfac.torch.hooks import checkpoint_context_fn, recomputing
from hpckfac.torch.distributed import (allreduce_gradients, broadcast_parameters, check_replicas,
                                      sync_batchnorm_stats)
from hpckfac.torch.preconditioner import KFACPreconditioner
from hpckfac.torch.registry import register_layer

__all__ = ["bind_device", "KFACPreconditioner", "broadcast_parameters", "allreduce_gradients", "sync_batchnorm_stats",
           "check_replicas", "register_layer", "checkpoint_context_fn", "recomputing"]
