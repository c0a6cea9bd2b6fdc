"""The packed state buffer of ``state_dict()``: every block's running factors and inverses
in one flat array, so that one AllGatherV brings every owner's blocks to every rank.

Each block takes a fixed number of elements (``state_elements``), known on every rank from
the block alone: a flag for the factors and one for the inverses (1 present, 0 absent), the
packed factors, then every inverse stack. Owners write theirs (``pack_block_state``,
``OwnerState.packed_state``); the engine reads each block back as views (``unpack_block_state``).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def state_elements(block: Any) -> int:
    """Elements of ``block``'s state in a packed state buffer: a flag for the factors and one
    for the inverses (1 present, 0 absent), the packed factors, then every inverse stack; a
    fixed size, known on every rank from the block alone."""
    return 2 + block.stat_size + sum(int(np.prod(shape)) for shape in block.inverse_shapes)


def pack_block_state(block: Any, state: dict[str, Any], out: np.ndarray) -> None:
    """Write ``state`` (``{"factors": packed statistics or None, "inverses": list of stacks or
    None}``) into ``out`` (``state_elements(block)`` elements; absent parts leave zeros)."""
    factors, inverses = state["factors"], state["inverses"]
    out[0], out[1] = factors is not None, inverses is not None
    if factors is not None:
        out[2:2 + block.stat_size] = factors
    if inverses is not None:
        at = 2 + block.stat_size
        for x in inverses:
            out[at:at + x.size] = x.reshape(-1)
            at += x.size


def unpack_block_state(block: Any, packed: np.ndarray) -> dict[str, Any]:
    """``pack_block_state``'s ``state`` back from ``packed``, as views of it."""
    factors = packed[2:2 + block.stat_size] if packed[0] else None
    inverses = None
    if packed[1]:
        inverses, at = [], 2 + block.stat_size
        for shape in block.inverse_shapes:
            size = int(np.prod(shape))
            inverses.append(packed[at:at + size].reshape(shape))
            at += size
    return {"factors": factors, "inverses": inverses}
