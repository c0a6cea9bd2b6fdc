"""How many examples a micro-batch holds, read from the tensors passed to ``model(...)``.

The statistics are divided by the number of examples, so the preconditioner counts them
at every training forward: the leading size of the tensors the model is called with
(``batch_candidates``), or, when those do not settle it, the one that matches the rows the
first K-FAC layer sees (``batch_size``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Iterator

import torch
from torch.nn.utils.rnn import PackedSequence


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``value`` and in the mappings (dicts, Hugging Face's ``BatchEncoding``),
    lists, tuples and dataclass instances it nests, in order. A ``PackedSequence`` stands as an
    empty ``(sequences, 0)`` tensor: its data's rows are the time steps of every sequence, not
    examples, and its first batch size is the number of sequences."""
    if isinstance(value, PackedSequence):
        yield value.data.new_empty((int(value.batch_sizes[0]), 0))
    elif isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from tensors_in(getattr(value, field.name, None))


def batch_candidates(tensors: list[torch.Tensor]) -> list[int]:
    """The possible micro-batch sizes among the tensors passed to the model: the leading
    dimensions of those with two or more dimensions (of the 1-D ones when there are none), in
    order, a size 0 dropped beside larger ones (an empty placeholder), and a size 1 too unless it
    comes before them, then put last: after the batch, ``(1, T)`` position ids or a ``(1,)`` scale
    broadcast over it; first, a batch of one beside a tensor that is not per example (an
    attention mask ``(T, T)``, an RNN's state)."""
    for batch_like in (True, False):
        sizes = list(dict.fromkeys(int(t.shape[0]) for t in tensors if (t.dim() >= 2) == batch_like and t.dim()))
        if sizes:
            larger = [n for n in sizes if n > 1]
            return larger + [1] if larger and next(n for n in sizes if n) == 1 else larger or sizes
    return []


def batch_size(candidates: list[int], rows: int, shared: bool = False) -> tuple[int, bool]:
    """The micro-batch size among several ``candidates`` given the ``rows`` of the first K-FAC
    layer's input, and whether that choice was a guess: the candidate equal to ``rows`` (not 1
    for a layer that takes ``shared`` batch-shared inputs, ``broadcast_batch``), else the one
    larger candidate dividing ``rows`` (a layer on flattened ``(batch * positions, ...)``
    rows), else the first of those dividing it, or the first (a guess when several were
    larger than 1); ``rows`` itself without candidates."""
    if not candidates:
        return rows, False
    if rows in candidates and not (shared and rows == 1 and len(candidates) > 1):
        return rows, False
    larger = [n for n in candidates if n > 1]
    dividing = [n for n in larger if rows % n == 0]
    return (dividing or candidates)[0], len(larger) > 1 and len(dividing) != 1
