"""Training data: the embedded digits set or a user's ``.npz``, validated, and the
seeded order in which global batches visit the training examples.

The embedded ``data/digits.npz`` is scikit-learn's copy of the UCI optical
recognition of handwritten digits set (1797 8x8 images, grey levels 0..16,
labels 0..9; BSD licence), stored once so that scikit-learn is not needed at
run time.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from importlib import resources

import numpy as np

from hpckfac.log import get_logger

_log = get_logger("hpckfac.train")
# Labels are class indices 0..K-1 and the model gets a K-way output layer: beyond this K is a
# labelling mistake (raw ids, hashes), not a classification problem this trainer handles.
MAX_CLASSES = 100_000

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # the train/test split is fixed, whatever the training --seed


class DataError(ValueError):
    """A data file that is missing, unreadable or holds arrays of the wrong shape or type."""


@dataclass(frozen=True)
class Dataset:
    """Standardised float32 images ``(N, C, H, W)`` and int64 labels ``0..num_classes-1``."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def in_channels(self) -> int:
        """Channels of one input image (1 for the embedded digits)."""
        return int(self.x_train.shape[1])

    def fingerprint(self) -> str:
        """A short hash of the arrays, so a checkpoint can tell it was trained on other data."""
        digest = hashlib.sha256()
        for array in (self.x_train, self.y_train, self.x_test, self.y_test):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]


def _images(name: str, array: np.ndarray, path: str) -> np.ndarray:
    """``array`` as (N, C, H, W): (N, H, W) gains a channel axis."""
    if array.dtype.kind not in "iuf" or array.ndim not in (3, 4) or 0 in array.shape:
        raise DataError(f"{path}: '{name}' must be a non-empty numeric array of shape (N, H, W) or "
                        f"(N, C, H, W), got {array.dtype} {array.shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{path}: '{name}' contains NaN or Inf")
    channel_like = (1, 3, 4)
    if array.ndim == 4 and array.shape[-1] in channel_like and array.shape[1] not in channel_like:
        _log.warning("%s: '%s' has shape %s, which looks channels-last (N, H, W, C); it is read as "
                     "(N, C, H, W). Transpose it with x.transpose(0, 3, 1, 2) if so", path, name, array.shape)
    return array[:, None] if array.ndim == 3 else array


def _labels(name: str, array: np.ndarray, count: int, path: str) -> np.ndarray:
    if array.dtype.kind not in "iu" or array.shape != (count,):
        raise DataError(f"{path}: '{name}' must be an integer array of shape ({count},), "
                        f"got {array.dtype} {array.shape}")
    if count and array.min() < 0:
        raise DataError(f"{path}: '{name}' has negative labels (expected 0..K-1)")
    # Cast to int64 once the labels are known to be small: uint64 labels >= 2**63 would turn negative.
    return array


def _read_npz(path: str) -> dict[str, np.ndarray]:
    if os.path.isdir(path):
        raise DataError(f"{path} is a directory, not a .npz file")
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    with open(path, "rb") as head:
        magic = head.read(6)
    # np.load takes any other file for a pickle and says so, which misleads a user with a text file.
    if not magic.startswith((b"PK", b"\x93NUMPY")):
        raise DataError(f"{path}: not a .npz file (neither a zip archive nor a NumPy array)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded as archive:
                return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    raise DataError(f"{path}: a single array (.npy), not a .npz archive with arrays 'x' and 'y'")


def _split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def load_dataset(path: str | None = None) -> Dataset:
    """The embedded digits (``path=None``) or the arrays in ``path``.

    A user file holds ``x`` (N, H, W) or (N, C, H, W), ``y`` (N,) integer
    labels, and optionally ``x_test``/``y_test`` (both or neither); without
    them a fixed seeded 80/20 split is made, as for digits. Images are
    standardised with the training set's mean and standard deviation.
    Raises DataError with a one-line message on any problem.
    """
    if path is None:
        name, source = "digits", resources.files("hpckfac.train").joinpath("data/digits.npz")
        with resources.as_file(source) as local:
            arrays = _read_npz(str(local))
    else:
        name, arrays = os.path.basename(path), _read_npz(path)
    where = path or "digits.npz"
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise DataError(f"{where}: missing array(s) {', '.join(repr(k) for k in missing)} "
                        f"(found {sorted(arrays) or 'none'})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{where}: 'x_test' and 'y_test' must be given together")
    x = _images("x", arrays["x"], where)
    y = _labels("y", arrays["y"], len(x), where)
    if "x_test" in arrays:
        x_test = _images("x_test", arrays["x_test"], where)
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{where}: 'x_test' examples have shape {x_test.shape[1:]}, 'x' has {x.shape[1:]}")
        y_test = _labels("y_test", arrays["y_test"], len(x_test), where)
    else:
        train, test = _split(len(x), TEST_FRACTION, SPLIT_SEED)
        x, x_test, y, y_test = x[train], x[test], y[train], y[test]
    x, x_test = x.astype(np.float64), x_test.astype(np.float64)
    # Standardising is scale-free: for finite values near float64's range (whose sum or variance
    # would overflow and turn the images NaN) divide by a power of two first, which changes no
    # rounding, so that the standardised images are the same as if nothing had overflowed. Below
    # 2**256 no count of values can make the sum of squares overflow (above 2**500 a few dozen
    # million values already did). Values below 2**-256 are scaled up alike: their squares would
    # underflow (below 2**-511 they lose bits, below 2**-538 they are 0 and the images all zero).
    peak = float(np.abs(x).max())
    if peak > 2.0 ** 256 or 0.0 < peak < 2.0 ** -256:
        exponent = -int(np.frexp(peak)[1])  # ldexp, as 2.0 ** 1074 (for a subnormal peak) overflows
        with np.errstate(over="ignore"):  # an x_test that overflows is refused below
            x, x_test = np.ldexp(x, exponent), np.ldexp(x_test, exponent)
    mean, std = x.mean(), x.std()
    scale = 1.0 / std if std > 0 else 1.0
    num_classes = int(max(y.max(), y_test.max() if len(y_test) else 0)) + 1
    if num_classes > MAX_CLASSES:
        distinct = len(np.unique(np.concatenate([y, y_test])))
        raise DataError(f"{where}: labels go up to {num_classes - 1} ({distinct} distinct values); labels must be "
                        f"class indices 0..K-1 with K <= {MAX_CLASSES} (renumber them, e.g. np.unique(y, "
                        f"return_inverse=True)[1])")
    if num_classes < 2:
        raise DataError(f"{where}: labels must have at least 2 classes, got {num_classes}")
    with np.errstate(over="ignore"):
        x, x_test = ((x - mean) * scale).astype(np.float32), ((x_test - mean) * scale).astype(np.float32)
    if not np.isfinite(x_test).all():  # x itself cannot overflow once standardised
        raise DataError(f"{where}: 'x_test' holds values so far from those of 'x' that, standardised with the mean and "
                        "standard deviation of 'x', they overflow float32")
    return Dataset(name, x, y.astype(np.int64), x_test, y_test.astype(np.int64), num_classes)


class BatchOrder:
    """Global batch ``k`` of training: epoch ``k // steps_per_epoch`` visits the
    examples in a permutation drawn from ``numpy.random.default_rng([seed, epoch])``,
    and rank ``r`` of ``P`` takes the ``r``-th of ``P`` equal slices.

    Epochs drop the last incomplete batch. The order is a pure function of
    ``(seed, step)``, so a checkpoint's data-order state is those numbers and
    the global batch does not depend on the number of ranks.
    """

    def __init__(self, num_examples: int, global_batch: int, seed: int) -> None:
        if global_batch < 1 or global_batch > num_examples:
            raise ValueError(f"batch_size: expected 1..{num_examples} (the training examples), got {global_batch}")
        self.num_examples = num_examples
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = num_examples // global_batch
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def global_indices(self, step: int) -> np.ndarray:
        """Indices of the training examples in global batch ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        start = position * self.global_batch
        return self._perm[start:start + self.global_batch]

    def shard(self, step: int, rank: int, size: int) -> np.ndarray:
        """This rank's slice of global batch ``step`` (the batch must split evenly)."""
        if self.global_batch % size:
            raise ValueError(f"batch_size: {self.global_batch} does not split evenly over {size} ranks")
        local = self.global_batch // size
        return self.global_indices(step)[rank * local:(rank + 1) * local]

    def state_dict(self) -> dict[str, int]:
        """What determines the order (the step is stored by the caller)."""
        return {"num_examples": self.num_examples, "global_batch": self.global_batch, "seed": self.seed}

    def check_state(self, state: dict[str, int]) -> None:
        """Raise ValueError naming the first field where ``state`` differs from this order."""
        for key, value in self.state_dict().items():
            if state.get(key) != value:
                raise ValueError(f"data order: checkpoint has {key}={state.get(key)!r}, this run {value!r}")
