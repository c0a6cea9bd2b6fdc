"""Hugging Face models: every parameter of a BERT preconditioned (Linear layers on token
sequences, LayerNorm, word/position/token-type embeddings) and trained with finite updates;
GPT-2's Conv1D layers preconditioned once registered, its tied embedding/head kept first-order."""
import torch
from mpi4py import MPI
from torch import nn

from hpckfac.comm import Communicator
from hpckfac.layers import LinearBlock
from hpckfac.torch import KFACPreconditioner, register_layer, registry
from torch_features import import_transformers

transformers = import_transformers()


def comm():
    return Communicator(MPI.COMM_SELF)


def test_every_bert_parameter_is_preconditioned_and_training_lowers_the_loss():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=12, type_vocab_size=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert = transformers.BertModel(config)
    head = nn.Linear(16, 2)
    model = nn.ModuleDict({"bert": bert, "head": head}).train()
    precond = KFACPreconditioner(model, comm=comm(), lr=0.01)
    assert not precond.other_params, [n for n, p in model.named_parameters()
                                      if any(p is q for q in precond.other_params)]
    kinds = {type(b).__name__ for b in precond.engine.blocks}
    assert kinds == {"LinearBlock", "LayerNormBlock", "EmbeddingBlock"}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 30, (16, 10), generator=gen)
    labels = (ids[:, 0] % 2)  # learnable from the first token
    losses = []
    for _ in range(15):
        opt.zero_grad()
        out = bert(input_ids=ids).last_hidden_state[:, 0]
        loss = nn.functional.cross_entropy(head(out), labels)
        loss.backward()
        precond.step()
        # The pooler is outside the loss: no rank has its gradient, so it stays None.
        assert all(torch.isfinite(p.grad).all() if "pooler" not in n else p.grad is None
                   for n, p in model.named_parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses  # SGD at this rate stays above 0.6 here


def test_gpt2_conv1d_registered_and_tied_weights_first_order(monkeypatch):
    from transformers.pytorch_utils import Conv1D

    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))  # registered for this test only
    register_layer(Conv1D, lambda name, m: LinearBlock(name, m.weight.shape[0], m.weight.shape[1],
                                                       bias=m.bias is not None, transposed=True))
    torch.manual_seed(2)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).train()
    precond = KFACPreconditioner(model, comm=comm())
    names = {m: n for n, m in model.named_modules()}
    covered = [names[m] for m in precond.modules]
    assert sum(isinstance(m, Conv1D) for m in precond.modules) == 8
    assert "transformer.wpe" in covered and "transformer.wte" not in covered and "lm_head" not in covered
    lines = {line.split()[0]: line for line in repr(precond).splitlines()[1:]}
    assert "tied weights" in lines["transformer.wte"] and "tied weights" in lines["lm_head"]
    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    before = model.transformer.wte.weight.grad.clone()
    precond.step()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # The tied weight is only averaged (one rank: unchanged); a Conv1D weight is preconditioned.
    assert torch.equal(model.transformer.wte.weight.grad, before)
