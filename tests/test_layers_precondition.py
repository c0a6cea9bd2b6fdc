"""pi-damping guards, and preconditioned gradients of Linear and Conv blocks against the dense
damped Kronecker Fisher solved with np.kron (float64)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from hpckfac.layers import BatchNormBlock, ConvBlock, EmbeddingBlock, LinearBlock, pi_damping

DAMPING = 0.03


def dense_oracle(a_rows, g_rows, batch, positions, grad):
    """Solve (A + pi sqrt(l) I) kron (G + sqrt(l)/pi I) vec(V) = vec(grad), vec column-major."""
    A = a_rows.T @ a_rows / batch
    G = g_rows.T @ g_rows / (batch * positions)
    pi = math.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
    root = math.sqrt(DAMPING)
    fisher = np.kron(A + pi * root * np.eye(len(A)), G + root / pi * np.eye(len(G)))
    return np.linalg.solve(fisher, grad.reshape(-1, order="F")).reshape(grad.shape, order="F")


def block_update(block, a, g, batch, grad):
    """The block's own solve (the pipeline's steps for one block) on its packed statistics."""
    return block.solve(block.statistics(a, g, 1 / batch), grad, DAMPING)


@pytest.mark.parametrize("bias,extra", [(True, ()), (False, ()), (True, (3,))])
def test_linear_against_dense_kron(bias, extra):
    rng = np.random.default_rng(0)
    batch = 6
    a, g = rng.standard_normal((batch, *extra, 4)), rng.standard_normal((batch, *extra, 3))
    grad = rng.standard_normal((3, 4 + bias))
    block = LinearBlock("fc", 4, 3, bias=bias)
    a_rows = a.reshape(-1, 4)
    if bias:
        a_rows = np.hstack([a_rows, np.ones((len(a_rows), 1))])
    want = dense_oracle(a_rows, g.reshape(-1, 3), batch, int(np.prod(extra)), grad)
    np.testing.assert_allclose(block_update(block, a, g, batch, grad), want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_against_dense_kron(bias):
    rng = np.random.default_rng(1)
    batch, kernel, stride, padding = 3, (2, 3), (2, 1), (1, 1)
    x = rng.standard_normal((batch, 2, 5, 4))
    block = ConvBlock("conv", 2, 3, kernel, stride, padding, (1, 1), bias)
    out = block.output_size(x.shape[2:])
    g = rng.standard_normal((batch, 3, *out))
    patches = nn.functional.unfold(torch.from_numpy(x), kernel, padding=padding, stride=stride)
    a_rows = patches.transpose(1, 2).reshape(-1, 12).numpy()
    if bias:
        a_rows = np.hstack([a_rows, np.ones((len(a_rows), 1))])
    g_rows = g.transpose(0, 2, 3, 1).reshape(-1, 3)
    grad = rng.standard_normal((3, block.d_A))
    want = dense_oracle(a_rows, g_rows, batch, int(np.prod(out)), grad)
    np.testing.assert_allclose(block_update(block, x, g, batch, grad), want, rtol=1e-10, atol=1e-13)


def test_pi_damping_balances_mean_eigenvalues():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((9, 4)), rng.standard_normal((9, 3))
    a, g = x.T @ x, y.T @ y * 0.01
    pi = math.sqrt((np.trace(a) / 4) / (np.trace(g) / 3))
    damp_a, damp_g = pi_damping(a, g, 0.04)
    assert damp_a == pytest.approx(pi * 0.2, rel=1e-14) and damp_g == pytest.approx(0.2 / pi, rel=1e-14)
    assert damp_a * damp_g == pytest.approx(0.04, rel=1e-14)
    assert pi_damping(a, g, 0.0) == (0.0, 0.0)


@pytest.mark.parametrize("trace_a,trace_g", [
    (0.0, 1.0), (1.0, 0.0), (0.0, 0.0), (math.inf, 1.0), (1.0, math.inf), (math.nan, 1.0), (1.0, math.nan),
    (-1.0, 1.0), (1e-300, 1e300), (1e300, 1e-300),
    (-1.0, -2.0),  # both mean eigenvalues negative: their ratio is positive, pi still falls back to 1
])
def test_pi_damping_guards(trace_a, trace_g):
    a, g = np.diag([trace_a, 0.0]), np.diag([trace_g, 0.0, 0.0])
    assert pi_damping(a, g, 0.09) == pytest.approx((0.3, 0.3), rel=1e-15)


def test_pi_damping_guards_an_overflowing_term():
    """Finite positive means whose pi (1.2e-155) leaves sqrt(l)/pi beyond float64's range: both get sqrt(l)."""
    a, g = np.diag([3e-310, 0.0]), np.diag([1.0, 2.0, 0.0])
    assert math.isinf(math.sqrt(1e308) / math.sqrt(1.5e-310 / 1.0))
    assert pi_damping(a, g, 1e308) == pytest.approx((1e154, 1e154), rel=1e-15)


@pytest.mark.parametrize("seed", range(3))
def test_pi_of_float32_factors_whose_trace_passes_float32s_range(seed):
    """Float32 factors with finite entries whose trace is beyond 3.4e38 (601 diagonal entries of
    ~1e36: a layer fed activations of ~1e18): pi is the float64 oracle's, from the traces summed
    in float64, not the pi = 1 of a float32 trace's inf."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((700, 601)) * 1e18
    y = rng.standard_normal((700, 5))
    a, g = (np.asarray(m.T @ m / len(m), dtype=np.float32) for m in (x, y))
    with np.errstate(over="ignore"):
        assert np.isfinite(a).all() and np.isinf(np.trace(a, dtype=np.float32))
    root = math.sqrt(DAMPING)

    def pi_of(f_a, f_g):
        return math.sqrt((np.trace(f_a, dtype=np.float64) / len(f_a)) / (np.trace(f_g, dtype=np.float64) / len(f_g)))

    pi = pi_of(a, g)
    assert pi_damping(a, g, DAMPING) == pytest.approx((pi * root, root / pi), rel=1e-6)
    damp_a, damp_g = LinearBlock("fc", 600, 5, bias=True).damping([a[None], g[None]], DAMPING)
    assert (float(damp_a[0]), float(damp_g[0])) == pytest.approx((pi * root, root / pi), rel=1e-6)
    # The same factor as G (output gradients of ~1e18): its trace summed in float64 too.
    pi = pi_of(g, a)
    assert pi_damping(g, a, DAMPING) == pytest.approx((pi * root, root / pi), rel=1e-6)
    damp_a, damp_g = LinearBlock("fc", 4, 601, bias=True).damping([g[None], a[None]], DAMPING)
    assert (float(damp_a[0]), float(damp_g[0])) == pytest.approx((pi * root, root / pi), rel=1e-6)
    counts = np.asarray(rng.integers(1, 9, size=5), dtype=np.float32)[:, None, None]  # A's 1x1 entries
    damp_a, damp_g = EmbeddingBlock("emb", 5, 601).damping([counts, a[None]], DAMPING)
    pi = pi_of(np.diag(counts.ravel()), a)
    assert (float(damp_a[0]), float(damp_g[0])) == pytest.approx((pi * root, root / pi), rel=1e-6)


@pytest.mark.parametrize("damping", [-1e-3, math.nan, math.inf, "big", None])
def test_pi_damping_rejects_bad_damping(damping):
    with pytest.raises(ValueError, match="damping"):
        pi_damping(np.eye(2), np.eye(2), damping)


@pytest.mark.parametrize("g", [np.ones((2, 3)), np.zeros((0, 0))])
def test_pi_damping_rejects_non_square_factors(g):
    with pytest.raises(ValueError, match="g:"):
        pi_damping(np.eye(2), g, 0.1)


@pytest.mark.parametrize("blocks", [
    [LinearBlock("a", 4, 3, bias=True), LinearBlock("b", 4, 3, bias=True), ConvBlock("c", 1, 3, (4,), (1,), (0,), (1,), True)],
    [ConvBlock("g", 4, 6, (3,), (1,), (1,), (1,), False, groups=2), ConvBlock("h", 4, 6, (3,), (1,), (1,), (1,), False, groups=2)],
    [BatchNormBlock("bn1", 3, 1e-5), BatchNormBlock("bn2", 5, 1e-5)],
], ids=["kron", "grouped", "unitwise"])
def test_precondition_batch_equals_each_blocks_own(blocks):
    """Blocks sharing a batch_key, preconditioned together, give each block's own result."""
    rng = np.random.default_rng(9)
    assert len({b.batch_key for b in blocks}) == 1 and blocks[0].batch_key is not None
    grads = [rng.standard_normal(b.grad_shape) for b in blocks]
    inverses = []
    for b in blocks:
        inverses.append([np.stack([spd_matrix(rng, n) for _ in range(count)]) for count, n in b.factor_shapes])
    want = np.concatenate([b.precondition(g, inv).reshape(-1) for b, g, inv in zip(blocks, grads, inverses)])
    stacks = [np.concatenate([inv[s] for inv in inverses]) for s in range(len(inverses[0]))]
    got = blocks[0].precondition_batch(np.concatenate([g.reshape(-1) for g in grads]), stacks)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="inverses"):
        blocks[0].precondition_batch(np.concatenate([g.reshape(-1) for g in grads]), [s[1:] for s in stacks])


@pytest.mark.parametrize("block", [
    LinearBlock("fc", 6, 4, bias=True), ConvBlock("g", 4, 6, (3,), (1,), (1,), (1,), False, groups=2),
], ids=["one group", "grouped"])
def test_precondition_orientation_on_general_matrices(block):
    """``precondition`` computes ``G_j^-1 X_j A_j^-1`` for each group ``j``: checked on
    non-symmetric matrices, for which a transposed inverse gives another result (the symmetric
    inverses of the pipeline cannot tell the two apart)."""
    rng = np.random.default_rng(35)
    k = block.groups
    inv_a, inv_g = rng.standard_normal((k, block.d_A, block.d_A)), rng.standard_normal((k, block.d_G, block.d_G))
    grad = rng.standard_normal(block.grad_shape)
    want = kron_oracle(inv_g, grad.reshape(k, block.d_G, block.d_A), inv_a).reshape(block.grad_shape)
    np.testing.assert_allclose(block.precondition(grad, [inv_a, inv_g]), want, rtol=1e-12, atol=1e-12)


def test_precondition_batch_keeps_the_wider_dtype():
    """float32 gradients with float64 inverses: ``precondition_batch`` returns float64, as each
    block's own ``precondition`` does, not the float64 result rounded to float32."""
    rng = np.random.default_rng(34)
    block = LinearBlock("fc", 4, 3, bias=True)
    inv_a, inv_g = spd_matrix(rng, 5)[None], spd_matrix(rng, 3)[None]
    grad = rng.standard_normal(block.grad_shape).astype(np.float32)
    got = block.precondition_batch(grad.reshape(-1), [inv_a, inv_g])
    assert got.dtype == np.float64
    want = kron_oracle(inv_g, grad[None], inv_a).reshape(-1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def spd_matrix(rng, n):
    x = rng.standard_normal((n, n + 1))
    return x @ x.T / (n + 1) + 0.1 * np.eye(n)


def kron_oracle(inv_g, grads, inv_a):
    """``inv_g[j] @ grads[j] @ inv_a[j]`` one matrix at a time in float64."""
    return np.stack([g.astype(np.float64) @ x.astype(np.float64) @ a.astype(np.float64)
                     for g, x, a in zip(inv_g, grads, inv_a)])


def test_kron_apply_orientation_on_general_matrices():
    """``kron_apply`` computes ``G^-1 X A^-1`` per stack entry, written into ``out`` in place:
    checked on non-symmetric matrices of odd sizes, for which multiplying by a transposed
    inverse or in the other order gives another result (the SPD inverses of the pipeline
    cannot tell those apart)."""
    from hpckfac.ops.kron_apply import kron_apply

    rng = np.random.default_rng(31)
    k, d_g, d_a = 3, 5, 7
    inv_g, grads, inv_a = (rng.standard_normal((k, d_g, d_g)), rng.standard_normal((k, d_g, d_a)),
                           rng.standard_normal((k, d_a, d_a)))
    out = np.full((k, d_g, d_a), np.nan)
    kron_apply(inv_g, grads, inv_a, out)
    np.testing.assert_allclose(out, kron_oracle(inv_g, grads, inv_a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("narrow", ["grads", "inv_g", "inv_a"])
def test_kron_apply_dtypes(narrow):
    """The products run in the operands' common dtype and are cast to ``out``'s: one float32
    operand (gradients or an inverse) with float64 others into a float64 ``out`` keeps float64
    accuracy, and into a float32 ``out`` is the float64 result rounded once (within half an ulp,
    where a product taken in float32 is off by several ulps of the smaller entries)."""
    from hpckfac.ops.kron_apply import kron_apply

    rng = np.random.default_rng(32)
    k, d_g, d_a = 4, 9, 11
    operands = {"inv_g": rng.standard_normal((k, d_g, d_g)), "grads": rng.standard_normal((k, d_g, d_a)),
                "inv_a": rng.standard_normal((k, d_a, d_a))}
    operands[narrow] = operands[narrow].astype(np.float32)
    inv_g, grads, inv_a = operands["inv_g"], operands["grads"], operands["inv_a"]
    exact = kron_oracle(inv_g, grads, inv_a)
    wide = np.empty((k, d_g, d_a))
    kron_apply(inv_g, grads, inv_a, wide)
    np.testing.assert_allclose(wide, exact, rtol=1e-12, atol=1e-12)
    narrow = np.empty((k, d_g, d_a), dtype=np.float32)
    kron_apply(inv_g, grads, inv_a, narrow)
    assert np.all(np.abs(narrow - exact) <= 0.51 * np.spacing(np.abs(exact).astype(np.float32)))


def test_kron_apply_reads_read_only_inputs_without_a_warning():
    """Read-only operands (a received buffer, a broadcast view) are copied for torch, which
    would otherwise warn that the memory is not writable (once per process unless told to warn
    always: a read-only array torch read earlier, e.g. through ``conv_lags``, would silence this
    test); the result is the same."""
    import warnings

    from hpckfac.ops.kron_apply import kron_apply

    rng = np.random.default_rng(33)
    inv_g, grads, inv_a = (rng.standard_normal((2, 3, 3)), rng.standard_normal((2, 3, 5)),
                           rng.standard_normal((2, 5, 5)))
    for array in (inv_g, grads, inv_a):
        array.flags.writeable = False
    out = np.empty((2, 3, 5))
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            kron_apply(inv_g, grads, inv_a, out)
    finally:
        torch.set_warn_always(always)
    np.testing.assert_allclose(out, kron_oracle(inv_g, grads, inv_a), rtol=1e-12, atol=1e-12)
