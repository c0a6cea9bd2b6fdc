"""Tensor fusion (Horovod's idea): many small arrays reduced as few large buffers."""
from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

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
    """Reusable flat buffers, one per dtype, grown on demand (kept between calls
    so that a training step does not allocate its fusion buffers every time)."""

    def __init__(self) -> None:
        self._buffers: dict[Any, Any] = {}

    def get(self, backend: Backend, dtype: Any, length: int) -> Any:
        """A contiguous 1-D buffer of ``length`` elements of ``dtype`` (contents undefined)."""
        key = (backend.name, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.size < length:
            buf = self._buffers[key] = backend.xp.empty(length, dtype=dtype)
        return buf[:length]


def reduce_fused(arrays: Sequence[Any], buckets: list[list[int]], backend: Backend,
                 buffers: FusionBuffers, reduce_flat: Callable[[Any], None]) -> None:
    """Reduce every bucket of ``arrays`` with one ``reduce_flat`` call on a packed buffer, in place."""
    for bucket in buckets:
        members = [arrays[i] for i in bucket]
        if len(members) == 1:  # nothing to fuse: reduce the array itself
            work = backend.stage_in(members[0])
            reduce_flat(work)
            backend.stage_out(work, members[0])
            continue
        flat = buffers.get(backend, members[0].dtype, sum(a.size for a in members))
        offset = 0
        for array in members:
            flat[offset:offset + array.size] = array.reshape(-1)
            offset += array.size
        reduce_flat(flat)
        offset = 0
        for array in members:
            array[...] = flat[offset:offset + array.size].reshape(array.shape)
            offset += array.size
