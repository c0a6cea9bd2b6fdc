"""Distributed K-FAC on a small transformer-style model over token sequences.

    mpiexec -n 2 python examples/transformer_tokens.py

The task: reverse a sequence of tokens. Every nn.Linear sees inputs of shape
(batch, tokens, features): K-FAC treats each token as a position (A summed,
G averaged over positions, as for a convolution). The token embedding gets a
diagonal A from the token counts, each LayerNorm a 2x2 Fisher per feature;
the learnt position table, a bare nn.Parameter of the model, stays
first-order and is only averaged (by hpckfac's fused allreduce: MPI's
allreduce for a gradient this small, the ring for large buckets).
print(precond) shows which is which.
"""
import argparse
import math

import torch
from torch import nn

from hpckfac.comm import Communicator
from hpckfac.torch import KFACPreconditioner, bind_device, broadcast_parameters

VOCAB, LENGTH = 12, 8


class Block(nn.Module):
    """Pre-norm self-attention and MLP, each with a residual connection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.norm2(x))


class Reverser(nn.Module):
    def __init__(self, width: int = 32, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(LENGTH, width))
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(depth)])
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens):
        return self.head(self.blocks(self.embed(tokens) + self.position))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64,
                        help="global batch, split over the ranks (rounded down to a multiple of them)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    comm = Communicator()
    device = bind_device(args.device, comm)
    local = args.batch // comm.size
    torch.manual_seed(0)
    model = Reverser().to(device)
    broadcast_parameters(model, comm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    precond = KFACPreconditioner(model, lr=0.01, damping=1e-2, inverse_update_interval=5, kl_clip=1e-2,
                                 comm=comm)
    if comm.rank == 0:
        print(precond)
    gen = torch.Generator().manual_seed(100 + comm.rank)  # each rank: its own stream of examples
    for step in range(args.steps):
        tokens = torch.randint(0, VOCAB, (local, LENGTH), generator=gen).to(device)
        target = tokens.flip(1)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(tokens).reshape(-1, VOCAB), target.reshape(-1))
        loss.backward()
        precond.step()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            mean = comm.allreduce(torch.tensor([loss.item()], dtype=torch.float64).numpy(), op="mean")[0]
            if comm.rank == 0:
                print(f"step {step:3d}  loss {mean:.4f}  (chance {math.log(VOCAB):.4f})")


if __name__ == "__main__":
    main()
