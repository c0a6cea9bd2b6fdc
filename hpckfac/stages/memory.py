"""Bytes of the buffers the K-FAC pipeline keeps on one rank, by kind.

``held_bytes`` counts the distinct buffers behind groups of arrays: a view counts as the
whole array it was taken from, and a buffer reached from two groups counts once, in the
first (at one rank the all-gather's segment is its gathered buffer). ``KFACEngine.memory``
and ``KFACPreconditioner.memory`` name the groups; docs/design.md, "Memory per rank", gives
their sizes from the blocks' shapes.
"""
from __future__ import annotations

from typing import Any, Iterable


def _root(x: Any) -> Any:
    """The array ``x`` is a view of (``x`` itself when it owns its memory); an array over
    another library's memory (a torch tensor's) is its own root."""
    while isinstance(getattr(x, "base", None), type(x)):
        x = x.base
    return x


def held_bytes(groups: dict[str, Iterable[Any]]) -> dict[str, int]:
    """Bytes of each group's distinct buffers (None entries skipped), each buffer counted in
    the first group that reaches it."""
    seen: set[int] = set()
    out = {}
    for name, arrays in groups.items():
        total = 0
        for x in arrays:
            if x is None:
                continue
            root = _root(x)
            if id(root) not in seen:
                seen.add(id(root))
                total += int(root.nbytes)
        out[name] = total
    return out
