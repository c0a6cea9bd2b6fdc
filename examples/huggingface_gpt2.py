"""Distributed K-FAC on a Hugging Face GPT-2 (needs ``pip install transformers``).

    mpiexec -n 2 python examples/huggingface_gpt2.py

GPT-2's attention and MLP layers are ``Conv1D`` modules, a Linear layer with an
``(in, out)`` weight: one ``register_layer`` call makes hpckfac precondition them.
The token embedding is tied to the output head; such a shared weight stays
first-order (its curvature is the sum of two layers'), which ``print(precond)``
shows. The task: continue sequences that count up modulo the vocabulary.
"""
import argparse

import torch

from hpckfac.comm import Communicator
from hpckfac.layers import LinearBlock
from hpckfac.torch import KFACPreconditioner, bind_device, broadcast_parameters, register_layer

VOCAB, LENGTH = 16, 12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32,
                        help="global batch, split over the ranks (rounded down to a multiple of them)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    # Conv1D computes x @ weight + bias with weight (in, out): a transposed Linear.
    register_layer(Conv1D, lambda name, m: LinearBlock(name, m.weight.shape[0], m.weight.shape[1],
                                                       bias=m.bias is not None, transposed=True))
    comm = Communicator()
    device = bind_device(args.device, comm)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).to(device).train()
    broadcast_parameters(model, comm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    precond = KFACPreconditioner(model, lr=0.02, inverse_update_interval=5, comm=comm)
    if comm.rank == 0:
        print(precond)
    local = args.batch // comm.size
    gen = torch.Generator().manual_seed(100 + comm.rank)  # each rank: its own stream of examples
    for step in range(args.steps):
        start = torch.randint(0, VOCAB, (local, 1), generator=gen)
        ids = ((start + torch.arange(LENGTH)) % VOCAB).to(device)
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss  # the mean over this rank's tokens
        loss.backward()
        precond.step()
        optimizer.step()
        if comm.rank == 0 and (step % 20 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  (chance {torch.log(torch.tensor(VOCAB)).item():.4f})")


if __name__ == "__main__":
    main()
