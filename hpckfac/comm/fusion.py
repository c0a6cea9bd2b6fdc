"""Tensor fusion (Horovod's idea): many small arrays reduced as few large buffers."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Hashable, Sequence

from hpckfac.arrays import namespace
from hpckfac.comm.backend import Backend

DEFAULT_BUCKET_BYTES = 64 * 2**20  # Horovod's default fusion threshold


def plan_buckets(nbytes: Sequence[int], keys: Sequence[Hashable], bucket_bytes: int) -> list[list[int]]:
    """Group array indices into buckets of at most ``bucket_bytes``.

    Arrays with the same key (dtype) share buckets, in the order given; an
    array larger than ``bucket_bytes`` gets a bucket of its own. The plan
    depends only on the sizes and keys, so ranks that agree on those agree on it.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[int]] = []
    open_bucket: dict[Hashable, tuple[list[int], int]] = {}
    for index, (size, key) in enumerate(zip(nbytes, keys)):
        members, used = open_bucket.get(key, ([], 0))
        if members and used + size > bucket_bytes:
            buckets.append(members)
            members, used = [], 0
        open_bucket[key] = (members + [index], used + size)
    buckets += [members for members, _ in open_bucket.values() if members]
    return sorted(buckets)


class FusionBuffers:
    """Reusable flat buffers, one per array library and dtype, grown on demand (kept
    between calls so that a training step does not allocate its fusion buffers)."""

    def __init__(self) -> None:
        self._buffers: dict[Any, Any] = {}

    def like(self, array: Any, length: int) -> Any:
        """A contiguous 1-D buffer of ``length`` elements in ``array``'s library and dtype."""
        # Packed next to the caller's arrays (numpy, cupy), then staged like any single buffer.
        xp = namespace(array)
        key = (xp.__name__, array.dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.size < length:
            buf = self._buffers[key] = xp.empty(length, dtype=array.dtype)
        return buf[:length]


def reduce_fused(arrays: Sequence[Any], buckets: list[list[int]], backend: Backend,
                 buffers: FusionBuffers, reduce_flat: Callable[[Any], None]) -> None:
    """Reduce every bucket of ``arrays`` with one ``reduce_flat`` call, in place.

    A bucket of one array is reduced where it lies; larger buckets are packed
    into a fusion buffer and unpacked afterwards.
    """
    for bucket in buckets:
        members = [arrays[i] for i in bucket]
        ends = list(itertools.accumulate(a.size for a in members))
        spans = [slice(end - a.size, end) for a, end in zip(members, ends)]
        fused = len(members) > 1
        packed = buffers.like(members[0], ends[-1]) if fused else members[0]
        if fused:
            for array, span in zip(members, spans):
                packed[span] = array.reshape(-1)
        work = backend.stage_in(packed)
        reduce_flat(work)
        backend.stage_out(work, packed)
        if fused:
            for array, span in zip(members, spans):
                array[...] = packed[span].reshape(array.shape)
