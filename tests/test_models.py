"""hpckfac.models against the networks they describe, written out in float64 NumPy (the CIFAR
ResNets, their basic block and the causal transformer LM), their argument checks, and the
torch ResNet-50 as the model whose layer shapes the scaling studies use."""
import math

import numpy as np
import pytest
import torch

from hpckfac import models
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


def randomized(model, seed):
    """``model`` in float64 and eval mode with every parameter and BatchNorm statistic drawn at
    random (variances in [0.5, 2]), as a NumPy dict of its state."""
    rng = np.random.default_rng(seed)
    model = model.double().eval()
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                drawn = rng.uniform(0.5, 2.0, value.shape) if name.endswith("running_var") else \
                    rng.standard_normal(value.shape) / np.sqrt(max(1, value[0].numel()))
                value.copy_(torch.from_numpy(drawn))
    return model, {name: value.numpy().copy() for name, value in model.state_dict().items()}


def conv(x, w, stride=1, pad=0):
    """Float64 oracle: ``out[n, o, i, j] = sum x_padded[n, c, i*stride + a, j*stride + b] w[o, c, a, b]``."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[2]
    rows, cols = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], rows, cols))
    for a in range(k):
        for b in range(k):
            out += np.einsum("nchw,oc->nohw", x[:, :, a:a + stride * rows:stride, b:b + stride * cols:stride], w[:, :, a, b])
    return out


def batchnorm(x, s, name):
    """Float64 oracle of an eval-mode BatchNorm2d from its running statistics."""
    per_channel = [s[f"{name}.{key}"][None, :, None, None] for key in ("running_mean", "running_var", "weight", "bias")]
    mean, var, weight, bias = per_channel
    return (x - mean) / np.sqrt(var + 1e-5) * weight + bias


def relu(x):
    return np.maximum(x, 0.0)


def basic_block(x, s, name, stride):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN plus the shortcut (1x1 conv(stride)-BN where the shape
    changes), then ReLU."""
    y = relu(batchnorm(conv(x, s[f"{name}.conv1.weight"], stride, 1), s, f"{name}.bn1"))
    y = batchnorm(conv(y, s[f"{name}.conv2.weight"], 1, 1), s, f"{name}.bn2")
    if f"{name}.shortcut.0.weight" in s:
        x = batchnorm(conv(x, s[f"{name}.shortcut.0.weight"], stride), s, f"{name}.shortcut.1")
    return relu(y + x)


@pytest.mark.parametrize("depth,width,in_channels,classes", [(8, 3, 1, 10), (14, 2, 2, 5)])
def test_resnet_is_the_cifar_resnet_of_its_depth(depth, width, in_channels, classes):
    """A 3x3 stem, three stages of (depth - 2) / 6 basic blocks of width, 2 width, 4 width
    channels whose first block strides 1, 2, 2 (a projection shortcut where the shape changes),
    global average pooling and a Linear head: the logits against that network written out in
    float64, on an odd input size."""
    model, s = randomized(models.resnet(depth, width, in_channels, classes), depth)
    n = (depth - 2) // 6
    x = np.random.default_rng(1).standard_normal((3, in_channels, 9, 9))
    h = relu(batchnorm(conv(x, s["stem.0.weight"], 1, 1), s, "stem.1"))
    shortcuts = []
    for stage, stride in enumerate((1, 2, 2)):
        for b in range(n):
            name = f"stages.{stage * n + b}"
            shortcuts.append(f"{name}.shortcut.0.weight" in s)
            assert s[f"{name}.conv1.weight"].shape[0] == width * 2 ** stage
            h = basic_block(h, s, name, stride if b == 0 else 1)
    assert shortcuts == [stage > 0 and b == 0 for stage in range(3) for b in range(n)]
    assert h.shape[2:] == (3, 3)  # 9 -> 5 -> 3
    want = h.mean(axis=(2, 3)) @ s["fc.weight"].T + s["fc.bias"]
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # Parameters: a 3x3 conv and BN's scale and shift per convolution, a 1x1 conv and BN per projection.
    count, channels = 9 * in_channels * width + 2 * width, width
    for stage in range(3):
        out = width * 2 ** stage
        count += n * (9 * out * out + 2 * out) + (n - 1) * (9 * out * out + 2 * out) + 9 * channels * out + 2 * out
        count += (channels * out + 2 * out) if stage else 0
        channels = out
    assert sum(p.numel() for p in model.parameters()) == count + channels * classes + classes


def test_a_strided_basic_block_of_unchanged_width_projects_its_shortcut():
    model, s = randomized(models.BasicBlock(3, 3, stride=2), 2)
    x = np.random.default_rng(3).standard_normal((2, 3, 7, 7))
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, basic_block(x, {f"b.{k}": v for k, v in s.items()}, "b", 2),
                               rtol=1e-10, atol=1e-12)


def test_digits_cnn_is_resnet_8_on_one_channel():
    model = models.digits_cnn(width=5, num_classes=7)
    reference = models.resnet(depth=8, width=5, in_channels=1, num_classes=7)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 7)


@pytest.mark.parametrize("kwargs", [dict(depth=2), dict(depth=7), dict(depth=13), dict(depth=-4), dict(width=0),
                                    dict(in_channels=0), dict(num_classes=0)])
def test_resnet_refuses_a_depth_not_6n_plus_2_and_sizes_below_1(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        models.resnet(**kwargs)


def test_resnet50_refuses_no_classes():
    with pytest.raises(ValueError, match="num_classes"):
        models.resnet50(num_classes=0)


def layer_norm(x, s, name):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * s[f"{name}.weight"] + s[f"{name}.bias"]


def linear(x, s, name):
    return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]


def gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def test_transformer_is_a_pre_layernorm_causal_lm():
    """Token plus position embeddings; per block x + proj(attention of ln1(x) over earlier
    positions, per head) then x + fc2(gelu(fc1(ln2(x)))); a final LayerNorm and the head: the
    logits against that model written out in float64, and a later token changes no earlier logit."""
    depth, width, heads, vocab, positions = 2, 8, 2, 11, 6
    model, s = randomized(models.transformer(depth, width, heads, vocab, positions), 4)
    ids = np.random.default_rng(5).integers(0, vocab, (3, 5))
    n, t = ids.shape
    d = width // heads
    x = s["tokens.weight"][ids] + s["positions.weight"][:t]
    causal = np.tril(np.ones((t, t), dtype=bool))
    for b in range(depth):
        y = layer_norm(x, s, f"blocks.{b}.ln1")
        q, k, v = (linear(y, s, f"blocks.{b}.{p}").reshape(n, t, heads, d).transpose(0, 2, 1, 3)
                   for p in ("query", "key", "value"))
        scores = np.where(causal, q @ k.transpose(0, 1, 3, 2) / math.sqrt(d), -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        attended = (weights / weights.sum(-1, keepdims=True)) @ v
        x = x + linear(attended.transpose(0, 2, 1, 3).reshape(n, t, width), s, f"blocks.{b}.proj")
        x = x + linear(gelu(linear(layer_norm(x, s, f"blocks.{b}.ln2"), s, f"blocks.{b}.fc1")), s, f"blocks.{b}.fc2")
    want = linear(layer_norm(x, s, "ln"), s, "head")
    with torch.no_grad():
        got = model(torch.from_numpy(ids)).numpy()
        changed = ids.copy()
        changed[:, -1] = (changed[:, -1] + 1) % vocab
        later = model(torch.from_numpy(changed)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(later[:, :-1], got[:, :-1])
    assert not np.allclose(later[:, -1], got[:, -1])


@pytest.mark.parametrize("kwargs", [dict(depth=0), dict(width=0), dict(heads=0), dict(vocab=0), dict(positions=0),
                                    dict(width=10, heads=4)])
def test_transformer_refuses_sizes_below_1_and_a_width_not_a_multiple_of_heads(kwargs):
    with pytest.raises(ValueError, match="expected positive integers with width a multiple of heads"):
        models.transformer(**kwargs)
