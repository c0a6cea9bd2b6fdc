"""Serial tests of the training front end's pieces: data, batch order, schedule,
configuration, checkpoints and plots."""
import math
import os
import signal

import numpy as np
import pytest
import torch

from hpckfac.train import checkpoint as ckpt
from hpckfac.train.config import TrainConfig, stop_signals
from hpckfac.train.data import BatchOrder, DataError, Dataset, load_dataset
from hpckfac.train.plot import plot_curves, plot_history
from hpckfac.train.schedule import WarmupPolynomialDecay
from torch_features import needs_crc32_options

PNG = b"\x89PNG\r\n\x1a\n"
DIGITS = os.path.join(os.path.dirname(__file__), "..", "hpckfac", "train", "data", "digits.npz")


# ------------------------------------------------------------------ data
def _unstandardise(x):
    """Raw grey levels 0..16 back from standardised ones: the smallest value is level 0
    and neighbouring levels are 1/std apart."""
    levels = np.unique(x.astype(np.float64))
    std = 1.0 / np.diff(levels).min()
    return np.round((x - levels[0]) * std).astype(np.uint8)


def test_digits_split_standardised_and_complete():
    raw = np.load(DIGITS)
    assert raw["x"].dtype == np.uint8 and raw["x"].shape == (1797, 8, 8) and raw["x"].max() == 16
    data = load_dataset()
    assert data.x_train.shape == (1438, 1, 8, 8) and data.x_test.shape == (359, 1, 8, 8)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64 and data.num_classes == 10
    assert abs(float(data.x_train.mean())) < 1e-5 and abs(float(data.x_train.std()) - 1) < 1e-4
    # train + test are exactly the raw (image, label) pairs, each once
    images = _unstandardise(np.concatenate([data.x_train, data.x_test])[:, 0])
    labels = np.concatenate([data.y_train, data.y_test])
    assert sorted((i.tobytes(), int(y)) for i, y in zip(images, labels)) == \
        sorted((i.tobytes(), int(y)) for i, y in zip(raw["x"], raw["y"]))
    assert load_dataset().fingerprint() == data.fingerprint()


def test_user_npz_with_and_without_test_arrays(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.normal(3.0, 2.0, (50, 2, 6, 6)), rng.integers(0, 4, 50)
    path = tmp_path / "own.npz"
    np.savez(path, x=x, y=y)
    data = load_dataset(str(path))
    assert data.x_train.shape == (40, 2, 6, 6) and data.x_test.shape == (10, 2, 6, 6) and data.in_channels == 2
    np.savez(path, x=x[:, 0], y=y, x_test=x[:7, 0] + 1, y_test=y[:7])
    data = load_dataset(str(path))
    assert data.x_train.shape == (50, 1, 6, 6) and data.x_test.shape == (7, 1, 6, 6)
    mean, std = x[:, 0].mean(), x[:, 0].std()
    np.testing.assert_allclose(data.x_test[:, 0], (x[:7, 0] + 1 - mean) / std, rtol=1e-5, atol=1e-5)
    assert data.num_classes == int(y.max()) + 1
    # A class seen only among the test labels still gets its output: K is the largest label of either + 1.
    np.savez(path, x=x[:, 0], y=y, x_test=x[:3, 0], y_test=np.array([0, 6, 1]))
    assert load_dataset(str(path)).num_classes == 7
    # The largest K taken: labels up to MAX_CLASSES - 1 (one more is refused, as the errors' test shows).
    np.savez(path, x=x[:, 0], y=y, x_test=x[:3, 0], y_test=np.array([0, 99_999, 1]))
    assert load_dataset(str(path)).num_classes == 100_000


def test_the_split_without_test_arrays_is_the_fixed_seeded_one(tmp_path):
    """The test set is the first round(N / 5) of numpy's Generator(0) permutation of N, whatever
    the training seed, and both sets keep the file's order. N = 48: rounding gives 10 test
    examples where truncating would give 9."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(1.0, 3.0, (48, 5, 5)), rng.integers(0, 6, 48)
    path = tmp_path / "own.npz"
    np.savez(path, x=x, y=y)
    data = load_dataset(str(path))
    test = np.sort(np.random.default_rng(0).permutation(48)[:10])
    train = np.setdiff1d(np.arange(48), test)
    mean, std = x[train].mean(), x[train].std()
    np.testing.assert_array_equal(data.y_train, y[train])
    np.testing.assert_array_equal(data.y_test, y[test])
    np.testing.assert_allclose(data.x_train[:, 0], (x[train] - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data.x_test[:, 0], (x[test] - mean) / std, rtol=1e-5, atol=1e-5)


def test_the_fingerprint_covers_every_array_and_its_shape():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(12, 1, 4, 4)).astype(np.float32), rng.integers(0, 3, 12)
    base = Dataset("d", x[:9], y[:9], x[9:], y[9:], 3)
    others = [Dataset("d", x[:9], (y[:9] + 1) % 3, x[9:], y[9:], 3),
              Dataset("d", x[:9], y[:9], x[9:], (y[9:] + 1) % 3, 3),
              Dataset("d", x[:9].copy(), y[:9], -x[9:], y[9:], 3),
              # the same bytes as other images: 2x8 instead of 4x4
              Dataset("d", x[:9].reshape(9, 1, 2, 8), y[:9], x[9:].reshape(3, 1, 2, 8), y[9:], 3)]
    assert len({base.fingerprint(), *(other.fingerprint() for other in others)}) == 5
    assert Dataset("d", x[:9].copy(), y[:9].copy(), x[9:].copy(), y[9:].copy(), 3).fingerprint() == base.fingerprint()


def test_constant_images_are_centred_not_scaled(tmp_path):
    # No spread to divide by: the images are only centred (all zero), never NaN.
    path = tmp_path / "flat.npz"
    np.savez(path, x=np.full((10, 4, 4), 3.0), y=np.arange(10) % 2, x_test=np.full((2, 4, 4), 5.0), y_test=np.arange(2))
    data = load_dataset(str(path))
    assert not data.x_train.any()
    np.testing.assert_array_equal(data.x_test, np.full((2, 1, 4, 4), 2.0, dtype=np.float32))


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros(4, int)}, "missing array(s) 'x'"),
    ({"x": np.zeros((4, 8, 8)), "y": np.zeros(5, int)}, "'y' must be an integer array of shape (4,)"),
    ({"x": np.zeros((4, 8, 8)), "y": np.zeros(4)}, "'y' must be an integer array"),
    ({"x": np.zeros((4, 64)), "y": np.zeros(4, int)}, "'x' must be a non-empty numeric array of shape (N, H, W)"),
    ({"x": np.array([[[np.nan]]] * 4), "y": np.arange(4)}, "'x' contains NaN or Inf"),
    ({"x": np.zeros((4, 8, 8)), "y": np.arange(4), "x_test": np.zeros((2, 8, 8))}, "given together"),
    ({"x": np.zeros((4, 8, 8)), "y": np.arange(4), "y_test": np.arange(2)}, "given together"),
    ({"x": np.zeros((4, 8, 8)), "y": np.arange(4), "x_test": np.zeros((2, 7, 8)), "y_test": np.arange(2)},
     "'x_test' examples have shape"),
    ({"x": np.zeros((4, 1, 8, 8)), "y": np.arange(4), "x_test": np.zeros((2, 3, 8, 8)), "y_test": np.arange(2)},
     "'x_test' examples have shape (3, 8, 8), 'x' has (1, 8, 8)"),
    ({"x": np.zeros((4, 8, 8)), "y": -np.arange(4)}, "negative labels"),
    ({"x": np.zeros((4, 8, 8)), "y": np.array([0, 1, -1, 1])}, "negative labels"),
    ({"x": np.zeros((4, 8, 8)), "y": np.zeros(4, int)}, "labels must have at least 2 classes, got 1"),
    ({"x": np.zeros((4, 8, 8)), "y": np.array([0, 1, 0, 100_000])}, "labels go up to 100000 (3 distinct values)"),
    ({"x": np.zeros((4, 8, 8)), "y": np.array([0, 1, 2, 10**9])}, "labels go up to 1000000000 (4 distinct values)"),
    # uint64 labels beyond int64: named as they are, not wrapped to a negative class index.
    ({"x": np.zeros((4, 8, 8)), "y": np.array([0, 1, 2, 2**63], dtype=np.uint64)},
     "labels go up to 9223372036854775808 (4 distinct values)"),
    ({"x": np.random.default_rng(0).random((4, 8, 8)) * 1e-30, "y": np.arange(4),
      "x_test": np.full((2, 8, 8), 1e300), "y_test": np.arange(2)}, "'x_test' holds values so far from those of 'x'"),
])
def test_bad_npz_contents_raise_one_line_data_errors(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_test_images_that_overflow_float32_are_refused_without_a_warning(tmp_path):
    """The overflow to float32 of x_test is reported by the DataError alone (the one line the CLI
    prints), not also by NumPy's RuntimeWarning from the cast."""
    import warnings

    path = tmp_path / "far.npz"
    np.savez(path, x=np.random.default_rng(1).random((4, 8, 8)), y=np.arange(4), x_test=np.full((2, 8, 8), 1e300),
             y_test=np.arange(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="'x_test' holds values so far from those of 'x'"):
            load_dataset(str(path))


@pytest.mark.parametrize("size", [2.0 ** 515, 1e200, 1e308, 1e-6, 1e-160, 1e-200, 2.0 ** -1040],
                         ids=["variance overflows", "1e200", "1e308", "1e-6", "squares subnormal", "1e-200", "subnormal"])
def test_finite_images_near_float64s_range_are_standardised(tmp_path, size):
    """Values whose variance (from 2**512 on) or sum overflows float64 are finite all the same:
    their images are standardised as smaller ones would be, not turned NaN (a 'diverged' run later);
    values whose squares underflow are not turned all zero either."""
    x = np.random.default_rng(0).random((20, 8, 8))
    path = tmp_path / "huge.npz"
    np.savez(path, x=x * size, y=np.arange(20) % 2, x_test=x[:5] * size, y_test=np.arange(5) % 2)
    huge = load_dataset(str(path))
    np.savez(path, x=x, y=np.arange(20) % 2, x_test=x[:5], y_test=np.arange(5) % 2)
    plain = load_dataset(str(path))
    assert np.isfinite(huge.x_train).all() and np.isfinite(huge.x_test).all()
    np.testing.assert_allclose(huge.x_train, plain.x_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(huge.x_test, plain.x_test, rtol=1e-5, atol=1e-5)


def test_channels_last_images_are_flagged(tmp_path, caplog):
    path = tmp_path / "nhwc.npz"
    np.savez(path, x=np.random.default_rng(0).random((10, 8, 8, 3)), y=np.arange(10) % 2)
    with caplog.at_level("WARNING", logger="hpckfac"):
        data = load_dataset(str(path))
    assert "looks channels-last" in caplog.text and data.x_train.shape[1:] == (8, 8, 3)
    caplog.clear()
    # Not flagged: a channel-like last axis after a channel-like second one (4x4 images of 3 channels)
    for shape in ((10, 3, 8, 8), (10, 3, 8, 4)):
        np.savez(path, x=np.random.default_rng(0).random(shape), y=np.arange(10) % 2)
        with caplog.at_level("WARNING", logger="hpckfac"):
            load_dataset(str(path))
        assert "channels-last" not in caplog.text, shape


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_dataset(str(tmp_path / "nope.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match=r"junk\.npz: not a \.npz file \(neither a zip archive nor a NumPy array\)$"):
        load_dataset(str(tmp_path / "junk.npz"))
    archive = tmp_path / "cut.npz"
    np.savez(archive, x=np.random.default_rng(1).random((4, 8, 8)), y=np.arange(4))
    archive.write_bytes(archive.read_bytes()[:100])
    with pytest.raises(DataError, match=r"cut\.npz: not a readable \.npz file \("):
        load_dataset(str(archive))
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8)))
    with pytest.raises(DataError, match=r"x\.npy: a single array \(\.npy\), not a \.npz archive with arrays 'x'"):
        load_dataset(str(tmp_path / "x.npy"))
    with pytest.raises(DataError, match="is a directory, not a .npz file"):
        load_dataset(str(tmp_path))


# ----------------------------------------------------------- batch order
def test_batch_order_epochs_shards_and_seeds():
    order = BatchOrder(103, 20, seed=5)
    assert order.steps_per_epoch == 5
    for epoch in range(2):
        seen = np.concatenate([order.global_indices(epoch * 5 + k) for k in range(5)])
        assert len(seen) == 100 and len(np.unique(seen)) == 100 and seen.max() < 103
    # the permutation is numpy's Generator([seed, epoch]); rank shards tile the global batch
    perm = np.random.default_rng([5, 1]).permutation(103)
    np.testing.assert_array_equal(order.global_indices(7), perm[40:60])
    for size in (1, 2, 4, 5):
        shards = [order.shard(7, r, size) for r in range(size)]
        np.testing.assert_array_equal(np.concatenate(shards), perm[40:60])
    with pytest.raises(ValueError, match="batch_size: 20 does not split evenly over 3 ranks"):
        order.shard(0, 0, 3)
    assert not np.array_equal(BatchOrder(103, 20, seed=6).global_indices(0), order.global_indices(0))
    with pytest.raises(ValueError, match="batch_size: expected 1..103"):
        BatchOrder(103, 104, seed=0)
    # The whole training set as one batch: one step an epoch, every example in it.
    whole = BatchOrder(103, 103, seed=5)
    assert whole.steps_per_epoch == 1
    np.testing.assert_array_equal(whole.global_indices(1), perm)
    order.check_state(order.state_dict())
    for key, value in (("num_examples", 102), ("global_batch", 10), ("seed", 4)):
        with pytest.raises(ValueError, match=f"data order: checkpoint has {key}={value}, this run"):
            order.check_state({**order.state_dict(), key: value})
        # A state without the field differs from this order too.
        with pytest.raises(ValueError, match=f"data order: checkpoint has {key}=None, this run"):
            order.check_state({k: v for k, v in order.state_dict().items() if k != key})


# -------------------------------------------------------------- schedule
def test_warmup_then_polynomial_decay():
    s = WarmupPolynomialDecay(0.4, total_steps=14, warmup_steps=4, power=2.0)
    np.testing.assert_allclose([s(k) for k in range(4)], [0.1, 0.2, 0.3, 0.4])
    for k in range(4, 14):
        assert math.isclose(s(k), 0.4 * (1 - (k - 4) / 10) ** 2)
    assert s(13) > 0 and s(14) == 0.0
    flat = WarmupPolynomialDecay(0.1, total_steps=5, power=0.0)
    assert [flat(k) for k in range(5)] == [0.1] * 5


def test_schedule_of_random_settings_against_the_formula():
    # Powers other than 2 and 0, warmups other than 4: the formula written out at every step.
    rng = np.random.default_rng(11)
    for _ in range(20):
        base, total = float(rng.uniform(0.01, 1.0)), int(rng.integers(2, 40))
        warmup, power = int(rng.integers(0, total)), float(rng.uniform(0.1, 4.0))
        s = WarmupPolynomialDecay(base, total_steps=total, warmup_steps=warmup, power=power)
        for k in range(total):
            if k < warmup:
                want = base * (k + 1) / warmup
            else:
                want = base * (1 - (k - warmup) / (total - warmup)) ** power
            assert math.isclose(s(k), want, rel_tol=1e-12), (base, total, warmup, power, k)
        # Zero from one step after the last on (a real number for every power).
        assert s(total) == 0.0 and s(total + 3) == 0.0


@pytest.mark.parametrize("kwargs, name", [
    ({"base_lr": 0.0}, "lr"), ({"base_lr": float("nan")}, "lr"), ({"total_steps": 0}, "steps"),
    ({"warmup_steps": 10}, "warmup_steps"), ({"warmup_steps": -1}, "warmup_steps"), ({"power": -1.0}, "decay_power"),
])
def test_schedule_validation_names_the_parameter(kwargs, name):
    args = {"base_lr": 0.1, "total_steps": 10, "warmup_steps": 0, "power": 2.0, **kwargs}
    with pytest.raises(ValueError, match=f"^{name}:"):
        WarmupPolynomialDecay(**args)


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("field, value", [
    ("optimizer", "lbfgs"), ("batch_size", 0), ("steps", 0), ("epochs", -1), ("lr", -0.1),
    ("lr", float("inf")), ("momentum", 1.0), ("weight_decay", -1e-4), ("damping", 0.0), ("damping", 1e300),
    ("factor_decay", 1.0), ("factor_update_interval", 0), ("inverse_update_interval", 0),
    ("kl_clip", -1.0), ("width", 0), ("seed", -1), ("seed", 2**64), ("eval_every", 0), ("checkpoint_every", -2),
    ("batch_size", 2.5), ("steps", True), ("data", 7), ("out", ["runs"]), ("resume", 3.0),
    ("stop_signals", "KILL"), ("stop_signals", "TERM,NOPE"), ("stop_signals", 10),
    ("statistics_fraction", 0.0), ("statistics_fraction", 1.5),
    ("epochs", 0), ("warmup_steps", -1), ("keep_checkpoints", -1), ("decay_power", -0.5), ("progress", "fancy"),
    ("device", "tpu"), ("lr", 1e39), ("weight_decay", 1e39),  # 1e39: beyond float32, which the parameters are
])
def test_config_validation_names_the_setting(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        TrainConfig(**{field: value}).validate()


def test_config_paths_may_be_path_objects(tmp_path):
    """data, out and resume take a str or an os.PathLike (a resumed run's come from its checkpoint)."""
    config = TrainConfig(data=tmp_path / "d.npz", out=tmp_path, resume=tmp_path / "ckpt").validate()
    assert [os.fspath(p) for p in (config.data, config.out, config.resume)] == [
        os.fspath(p) for p in (tmp_path / "d.npz", tmp_path, tmp_path / "ckpt")]


def test_config_relative_paths_become_absolute(tmp_path, monkeypatch):
    """As the checkpoint records them: a run resumed from another directory finds them."""
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(data="d.npz", out="runs/a").validate()
    assert (config.data, config.out) == (str(tmp_path / "d.npz"), str(tmp_path / "runs" / "a"))


@pytest.mark.parametrize("spec, want", [("", ()), (" , ", ()), ("none", ()), (" none ", ()),
                                        ("TERM,USR1,TERM", ("SIGTERM", "SIGUSR1")),
                                        (str(int(signal.SIGUSR1)), ("SIGUSR1",))])
def test_stop_signals_setting(spec, want):
    assert tuple(signal.Signals(s).name for s in stop_signals(spec)) == want


def test_progress_takes_a_bool_or_a_mode():
    assert [TrainConfig(progress=p).validate().progress for p in (True, False, "bar", "lines")] == [
        "auto", "none", "bar", "lines"]


def test_config_defaults_and_checkpoint_needs_out():
    assert TrainConfig(optimizer="adam").validate().lr == 0.003
    assert TrainConfig(optimizer="sgd", lr=0.5).validate().lr == 0.5
    assert TrainConfig(seed=2**64 - 1).validate().seed == 2**64 - 1  # torch.manual_seed's largest
    with pytest.raises(ValueError, match="^checkpoint_every: needs --out"):
        TrainConfig(checkpoint_every=5).validate()


def test_memory_needed_counts_weights_four_times_and_the_factors():
    from torch import nn

    from hpckfac.train.loop import memory_needed

    def build():
        return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))

    # float32 weights, gradients, momentum and gradient buffers: 4 x 4 bytes a parameter.
    first_order = 4 * 4 * ((3 * 4 + 4) + (4 * 2 + 2))
    assert memory_needed(build, kfac=False) == first_order
    # K-FAC: each Linear's A (inputs + bias) and G factors, float32.
    assert memory_needed(build, kfac=True) == first_order + 4 * ((4 ** 2 + 4 ** 2) + (5 ** 2 + 2 ** 2))


# ------------------------------------------------------------ checkpoint
def _state(step=3):
    return {"step": step, "config": {"optimizer": "sgd", "batch_size": 8}, "data": "abc",
            "model": {"w": torch.randn(3, 2)}, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
            "preconditioner": None, "data_order": {"seed": 1}, "history": [{"step": 1, "loss": 2.5}],
            "wall": 1.5, "torch_rng": torch.get_rng_state()}


def test_checkpoint_round_trip_is_atomic_and_findable(tmp_path):
    state = _state()
    for step in (3, 12, 7):
        ckpt.save_checkpoint(ckpt.checkpoint_path(str(tmp_path / "checkpoints"), step), _state(step))
    ckpt.save_checkpoint(ckpt.checkpoint_path(str(tmp_path / "checkpoints"), 3), state)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [f"step_{k:08d}.pt" for k in (3, 7, 12)]
    latest = ckpt.find_checkpoint(str(tmp_path))
    assert latest.endswith("step_00000012.pt") and ckpt.find_checkpoint(latest) == latest
    loaded = ckpt.load_checkpoint(ckpt.checkpoint_path(str(tmp_path / "checkpoints"), 3))
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["history"] == state["history"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no step_"):
        ckpt.find_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint file or directory"):
        ckpt.find_checkpoint(str(tmp_path / "missing"))


def test_checkpoint_that_fails_to_write_leaves_the_old_one(tmp_path, monkeypatch):
    path = str(tmp_path / "step_00000001.pt")
    ckpt.save_checkpoint(path, _state(1))

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, _state(2))
    assert os.listdir(tmp_path) == ["step_00000001.pt"]
    assert ckpt.load_checkpoint(path)["step"] == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign", "incomplete", "version"])
def test_corrupt_or_foreign_checkpoints_raise_checkpoint_error(tmp_path, damage):
    path = str(tmp_path / "step_00000004.pt")
    ckpt.save_checkpoint(path, _state(4))
    if damage == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "garbage":
        open(path, "wb").write(os.urandom(2000))
    elif damage == "foreign":
        torch.save({"model": torch.zeros(2)}, path)
    else:
        state = torch.load(path, weights_only=True)
        if damage == "incomplete":
            del state["optimizer"]
        else:
            state["version"] = 99
        torch.save(state, path)
    reason = {"truncate": "is corrupt or unreadable", "garbage": "is corrupt or unreadable",
              "foreign": "is not an hpckfac training checkpoint", "incomplete": "is incomplete \\(missing optimizer\\)",
              "version": "has format version 99, this hpckfac reads 1"}[damage]
    with pytest.raises(ckpt.CheckpointError, match=reason) as info:
        ckpt.load_checkpoint(path)
    assert path in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("crc", [True, pytest.param(False, marks=needs_crc32_options)])
def test_a_checkpoint_with_damaged_tensor_bytes_is_refused(tmp_path, crc):
    """torch.load does not compare a zip member with its CRC-32: weights whose bytes were damaged
    on disk (still finite numbers) loaded as other weights. A file written without checksums
    still loads."""
    path = str(tmp_path / "step_00000004.pt")
    state = _state(4)
    weights = torch.from_numpy(np.random.default_rng(0).uniform(1.0, 2.0, 256).astype(np.float32))
    state["model"] = {"w": weights}
    if crc:  # torch's default, and the only way before set_crc32_options
        ckpt.save_checkpoint(path, state)
    else:
        previous = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            ckpt.save_checkpoint(path, state)
        finally:
            torch.serialization.set_crc32_options(previous)
    data = bytearray(open(path, "rb").read())
    start = bytes(data).find(weights.numpy().tobytes())
    assert start > 0
    data[start + 2] ^= 0x01  # a mantissa bit of the first weight: still a finite number near it
    open(path, "wb").write(bytes(data))
    if crc:
        with pytest.raises(ckpt.CheckpointError, match="is corrupt or unreadable \\(Bad CRC-32"):
            ckpt.load_checkpoint(path)
    else:
        loaded = ckpt.load_checkpoint(path)["model"]["w"]
        assert torch.isfinite(loaded).all() and not torch.equal(loaded, weights)


@pytest.mark.parametrize("key,value", [("step", -4), ("step", 6.5), ("step", True), ("config", None),
                                       ("config", [1]), ("history", 5), ("history", [1, 2]), ("data_order", None),
                                       ("wall", float("nan")), ("wall", float("inf")), ("wall", -1.0), ("torch_rng", torch.zeros(3)),
                                       ("torch_rng", torch.zeros((2, 3), dtype=torch.uint8)),
                                       ("model", 3), ("model", {"w": torch.tensor([1.0, float("nan")])}),
                                       ("data", 7), ("preconditioner", "x"),
                                       ("optimizer", {"state": {0: {"momentum_buffer": torch.tensor([float("nan")])}},
                                                      "param_groups": []}),
                                       ("optimizer", {"state": {0: {"history": [torch.zeros(2), (torch.tensor(
                                           [1.0, float("inf")]),)]}}, "param_groups": []})])
def test_a_damaged_field_is_named(tmp_path, key, value):
    path = str(tmp_path / "step_00000004.pt")
    state = _state(4)
    state[key] = value
    ckpt.save_checkpoint(path, state)
    with pytest.raises(ckpt.CheckpointError, match=f"is corrupt: {key} is"):
        ckpt.load_checkpoint(path)


def test_a_preconditioner_at_another_step_than_the_run_is_refused(tmp_path):
    """The run calls step() once per training step: a preconditioner state at another step
    would resume its factor and inverse schedule out of phase, silently."""
    path = str(tmp_path / "step_00000004.pt")
    state = _state(4)
    state["preconditioner"] = {"steps": 2, "hyperparameters": {}, "blocks": {}}
    ckpt.save_checkpoint(path, state)
    with pytest.raises(ckpt.CheckpointError, match="is corrupt: its preconditioner has taken 2 steps, the run 4"):
        ckpt.load_checkpoint(path)
    state["preconditioner"]["steps"] = 6  # ahead of the run as well
    ckpt.save_checkpoint(path, state)
    with pytest.raises(ckpt.CheckpointError, match="is corrupt: its preconditioner has taken 6 steps, the run 4"):
        ckpt.load_checkpoint(path)
    state["preconditioner"]["steps"] = 4
    ckpt.save_checkpoint(path, state)
    assert ckpt.load_checkpoint(path)["preconditioner"]["steps"] == 4


@pytest.mark.parametrize("key", ["step", "config", "data", "model", "optimizer", "preconditioner", "data_order",
                                 "history", "wall", "torch_rng"])
def test_a_checkpoint_missing_any_key_is_named(tmp_path, key):
    path = str(tmp_path / "step_00000004.pt")
    with pytest.raises(ValueError, match=f"missing \\['{key}'\\]"):  # refused before anything is written
        ckpt.save_checkpoint(path, {k: v for k, v in _state(4).items() if k != key})
    assert not os.path.exists(path)
    ckpt.save_checkpoint(path, _state(4))
    state = torch.load(path, weights_only=True)
    del state[key]
    torch.save(state, path)
    with pytest.raises(ckpt.CheckpointError, match=f"is incomplete \\(missing {key}\\)"):
        ckpt.load_checkpoint(path)


def test_a_step_zero_checkpoint_loads(tmp_path):
    path = str(tmp_path / "step_00000000.pt")
    ckpt.save_checkpoint(path, _state(0))
    assert ckpt.load_checkpoint(path)["step"] == 0


def test_find_checkpoint_prefers_the_directory_itself_to_its_checkpoints_folder(tmp_path):
    ckpt.save_checkpoint(ckpt.checkpoint_path(str(tmp_path), 2), _state(2))
    ckpt.save_checkpoint(ckpt.checkpoint_path(str(tmp_path / "checkpoints"), 9), _state(9))
    assert ckpt.find_checkpoint(str(tmp_path)) == ckpt.checkpoint_path(str(tmp_path), 2)
    assert ckpt.find_checkpoint(str(tmp_path / "checkpoints")).endswith("step_00000009.pt")


def test_prune_keeps_the_newest_and_reports_only_later_steps(tmp_path):
    for step in (1, 3, 10, 20):  # 20: another run's, later than the step just written
        ckpt.save_checkpoint(ckpt.checkpoint_path(str(tmp_path), step), _state(step))
    assert ckpt.prune_checkpoints(str(tmp_path), 10, 2) == [ckpt.checkpoint_path(str(tmp_path), 20)]
    assert sorted(os.listdir(tmp_path)) == ["step_00000003.pt", "step_00000010.pt", "step_00000020.pt"]
    # Nothing later than the step just written: nothing to report (the new checkpoint is not "later").
    assert ckpt.prune_checkpoints(str(tmp_path), 20, 5) == []
    assert len(os.listdir(tmp_path)) == 3
    # keep=0 (--keep-checkpoints unset): nothing removed, later steps still reported.
    assert ckpt.prune_checkpoints(str(tmp_path), 3, 0) == [ckpt.checkpoint_path(str(tmp_path), s) for s in (10, 20)]
    assert len(os.listdir(tmp_path)) == 3


def test_history_records_need_a_number_for_every_field_read_back():
    record = {"step": 2, "epoch": 0.5, "loss": 1.5, "test_loss": 1.7, "test_acc": 0.25, "wall": 3.0}
    ckpt.check_history({"history": [record]}, "c.pt")
    for key, value in (("test_acc", True), ("loss", "1.5"), ("wall", None)):
        with pytest.raises(ckpt.CheckpointError, match=f"has no number '{key}'"):
            ckpt.check_history({"history": [record, dict(record, **{key: value})]}, "c.pt")


def test_check_compatible_takes_a_missing_setting_as_its_default():
    # A checkpoint from before a setting existed was trained with the setting's default.
    state = _state()
    default = TrainConfig().as_dict()["kl_clip"]
    ckpt.check_compatible(state, {"optimizer": "sgd", "kl_clip": default}, "abc", ("optimizer", "kl_clip"), "p")
    with pytest.raises(ckpt.CheckpointError, match=f"kl_clip is {default!r} there, 0.5 here"):
        ckpt.check_compatible(state, {"optimizer": "sgd", "kl_clip": 0.5}, "abc", ("optimizer", "kl_clip"), "p")


def test_check_compatible_names_the_differing_setting():
    state = _state()
    ckpt.check_compatible(state, {"optimizer": "sgd", "batch_size": 8}, "abc", ("optimizer", "batch_size"), "p")
    with pytest.raises(ckpt.CheckpointError, match="batch_size is 8 there, 16 here"):
        ckpt.check_compatible(state, {"optimizer": "sgd", "batch_size": 16}, "abc", ("optimizer", "batch_size"), "p")
    with pytest.raises(ckpt.CheckpointError, match="different data: the embedded digits .* there, mine.npz "):
        ckpt.check_compatible(state, {"optimizer": "sgd", "batch_size": 8, "data": "mine.npz"}, "xyz",
                              ("optimizer",), "p")


# ------------------------------------------------------------------ plots
def test_plots_are_png(tmp_path):
    from matplotlib import pyplot

    records = [{"step": s, "wall": 0.1 * s, "loss": 2.0 / s, "test_loss": 2.2 / s, "test_acc": 1 - 0.5 / s}
               for s in range(1, 30)]
    open_before = pyplot.get_fignums()
    plot_history(records, str(tmp_path / "h.png"), title="t")
    plot_curves([("batch 8", {"a": [records, records[:10]], "b": [records]}), ("full", {"a": [records]})],
                str(tmp_path / "c.png"), targets=(0.95, 0.97))
    for name in ("h.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert pyplot.get_fignums() == open_before  # closed: a run plotting at every evaluation holds none


def test_curves_that_stay_below_half_are_in_view(tmp_path, monkeypatch):
    """The accuracy axis starts at 50%, lower where a run never gets there (a short full-batch run)."""
    from hpckfac.train import plot

    limits = []
    legends = []

    def save(fig, path):
        limits.extend(ax.get_ylim() for ax in fig.axes[:2])
        # One legend entry per label, however many runs (seeds) it has.
        legends.extend([t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes)
        plot.plt.close(fig)
    monkeypatch.setattr(plot, "_save", save)
    low = [{"step": s, "loss": 2.0, "test_acc": 0.1 + 0.02 * s} for s in range(1, 7)]
    high = [dict(r, test_acc=0.2 + 0.1 * r["step"]) for r in low]
    plot_curves([("high", {"a": [high]}), ("low", {"a": [low, high], "b": [high]})], str(tmp_path / "c.png"))
    assert limits[0] == (50, 100)  # the top row: accuracy, one panel per study
    assert limits[1][0] <= 100 * max(r["test_acc"] for r in low) - 5 and limits[1][1] == 100
    assert legends == [["a"], ["a", "b"], ["a"], ["a", "b"]]


def test_history_plot_draws_each_quantity_against_steps_and_wall_time(tmp_path, monkeypatch):
    """Top row against steps, bottom against wall seconds: train and test loss on the left,
    test accuracy in percent on the right."""
    from hpckfac.train import plot

    rng = np.random.default_rng(4)
    walls, (loss, test_loss, test_acc) = np.cumsum(rng.uniform(0.1, 1, 7)), rng.uniform(0.05, 1, (3, 7))
    records = [{"step": s + 1, "wall": float(walls[s]), "loss": float(loss[s]), "test_loss": float(test_loss[s]),
                "test_acc": float(test_acc[s])} for s in range(7)]
    figures = []
    monkeypatch.setattr(plot, "_save", lambda fig, path: figures.append(fig))
    plot_history(records, str(tmp_path / "h.png"), title="digits, kfac")
    assert figures[0].get_suptitle() == "digits, kfac"
    (loss_steps, acc_steps), (loss_wall, acc_wall) = np.reshape(figures[0].axes, (2, 2))
    for key, loss_ax, acc_ax in (("step", loss_steps, acc_steps), ("wall", loss_wall, acc_wall)):
        xs = [r[key] for r in records]
        train, test = loss_ax.get_lines()
        np.testing.assert_array_equal(train.get_xdata(), xs)
        np.testing.assert_array_equal(train.get_ydata(), [r["loss"] for r in records])
        np.testing.assert_array_equal(test.get_ydata(), [r["test_loss"] for r in records])
        assert (loss_ax.get_yscale(), acc_ax.get_yscale()) == ("log", "linear")
        (accuracy,) = acc_ax.get_lines()
        np.testing.assert_array_equal(accuracy.get_xdata(), xs)
        np.testing.assert_allclose(accuracy.get_ydata(), [100 * r["test_acc"] for r in records])
    plot.plt.close(figures[0])
