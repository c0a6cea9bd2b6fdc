"""Skip marks for tests of torch features newer than the oldest torch setup.py accepts (2.1):
on an older torch such a test skips, naming what it needs, and the rest of its file runs."""
import pytest
import torch

needs_rmsnorm = pytest.mark.skipif(not hasattr(torch.nn, "RMSNorm"), reason="needs torch.nn.RMSNorm (torch >= 2.4)")

# Before torch.amp.GradScaler there is only torch.cuda.amp.GradScaler, which disables itself on the CPU.
needs_amp_grad_scaler = pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"),
                                           reason="needs torch.amp.GradScaler (torch >= 2.3)")

needs_crc32_options = pytest.mark.skipif(not hasattr(torch.serialization, "set_crc32_options"),
                                         reason="needs torch.serialization.set_crc32_options (torch >= 2.6)")


def import_transformers():
    """``transformers``, or a skip when it is not installed or has disabled its torch models for
    this torch (transformers 5 needs torch >= 2.6, and pip installs it beside an older one)."""
    transformers = pytest.importorskip("transformers")
    if not transformers.utils.is_torch_available():
        pytest.skip(f"transformers {transformers.__version__} does not use torch {torch.__version__}",
                    allow_module_level=True)
    return transformers
