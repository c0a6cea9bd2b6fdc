"""``nn.MultiheadAttention`` preconditioned by K-FAC: its in-projection a Linear ``E -> 3E`` on the
query, its ``out_proj`` a Linear ``E -> E``. The oracle is the same attention written out with
``nn.Linear`` modules holding the same weights, whose factors and preconditioned gradients the
attention layer's must equal in float64; and, for one example of one position, the exact
Fisher ``vec(grad) vec(grad)^T`` of each projection."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn
from torch.utils.checkpoint import checkpoint

from hpckfac import ops
from hpckfac.comm import Communicator
from hpckfac.layers.kron import KronBlock
from hpckfac.torch import KFACPreconditioner, attention, checkpoint_context_fn

E, HEADS, BATCH, TOKENS = 6, 2, 5, 4


class ExplicitAttention(nn.Module):
    """``nn.MultiheadAttention``'s self-attention (no dropout) with its projections as
    ``nn.Linear`` modules: ``inp`` (E -> 3E: query, key, value rows) and ``out`` (E -> E), each
    applied to the layout the layer gets, ``(B, T, E)`` with ``batch_first``, else ``(T, B, E)``."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        bias = attention.in_proj_bias is not None
        self.batch_first, self.heads = attention.batch_first, attention.num_heads
        dtype = attention.in_proj_weight.dtype
        self.inp, self.out = nn.Linear(E, 3 * E, bias=bias, dtype=dtype), nn.Linear(E, E, bias=bias, dtype=dtype)
        with torch.no_grad():
            self.inp.weight.copy_(attention.in_proj_weight)
            self.out.weight.copy_(attention.out_proj.weight)
            if bias:
                self.inp.bias.copy_(attention.in_proj_bias)
                self.out.bias.copy_(attention.out_proj.bias)

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        proj = self.inp(x)
        proj = proj if self.batch_first else proj.transpose(0, 1)
        b, t, _ = proj.shape
        q, k, v = proj.view(b, t, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(E // self.heads)
        if attn_mask is not None:
            scores = scores + attn_mask
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
        heads = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, E)
        return self.out(heads if self.batch_first else heads.transpose(0, 1))


class Net(nn.Module):
    """Self-attention on a batch-first ``(B, T, E)`` input (turned sequence-first for a layer
    without ``batch_first``) and a Linear head on the mean over positions."""

    def __init__(self, attention: nn.Module, batch_first: bool, need_weights: bool = True,
                 causal: bool = False) -> None:
        super().__init__()
        self.attn, self.batch_first, self.need_weights, self.causal = attention, batch_first, need_weights, causal
        self.head = nn.Linear(E, 3)

    def forward(self, x, key_padding_mask=None):
        # The mask made here, not passed: a (T, T) argument beside (B, T, E) would leave the
        # micro-batch's size to a guess.
        attn_mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype) if self.causal \
            else None
        h = x if self.batch_first else x.transpose(0, 1)
        if isinstance(self.attn, nn.MultiheadAttention):
            h = self.attn(h, h, h, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                          need_weights=self.need_weights)[0]
        else:
            h = self.attn(h, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(torch.tanh(h).mean(1))


def pair(bias: bool, batch_first: bool, causal: bool = False) -> tuple[Net, Net]:
    """The attention network and its explicit twin, with the same random weights."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(E, HEADS, bias=bias, batch_first=batch_first).double()
    with torch.no_grad():  # torch starts the biases at zero: random ones, so that they count
        for p in attention.parameters():
            p.uniform_(-0.6, 0.6)
    twin = Net(ExplicitAttention(attention), batch_first, causal=causal).double()
    # need_weights=False: the causal case runs torch's other branch (scaled_dot_product_attention).
    net = Net(attention, batch_first, need_weights=not causal, causal=causal).double()
    twin.head.load_state_dict(net.head.state_dict())
    return net, twin


def padding(kind: str, gen: torch.Generator) -> dict:
    """With ``kind`` "padding", a key padding mask: some keys of each example, never the first."""
    if kind != "padding":
        return {}
    padded = torch.rand(BATCH, TOKENS, generator=gen) < 0.4
    padded[:, 0] = False
    return {"key_padding_mask": padded}


def run(net: Net, steps: int = 2, kind: str = "none", micro: int = 1, tokens: int = TOKENS,
        **options) -> tuple[list, list]:
    """Every block's running factors (dense) and every parameter's .grad after each step, on
    inputs of ``tokens`` positions."""
    precond = KFACPreconditioner(net, comm=Communicator(MPI.COMM_SELF), damping=1e-2, factor_update_interval=1,
                                 inverse_update_interval=1, kl_clip=None, accumulation_steps=micro, **options)
    gen = torch.Generator().manual_seed(1)
    factors, grads = [], []
    for _ in range(steps):
        net.zero_grad()
        for _ in range(micro):
            x = torch.randn(BATCH, tokens, E, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 3, (BATCH,), generator=gen)
            (nn.functional.cross_entropy(net(x, **padding(kind, gen)), y) / micro).backward()
        precond.step()
        factors.append(dense_factors(precond))
        grads.append([p.grad.clone() for p in net.parameters() if p.requires_grad])
    return factors, grads


def dense_factors(precond: KFACPreconditioner) -> list[list[np.ndarray]]:
    """Each Kronecker block's running ``[A, G]``, dense (another block's packed factors; None
    for a block without any yet)."""
    out = []
    for state, block in zip(precond.state_dict()["blocks"].values(), precond.engine.blocks):
        packed = None if state["factors"] is None else state["factors"].numpy()
        dense = packed is not None and isinstance(block, KronBlock)
        out.append(ops.unpack_sym(packed, [block.d_A, block.d_G]) if dense else packed)
    return out


def assert_same_step(factors: list, grads: list, twin_factors: list, twin_grads: list) -> None:
    """One step's factors (as ``dense_factors`` gives them) and parameter gradients equal the
    twin's, block by block and parameter by parameter."""
    for mine, theirs in zip(factors, twin_factors):
        for m, t in zip(mine, theirs):
            np.testing.assert_allclose(m, t, rtol=1e-12, atol=1e-14)
    for mine, theirs in zip(grads, twin_grads):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", ["none", "padding", "causal"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_factors_and_gradients_equal_explicit_linear_layers(bias, batch_first, kind):
    net, twin = pair(bias, batch_first, causal=kind == "causal")
    precond = KFACPreconditioner(net, comm=Communicator(MPI.COMM_SELF))
    lines = {line.split()[0]: line for line in repr(precond).splitlines()[1:]}
    d_a = E + bias
    assert f"K-FAC (A {d_a}x{d_a}, G {3 * E}x{3 * E})" in lines["attn"]
    assert f"K-FAC (A {d_a}x{d_a}, G {E}x{E})" in lines["attn.out_proj"]
    assert not precond.other_params
    precond.remove_hooks()
    factors, grads = run(net, kind=kind)
    twin_factors, twin_grads = run(twin, kind=kind)
    for step in range(2):
        assert len(grads[step]) == len(twin_grads[step]) == (6 if bias else 4)  # the same order
        assert_same_step(factors[step], grads[step], twin_factors[step], twin_grads[step])


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_statistics_fraction_and_accumulation_equal_explicit_linear_layers(batch_first):
    """The first ceil(f * n) examples of each micro-batch, over two micro-batches per step: the
    sampled rows are the same examples' in both layouts."""
    net, twin = pair(True, batch_first)
    factors, grads = run(net, kind="padding", micro=2, statistics_fraction=0.5)
    twin_factors, twin_grads = run(twin, kind="padding", micro=2, statistics_fraction=0.5)
    for step in range(2):
        assert_same_step(factors[step], grads[step], twin_factors[step], twin_grads[step])


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_a_frozen_out_proj_leaves_the_in_projection_its_statistics(batch_first):
    """With ``out_proj`` frozen only the in-projection takes statistics: the passes after the
    model's input was counted still tap the attention call for it, and its factors and the
    gradients equal the explicit twin's, whose ``out`` is frozen alike."""
    net, twin = pair(True, batch_first)
    for frozen in (net.attn.out_proj, twin.attn.out):
        frozen.requires_grad_(False)
    factors, grads = run(net)
    twin_factors, twin_grads = run(twin)
    for step in range(2):
        assert factors[step][0] is not None  # the in-projection's
        assert factors[step][1] is None and twin_factors[step][1] is None
        assert_same_step(factors[step][:1] + factors[step][2:], grads[step],
                         twin_factors[step][:1] + twin_factors[step][2:], twin_grads[step])


def test_as_many_positions_as_examples_are_read_by_the_layers_own_layout(caplog):
    """A ``(T, B, E)`` query with ``T == B`` reads the same either way round; the tap hands the
    projections over batch-first from the layer's ``batch_first``: a sequence-first layer's
    factors and gradients equal the batch-first explicit twin's on the same data, and no warning
    calls its layout ambiguous (as it would for an ``nn.Linear`` in a sequence-first model)."""
    net, _ = pair(True, batch_first=False)
    _, twin = pair(True, batch_first=True)  # the same weights, nn.Linear projections on (B, T, E)
    with caplog.at_level("WARNING", logger="hpckfac"):
        factors, grads = run(net, tokens=BATCH)
    assert "as many positions as examples" not in caplog.text
    twin_factors, twin_grads = run(twin, tokens=BATCH)
    for step in range(2):
        assert_same_step(factors[step], grads[step], twin_factors[step], twin_grads[step])


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_one_example_of_one_position_gives_the_exact_fisher(batch_first):
    """With one example of one position each projection's ``A ⊗ G`` is that example's
    ``vec(grad) vec(grad)^T`` (column-major ``vec`` of ``[W | b]``), from autograd alone."""
    net, _ = pair(True, batch_first)
    precond = KFACPreconditioner(net, comm=Communicator(MPI.COMM_SELF))
    x = torch.randn(1, 1, E, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    nn.functional.cross_entropy(net(x), torch.tensor([2])).backward()
    attention = net.attn
    grads = [torch.cat([attention.in_proj_weight.grad, attention.in_proj_bias.grad[:, None]], 1),
             torch.cat([attention.out_proj.weight.grad, attention.out_proj.bias.grad[:, None]], 1)]
    precond.step()
    for (a, g), grad in zip(dense_factors(precond)[:2], grads):
        vec = grad.numpy().T.reshape(-1)
        np.testing.assert_allclose(np.kron(a, g), np.outer(vec, vec), rtol=1e-10, atol=1e-14)


def test_parameters_replaced_after_construction_still_take_statistics():
    """``load_state_dict(..., assign=True)`` after the preconditioner was built puts new parameter
    objects in the layer: its projections are still the K-FAC layers' and take the statistics the
    explicit layers do."""
    net, twin = pair(True, True)
    precond = KFACPreconditioner(net, comm=Communicator(MPI.COMM_SELF), damping=1e-2, factor_update_interval=1,
                                 inverse_update_interval=1, kl_clip=None)
    net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()}, assign=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, TOKENS, E, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (BATCH,), generator=gen)
    nn.functional.cross_entropy(net(x), y).backward()
    precond.step()
    twin_factors, twin_grads = run(twin, steps=1)
    factors = dense_factors(precond)
    assert all(f is not None for f in factors)
    assert_same_step(factors, [p.grad for p in net.parameters()], twin_factors[0], twin_grads[0])


def test_an_out_proj_replaced_by_a_new_module_feeds_no_statistics_to_the_old_block():
    """As for any K-FAC layer replaced by a new module: the old block keeps its factors and the new
    module is averaged first-order."""
    net, _ = pair(True, True)
    precond = KFACPreconditioner(net, comm=Communicator(MPI.COMM_SELF), kl_clip=None)
    gen = torch.Generator().manual_seed(1)

    def step():
        x = torch.randn(BATCH, TOKENS, E, generator=gen, dtype=torch.float64)
        net.zero_grad()
        nn.functional.cross_entropy(net(x), torch.randint(0, 3, (BATCH,), generator=gen)).backward()
        precond.step()
        return dense_factors(precond)[1]

    before = step()
    net.attn.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(E, E, dtype=torch.float64)
    after = step()
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert net.attn.out_proj.weight.grad is not None


def test_a_checkpointed_encoder_layer_takes_the_statistics_once():
    """Under a non-reentrant checkpoint with ``checkpoint_context_fn`` the recomputation takes no
    statistics: the factors equal the uncheckpointed layer's."""
    def factors(checkpointed: bool):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(E, HEADS, 8, dropout=0.0, batch_first=True).double()
        precond = KFACPreconditioner(layer, comm=Communicator(MPI.COMM_SELF))
        x = torch.randn(BATCH, TOKENS, E, generator=torch.Generator().manual_seed(4), dtype=torch.float64,
                        requires_grad=True)
        out = checkpoint(layer, x, use_reentrant=False, context_fn=checkpoint_context_fn) if checkpointed \
            else layer(x)
        out.pow(2).mean().backward()
        precond.step()
        return dense_factors(precond)

    plain, checkpointed = factors(False), factors(True)
    assert len(plain) == 6
    for mine, theirs in zip(checkpointed, plain):
        for m, t in zip(mine, theirs):
            np.testing.assert_allclose(m, t, rtol=1e-13, atol=1e-15)


def test_cross_attention_layers_keep_the_in_projection_first_order(caplog):
    """A decoder layer's attention on the memory keeps its in-projection first-order by
    construction; another layer called as cross-attention is named once in a warning and its
    in-projection gets no statistics, while each out_proj is preconditioned; kdim/vdim other than
    embed_dim keep the separate projections first-order."""
    decoder = nn.TransformerDecoderLayer(E, HEADS, 8, dropout=0.0, batch_first=True)
    lines = {line.split()[0]: line for line in
             repr(KFACPreconditioner(decoder, comm=Communicator(MPI.COMM_SELF))).splitlines()[1:]}
    assert "first-order: cross-attention" in lines["multihead_attn"]
    assert "K-FAC (A 7x7, G 6x6)" in lines["multihead_attn.out_proj"]
    assert "K-FAC (A 7x7, G 18x18)" in lines["self_attn"]
    separate = nn.MultiheadAttention(E, HEADS, kdim=4, vdim=5)
    with caplog.at_level("WARNING", logger="hpckfac"):
        lines = {line.split()[0]: line for line in
                 repr(KFACPreconditioner(separate, comm=Communicator(MPI.COMM_SELF))).splitlines()[1:]}
    assert "first-order: kdim/vdim differ from embed_dim" in lines["(model)"]
    # the warning names the model itself as the table does, not an empty name
    assert "layer (model) (MultiheadAttention) stays first-order: kdim/vdim" in caplog.text
    caplog.clear()
    assert "K-FAC" in lines["out_proj"]

    model = nn.ModuleDict({"cross": nn.MultiheadAttention(E, HEADS, batch_first=True)})
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    gen = torch.Generator().manual_seed(5)
    with caplog.at_level("WARNING", logger="hpckfac"):
        for _ in range(2):
            query, memory = torch.randn(BATCH, TOKENS, E, generator=gen), torch.randn(BATCH, 3, E, generator=gen)
            model.zero_grad()
            model["cross"](query, memory, memory)[0].pow(2).mean().backward()
            precond.step()
    assert caplog.text.count("attention layer cross is called as cross-attention") == 1
    assert "K-FAC layers without statistics at step 0: cross " in caplog.text
    in_factors, out_factors = dense_factors(precond)
    assert in_factors is None and all(np.trace(f) > 0 for f in out_factors)
    caplog.clear()
    shared = nn.ModuleDict({"qk": nn.MultiheadAttention(E, HEADS, batch_first=True)})
    KFACPreconditioner(shared, comm=Communicator(MPI.COMM_SELF))
    with caplog.at_level("WARNING", logger="hpckfac"):  # query and key one tensor, value another
        shared["qk"](query, query, memory[:, :1].expand(-1, TOKENS, -1))
    assert "attention layer qk is called as cross-attention" in caplog.text


def test_a_torch_whose_attention_cannot_be_tapped_keeps_it_first_order(monkeypatch, caplog):
    """Where the rebound attention function reports no projection (a torch that projects
    otherwise than through torch.nn.functional's linear, stood in for by torch's own function),
    every attention layer and its out_proj stay first-order, with the reason in the table and a
    warning at construction; the other layers are preconditioned and steps raise no warning."""
    monkeypatch.setattr(attention, "_tapped", torch.nn.functional.multi_head_attention_forward)
    monkeypatch.setattr(attention, "_taps", None)
    assert not attention.tap_works()
    layer = nn.TransformerEncoderLayer(E, HEADS, 8, dropout=0.0, batch_first=True)
    with caplog.at_level("WARNING", logger="hpckfac"):
        precond = KFACPreconditioner(layer, comm=Communicator(MPI.COMM_SELF))
    assert "every nn.MultiheadAttention and its out_proj stay first-order" in caplog.text
    lines = {line.split()[0]: line for line in repr(precond).splitlines()[1:]}
    assert f"first-order: {attention.NO_TAP}" in lines["self_attn"]
    assert f"first-order: {attention.NO_TAP}" in lines["self_attn.out_proj"]
    assert "K-FAC" in lines["linear1"] and "K-FAC" in lines["norm1"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="hpckfac"):
        layer(torch.randn(BATCH, TOKENS, E)).pow(2).mean().backward()
        precond.step()
    assert caplog.text == ""
    assert all(f is not None for f in dense_factors(precond))


def test_a_failing_forward_leaves_no_mode_behind():
    """The tap entered before the forward is left when the forward raises (a mask of a wrong
    shape), so later torch calls run as usual."""
    attention = nn.MultiheadAttention(E, HEADS, batch_first=True)
    KFACPreconditioner(attention, comm=Communicator(MPI.COMM_SELF))
    x = torch.randn(BATCH, TOKENS, E)
    with pytest.raises(RuntimeError):
        attention(x, x, x, attn_mask=torch.zeros(TOKENS + 1, TOKENS))
    assert torch._C._len_torch_function_stack() == 0
    assert torch.overrides._get_current_function_mode_stack() == []


def test_eval_and_no_grad_calls_take_the_fast_path_unseen():
    """Outside training the layer runs as without hooks (torch's fast path where it applies)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 8, dropout=0.0, batch_first=True).eval()
    x = torch.randn(BATCH, TOKENS, E)
    with torch.no_grad():
        before = layer(x)
    precond = KFACPreconditioner(layer, comm=Communicator(MPI.COMM_SELF))
    with torch.no_grad():
        assert torch.equal(layer(x), before)
    assert precond.local.passes == 0


def test_bfloat16_autocast_matches_the_explicit_layers_to_its_rounding():
    """Under bfloat16 autocast the projections run in bfloat16 as the explicit Linear layers do;
    the factors agree to bfloat16's rounding of the attention in between."""
    results = []
    for net in pair(True, True):
        net.float()
        precond = KFACPreconditioner(net, comm=Communicator(MPI.COMM_SELF))
        x = torch.randn(BATCH, TOKENS, E, generator=torch.Generator().manual_seed(6))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(net(x), torch.arange(BATCH) % 3)
        loss.backward()
        precond.step()
        results.append(dense_factors(precond))
    for mine, theirs in zip(*results):
        for m, t in zip(mine, theirs):
            assert np.isfinite(m).all()
            np.testing.assert_allclose(m, t, rtol=5e-2, atol=5e-2 * np.abs(t).max())


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # dynamo's import
def test_a_compiled_layer_runs_and_leaves_the_projections_without_statistics(caplog):
    """Under ``torch.compile`` the attention's hooks do nothing where dynamo traces the layer: its
    projections take no statistics (named in the step's warning); where it runs the layer as
    Python (torch 2.1 around a module with hooks), their statistics are the eager ones. The other
    layers' factors equal the eager run's."""
    def factors(compiled: bool):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(E, HEADS, 8, dropout=0.0, batch_first=True).double()
        precond = KFACPreconditioner(layer, comm=Communicator(MPI.COMM_SELF))
        run = torch.compile(layer) if compiled else layer
        x = torch.randn(BATCH, TOKENS, E, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        run(x).pow(2).mean().backward()
        precond.step()
        assert torch._C._len_torch_function_stack() == 0
        return dense_factors(precond)

    eager = factors(False)
    with caplog.at_level("WARNING", logger="hpckfac"):
        compiled = factors(True)
    traced = compiled[0] is None
    assert compiled[:2] == [None, None] if traced else compiled[1] is not None
    assert traced == ("without statistics at step 0: self_attn, self_attn.out_proj" in caplog.text)
    for mine, theirs in zip(compiled[2 if traced else 0:], eager[2 if traced else 0:]):
        for m, t in zip(mine, theirs):
            np.testing.assert_allclose(m, t, rtol=1e-10, atol=1e-14)



class Unbatched(nn.Module):
    """Self-attention on one unbatched sequence ``(T, E)``, whose rows a Linear layer would take as
    its examples, and a Linear head on each position; with an ``ExplicitAttention`` it runs the
    sequence as a batch of one, ``(T, 1, E)``, whose leading axis is again the ``T`` rows."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attn, self.head = attention, nn.Linear(E, 3)

    def forward(self, x):
        h = self.attn(x, x, x)[0] if isinstance(self.attn, nn.MultiheadAttention) else self.attn(x[:, None])[:, 0]
        return self.head(torch.tanh(h))


def test_an_unbatched_call_equals_explicit_linear_layers_on_its_rows():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(E, HEADS).double()
    with torch.no_grad():
        for p in attention.parameters():
            p.uniform_(-0.6, 0.6)
    twin = Unbatched(ExplicitAttention(attention)).double()
    net = Unbatched(attention).double()
    twin.head.load_state_dict(net.head.state_dict())
    results = []
    for model in (net, twin):
        precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), factor_update_interval=1,
                                     inverse_update_interval=1, kl_clip=None)
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            x = torch.randn(TOKENS + 3, E, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 3, (TOKENS + 3,), generator=gen)
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            precond.step()
        results.append((dense_factors(precond), [p.grad.clone() for p in model.parameters()]))
    (factors, grads), (twin_factors, twin_grads) = results
    assert all(f is not None for f in factors)
    assert_same_step(factors, grads, twin_factors, twin_grads)
    # A key padding mask and per-head weights of an unbatched call: the values torch gives unhooked.
    plain = copy.deepcopy(attention)  # a copy's hooks act on the original only
    x = torch.randn(TOKENS + 3, E, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = torch.arange(TOKENS + 3) % 3 == 1
    for got, want in zip(attention(x, x, x, key_padding_mask=mask, average_attn_weights=False),
                         plain(x, x, x, key_padding_mask=mask, average_attn_weights=False)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_an_unbatched_cross_attention_call_keeps_its_key_and_value(caplog):
    """An unbatched cross-attention call, ``(T, E)`` query on an ``(S, E)`` memory, returns what
    torch's layer returns unhooked (a deep copy, which the hooks do not see): only a
    self-attention call is made a batch of one with a single tensor for query, key and value."""
    torch.manual_seed(0)
    layer = nn.MultiheadAttention(E, HEADS).double()
    plain = copy.deepcopy(layer)
    precond = KFACPreconditioner(layer, comm=Communicator(MPI.COMM_SELF))
    gen = torch.Generator().manual_seed(2)
    query, memory = (torch.randn(n, E, generator=gen, dtype=torch.float64) for n in (TOKENS, TOKENS + 2))
    with caplog.at_level("WARNING", logger="hpckfac"):
        got = layer(query, memory, memory)
    assert "is called as cross-attention" in caplog.text  # the tap was entered
    for mine, want in zip(got, plain(query, memory, memory)):
        torch.testing.assert_close(mine, want, rtol=1e-14, atol=1e-15)
    precond.remove_hooks()
