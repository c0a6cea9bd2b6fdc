"""EmbeddingBlock: its factors are a Linear layer's on one-hot inputs; one token gives the exact
Fisher; the solve against the dense damped Kronecker Fisher; the gradient layout against autograd."""
import math

import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpckfac.comm import Communicator
from hpckfac.layers import EmbeddingBlock, LinearBlock
from hpckfac.torch import KFACPreconditioner


@pytest.mark.parametrize("padding_idx", [None, 0, -2])
def test_factors_are_those_of_a_linear_layer_on_one_hot_inputs(padding_idx):
    """The padding token's row gets no gradient: its input is a zero vector, not a one-hot one."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 7, size=(5, 4))
    g = rng.standard_normal((5, 4, 3))
    block, linear = EmbeddingBlock("emb", 7, 3, padding_idx), LinearBlock("lin", 7, 3, bias=False)
    one_hot = np.eye(7)[tokens]  # (5, 4, 7)
    if padding_idx is not None:
        assert (tokens == padding_idx % 7).any()
        one_hot[..., padding_idx] = 0
    a_stack, g_stack = block.factors(block.statistics(tokens, g, 1 / 5))
    np.testing.assert_allclose(np.diag(a_stack[:, 0, 0]), linear.a_factor(one_hot, 1 / 5), rtol=1e-15)
    np.testing.assert_allclose(g_stack[0], linear.g_factor(g, 1 / 5), rtol=1e-14)
    assert block.factor_shapes == ((7, 1), (1, 3)) and block.stat_size == 7 + 6


def test_a_call_on_an_empty_sequence_adds_nothing():
    """Token batches of shape (B, 0), which nn.Embedding takes: no lookups, no rows, so such a call
    leaves another call's factors (a Linear layer's on one-hot inputs) as they were, and the
    preconditioner steps through it, rather than dividing G by its zero positions."""
    rng = np.random.default_rng(14)
    tokens, g = rng.integers(0, 7, size=(5, 4)), rng.standard_normal((5, 4, 3))
    block, linear = EmbeddingBlock("emb", 7, 3), LinearBlock("lin", 7, 3, bias=False)
    stats = block.statistics(tokens, g, 1 / 5)
    block.add_input(stats, np.empty((5, 0), dtype=np.int64))
    block.add_output_grad(stats, np.empty((5, 0, 3)), 1 / 5, None)
    a_stack, g_stack = block.factors(stats)
    np.testing.assert_allclose(np.diag(a_stack[:, 0, 0]), linear.a_factor(np.eye(7)[tokens], 1 / 5), rtol=1e-15)
    np.testing.assert_allclose(g_stack[0], linear.g_factor(g, 1 / 5), rtol=1e-14)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 3), torch.nn.Linear(3, 2)).double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    model(torch.from_numpy(tokens)).sum().backward()
    model(torch.zeros(5, 0, dtype=torch.long)).sum().backward()
    precond.step()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("token,padding_idx", [(4, None), (4, 2), (2, 2), (5, -1)])
def test_one_token_gives_the_exact_fisher(token, padding_idx):
    """Also with padding_idx; a padding token's gradient, and so its Fisher, is zero."""
    torch.manual_seed(1)
    emb = torch.nn.Embedding(6, 3, padding_idx=padding_idx).double()
    token = torch.tensor([[token]])
    g = torch.randn(1, 1, 3, dtype=torch.float64)
    emb(token).backward(g)
    block = EmbeddingBlock("emb", 6, 3, padding_idx)
    a_stack, g_stack = block.factors(block.statistics(token.numpy(), g.numpy()))
    vec = block.grad_matrix(emb.weight.grad.numpy()).reshape(-1, order="F")
    np.testing.assert_allclose(np.kron(np.diag(a_stack[:, 0, 0]), g_stack[0]), np.outer(vec, vec), atol=1e-15)


def test_gradient_layout_and_solve():
    rng = np.random.default_rng(2)
    torch.manual_seed(2)
    emb = torch.nn.Embedding(5, 3).double()
    tokens = torch.from_numpy(rng.integers(0, 4, size=(6, 2)))  # token 4 never occurs
    g = torch.randn(6, 2, 3, dtype=torch.float64)
    emb(tokens).backward(g)
    block = EmbeddingBlock("emb", 5, 3)
    mat = block.grad_matrix(emb.weight.grad.numpy())
    np.testing.assert_array_equal(mat, emb.weight.grad.numpy().T)
    np.testing.assert_array_equal(block.split_matrix(mat)[0], emb.weight.grad.numpy())
    stats = block.statistics(tokens.numpy(), g.numpy(), 1 / 6)
    grad = rng.standard_normal((3, 5))
    got = block.solve(stats, grad, 0.03)
    counts = np.bincount(tokens.numpy().ravel(), minlength=5) / 6.0
    rows = g.numpy().reshape(-1, 3)
    G = rows.T @ rows / (6 * 2)
    A = np.diag(counts)
    pi = math.sqrt((np.trace(A) / 5) / (np.trace(G) / 3))
    fisher = np.kron(A + pi * math.sqrt(0.03) * np.eye(5), G + math.sqrt(0.03) / pi * np.eye(3))
    want = np.linalg.solve(fisher, grad.reshape(-1, order="F")).reshape(grad.shape, order="F")
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


def test_precondition_orientation_on_general_matrices():
    """``precondition`` is ``G^-1 X A^-1`` with the diagonal ``A^-1`` scaling the columns: checked
    with a non-symmetric ``G^-1``, for which its transpose gives another result (the symmetric
    inverses of the pipeline cannot tell the two apart)."""
    rng = np.random.default_rng(8)
    block = EmbeddingBlock("emb", 5, 3)
    inv_a, inv_g = rng.standard_normal((5, 1, 1)), rng.standard_normal((1, 3, 3))
    grad = rng.standard_normal((3, 5))
    want = inv_g[0] @ grad @ np.diag(inv_a[:, 0, 0])
    np.testing.assert_allclose(block.precondition(grad, [inv_a, inv_g]), want, rtol=1e-12, atol=1e-12)


def test_bad_inputs_name_the_argument():
    block = EmbeddingBlock("emb", 4, 2)
    with pytest.raises(ValueError, match="a:.*integer"):
        block.statistics(np.zeros((2, 3)), np.zeros((2, 3, 2)))
    with pytest.raises(ValueError, match="a:.*outside"):
        block.statistics(np.array([[1, 4]]), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="g:"):
        block.statistics(np.array([[1, 2]]), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="g:"):  # one vector: its features are not examples
        block.statistics(np.array([1]), np.zeros(2))
    with pytest.raises(ValueError, match="weight_grad"):
        block.grad_matrix(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="num_embeddings"):
        EmbeddingBlock("emb", 0, 2)
    for padding_idx in (4, -5, 1.0):
        with pytest.raises(ValueError, match="padding_idx"):
            EmbeddingBlock("emb", 4, 2, padding_idx)
    assert EmbeddingBlock("emb", 4, 2, -4).padding_idx == 0  # counted from the end, as PyTorch stores it
    with pytest.raises(ValueError, match="grad"):  # the table's layout, (4, 2), not the gradient matrix's
        block.outside_statistics(np.ones(block.stat_size), np.zeros((4, 2)))


def test_the_preconditioner_takes_the_modules_padding_and_leaves_frequency_scaling_first_order():
    """The registry builds the block with the module's padding_idx, so the statistics taken in
    training leave the padding token out of A; scale_grad_by_freq divides each row's gradient by
    its token's count in the batch, which no per-example Fisher describes: first-order, with
    the reason."""
    torch.manual_seed(3)
    emb = torch.nn.Embedding(7, 3, padding_idx=-1).double()
    model = torch.nn.Sequential(emb, torch.nn.Linear(3, 2).double())
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    tokens = torch.tensor([[6, 1, 6, 2], [3, 6, 6, 1], [0, 0, 6, 5]])
    model(tokens).square().sum(-1).mean().backward()
    a_stack, _ = precond.engine.blocks[0].factors(precond.local.result()[0])
    counts = np.eye(7)[tokens.numpy()][..., :6].sum((0, 1))  # the padding column, 6, left out
    np.testing.assert_array_equal(a_stack[:, 0, 0], np.append(counts, 0.0) / 3)
    assert "A diagonal 7, G 3x3" in repr(precond)  # one 1x1 per token, G over the embedding's width
    scaled = torch.nn.Sequential(torch.nn.Embedding(7, 3, scale_grad_by_freq=True), torch.nn.Linear(3, 2))
    lines = repr(KFACPreconditioner(scaled, comm=Communicator(MPI.COMM_SELF))).splitlines()
    assert "first-order: scale_grad_by_freq" in next(line for line in lines if line.split()[0] == "0")


def test_a_gradient_in_a_column_no_lookup_counted_is_outside_the_statistics():
    """The lookups give exact zeros in the columns of uncounted tokens (the padding token's
    included); one nonzero entry there, from a drawn position, is flagged."""
    rng = np.random.default_rng(5)
    block = EmbeddingBlock("emb", 9, 4, padding_idx=2)
    stats = np.zeros(block.stat_size)
    tokens = np.array([[0, 2, 5], [5, 7, 2]])
    block.add_input(stats, tokens)
    grad = np.zeros(block.grad_shape)
    grad[:, [0, 2, 5, 7]] = rng.standard_normal((4, 4))  # PyTorch leaves the padding column 0:
    grad[:, 2] = 0.0                                      # the lookups alone never fill it
    assert not bool(block.outside_statistics(stats, grad))
    for column in (1, 2, 8):
        tied = grad.copy()
        tied[rng.integers(4), column] = rng.standard_normal()
        assert bool(block.outside_statistics(stats, tied)), column
    linear = LinearBlock("fc", 3, 2, bias=False)  # a kind that cannot tell
    assert linear.outside_statistics(np.ones(linear.stat_size), np.ones(linear.grad_shape)) is None


@pytest.mark.parametrize("head", ["module", "functional", "penalty"])
def test_an_embedding_read_outside_its_calls_is_named(head, caplog):
    """A token table also read as an output head through ``F.linear`` (or by a penalty in the
    loss) gets gradient in every row; the preconditioner names the layer once. A head of its
    own (a separate ``nn.Linear``) is not named."""
    torch.manual_seed(4)
    emb, other = torch.nn.Embedding(11, 4).double(), torch.nn.Linear(4, 11).double()
    precond = KFACPreconditioner(torch.nn.ModuleDict({"emb": emb, "other": other}),
                                 comm=Communicator(MPI.COMM_SELF))
    tokens = torch.randint(0, 5, (3, 6))  # tokens 5..10 never looked up
    with caplog.at_level("WARNING", logger="hpckfac"):
        for _ in range(2):
            h = emb(tokens)
            logits = torch.nn.functional.linear(h, emb.weight) if head == "functional" else other(h)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tokens.reshape(-1))
            if head == "penalty":
                loss = loss + 1e-3 * emb.weight.square().sum()
            loss.backward()
            precond.step()
    named = [r.getMessage() for r in caplog.records if "get gradient the layers' own calls cannot give" in r.getMessage()]
    assert len(named) == (0 if head == "module" else 1) and all("K-FAC layers emb:" in m for m in named)



class Positions(torch.nn.Module):
    """Token and position embeddings on ``(B, T)`` tokens; ``ids`` says how the positions are
    passed: ``"(T,)"`` (nanoGPT's ``wpe(torch.arange(T))``), ``"(1, T)"``, or not at all, the
    second table then looking up one label per example, ``(B,)``."""

    def __init__(self, ids: str, length: int) -> None:
        super().__init__()
        self.ids = ids
        self.tok, self.pos, self.head = torch.nn.Embedding(9, 4), torch.nn.Embedding(length, 4), torch.nn.Linear(4, 3)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1])
        if self.ids == "(B,)":
            extra = self.pos(tokens[:, 0] % self.pos.num_embeddings)[:, None]
        else:
            extra = self.pos(positions[None] if self.ids == "(1, T)" else positions)
        return self.head(torch.tanh(self.tok(tokens) + extra)).mean(1)


@pytest.mark.parametrize("length", [7, 10])
@pytest.mark.parametrize("ids", ["(T,)", "(1, T)", "(B,)"])
def test_one_dimensional_indices_other_than_the_batch_are_named(ids, length, caplog):
    """A (T,) input shared by the batch cannot be told from the batch flattened to (B * k,)
    indices (10 = 5 * 2 here), as which it is read: its A then counts each position once, not
    once per example, and its G takes the batch's summed gradient. A warning names the layer and
    the (1, T) form, which is expanded to the batch; the (1, T) ids and a (B,) lookup are not named."""
    torch.manual_seed(6)
    model = Positions(ids, length).double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    tokens = torch.randint(0, 9, (5, length), generator=torch.Generator().manual_seed(1))
    with caplog.at_level("WARNING", logger="hpckfac"):
        for _ in range(2):
            model(tokens).square().sum().backward()
            precond.step()
    named = [r.getMessage() for r in caplog.records if "1-D input" in r.getMessage()]
    assert len(named) == (ids == "(T,)")
    assert all("layer pos" in m and f"({length},)" in m and "[None]" in m for m in named)



@pytest.mark.parametrize("shared", [False, True])
def test_a_zero_dimensional_index_is_refused_by_name(shared):
    """``nn.Embedding`` takes a 0-d index (one lookup, no batch axis): refused in the forward
    pass with the layer's name, as other unbatched inputs are, not with an IndexError."""
    emb, head = torch.nn.Embedding(5, 3).double(), torch.nn.Linear(3, 2).double()
    KFACPreconditioner(torch.nn.ModuleDict({"emb": emb, "head": head}), comm=Communicator(MPI.COMM_SELF))
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer emb .*0-d input.*batch dimension"):
        head(x + emb(torch.tensor(2))) if shared else emb(torch.tensor(2))
