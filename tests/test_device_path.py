"""The GPU code path of the whole K-FAC step, run on a stand-in device array
(tests/standin.py) on every machine: a stray host conversion in the stages,
the engine or the torch bridge fails here rather than on a cluster, and the
result must equal the host path's bit for bit (same kernels underneath)."""
import contextlib
import gc
import importlib.util

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

import standin
from hpckfac import arrays
from hpckfac.comm import Communicator
from hpckfac.layers import ConvBlock, LinearBlock
from hpckfac.stages.engine import KFACEngine
from hpckfac.stages.local_factors import LocalStatistics
from hpckfac.torch import bridge, distributed, grad_io, preconditioner
from hpckfac.torch import KFACPreconditioner

# Where CuPy and a GPU are present the device tests also run on CuPy.
CUDA = importlib.util.find_spec("cupy") is not None and torch.cuda.is_available()
# A "cuda" parameter of the device tests, skipped without CuPy and a GPU.
ON_CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CuPy and a CUDA device"))
# The PReLU of model_and_data() is kept first-order, so that a step also averages a parameter by the ring.
OPTIONS = dict(lr=0.05, damping=1e-2, factor_update_interval=2, inverse_update_interval=4, kl_clip=1e-3,
               skip_layers=[nn.PReLU])


@contextlib.contextmanager
def device_path():
    """Within the block, KFACPreconditioner sees every CPU tensor as a stand-in device array."""
    with standin.installed(), pytest.MonkeyPatch.context() as patch:
        # K-FAC blocks, their generic gradient path, and the other parameters' allreduce.
        for module in (preconditioner, grad_io, distributed):
            patch.setattr(module, "to_array", lambda t: standin.to_device(bridge.to_array(t)))
        # On a GPU these are DLPack views, not reads: hand over the wrapped arrays uncounted.
        patch.setattr(grad_io, "copy_into", lambda t, a: bridge.copy_into(t, a._a))
        patch.setattr(preconditioner, "to_tensor", lambda a: bridge.to_tensor(a._a))
        patch.setattr(preconditioner, "namespace_for", lambda device: standin.xp)
        yield


def model_and_data():
    torch.manual_seed(0)
    # PReLU's weight is a first-order parameter (OPTIONS' skip_layers): averaged by the ring allreduce on the
    # device too.
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.PReLU(4), nn.Flatten(),
                          nn.Linear(36, 8), nn.Tanh(), nn.Linear(8, 3, bias=False)).double()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 2, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))
            for _ in range(8)]
    return model, data


def train(reads=None, uploads=None):
    """Eight K-FAC steps; with ``reads`` / ``uploads``, each iteration's host reads and
    uploads (forward, backward with its hooks, and ``step()``) are appended."""
    model, data = model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=OPTIONS["lr"])
    pre = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), **OPTIONS)
    for x, y in data:
        before = standin.HOST_READS["count"], standin.UPLOADS["count"]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        if reads is not None:
            reads.append(standin.HOST_READS["count"] - before[0])
        if uploads is not None:
            uploads.append(standin.UPLOADS["count"] - before[1])
        opt.step()
    return model, pre


def test_the_standin_refuses_host_conversion():
    x = standin.to_device(np.arange(4.0))
    with pytest.raises(TypeError, match="implicit conversion"):
        np.asarray(x)
    with pytest.raises(TypeError, match="device array"):
        np.concatenate([x, x])
    assert np.array_equal(x.get(), np.arange(4.0))


def test_whole_step_on_the_device_path_equals_the_host_path():
    host_model, host_pre = train()
    reads: list[int] = []
    uploads: list[int] = []
    with device_path():
        model, pre = train(reads, uploads)
    assert pre.xp is standin.xp and all(isinstance(r, standin.DeviceArray) for r in pre.engine.state.running)
    # Equal to rounding: the host path takes CPU-only factor routes for convolutions (batched G,
    # lag-product A) where the device path takes its generic ones.
    for (name, p), q in zip(model.named_parameters(), host_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)
    assert pre.last_nu == pytest.approx(host_pre.last_nu, rel=1e-12) and pre.last_nu < 1.0  # the KL clip was active
    # Steps 1, 3, 5, 7 take no statistics and keep the inverses: nothing comes back to the host.
    assert [reads[k] for k in (1, 3, 5, 7)] == [0, 0, 0, 0], reads
    # Factor steps read the presence shares, then the finiteness of every owned block's update at once
    # (and, on inverse steps, the inversion status): two reads, whatever the number of blocks.
    assert reads[2] == 2 and reads[6] == 2, reads
    # Once the first factor and inverse steps have run, an iteration uploads nothing (an upload from
    # host memory waits for the device's queue): steps 4-7 include an inverse and two factor steps.
    assert uploads[4:] == [0, 0, 0, 0], uploads


def test_state_dict_of_the_device_path_is_host_data():
    with device_path():
        _, pre = train()
        state = pre.state_dict()
        for block in state["blocks"].values():
            assert isinstance(block["factors"], torch.Tensor) and torch.isfinite(block["factors"]).all()
        model, _ = model_and_data()
        other = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), **OPTIONS)
        other.load_state_dict(state)
        for mine, theirs in zip(other.engine.state.running, pre.engine.state.running):
            assert isinstance(mine, standin.DeviceArray) and np.array_equal(mine.get(), theirs.get())


def _each_tensor(value, change):
    """``value`` (a state's nested dicts and lists) with ``change`` applied to every tensor in it."""
    if isinstance(value, torch.Tensor):
        return change(value)
    if isinstance(value, dict):
        return {k: _each_tensor(v, change) for k, v in value.items()}
    if isinstance(value, list):
        return [_each_tensor(v, change) for v in value]
    return value


@pytest.mark.parametrize("where", ["requires_grad", ON_CUDA])
def test_a_state_whose_tensors_numpy_refuses_loads(where):
    """A state as ``torch.load(map_location="cuda")`` returns it (tensors on the GPU), or with
    tensors that require grad: ``Tensor.numpy()`` refuses both, the load takes them through the
    host, and the preconditioner it restores holds the same state."""
    device = torch.device("cuda" if where == "cuda" else "cpu")
    model, data = model_and_data()
    pre = KFACPreconditioner(model.to(device), comm=Communicator(MPI.COMM_SELF), **OPTIONS)
    for x, y in data[:2]:
        model.zero_grad()
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        pre.step()
    state = pre.state_dict()
    change = (lambda t: t.to(device)) if where == "cuda" else (lambda t: t.clone().requires_grad_())
    other_model, _ = model_and_data()
    other = KFACPreconditioner(other_model.to(device), comm=Communicator(MPI.COMM_SELF), **OPTIONS)
    other.load_state_dict(_each_tensor(state, change))
    again = other.state_dict()
    assert again["steps"] == state["steps"] == 2
    for name, block in state["blocks"].items():
        assert torch.equal(again["blocks"][name]["factors"], block["factors"]), name
        assert all(torch.equal(a, b) for a, b in zip(again["blocks"][name]["inverses"], block["inverses"])), name


def test_engine_buffers_live_in_the_gradients_namespace():
    blocks = [LinearBlock("a", 5, 4, bias=True), LinearBlock("b", 4, 3, bias=False)]
    comm = Communicator(MPI.COMM_SELF)
    results = []
    for xp, wrap in ((np, np.asarray), (standin.xp, standin.to_device)):
        with standin.installed():
            engine = KFACEngine(blocks, comm, damping=1e-2, kl_clip=1e-2, xp=xp)
            local = LocalStatistics(blocks, np.float64, xp)
            local.add_examples(7)
            draws = np.random.default_rng(3)
            for index, (d_in, d_out) in enumerate(((5, 4), (4, 3))):
                call = local.add_inputs(index, wrap(draws.standard_normal((7, d_in))))
                local.add_output_grads(index, wrap(draws.standard_normal((7, d_out))), 1.0, call)
            grads = [wrap(draws.standard_normal(s.grad_shape)) for s in engine.blocks]
            out = engine.step(grads, local.result(), lr=0.1)
            assert all(arrays.namespace(o) is xp for o in out)
            results.append([arrays.to_host(o) for o in out])
    # The host path's preconditioning products run in torch's pool, the device path's in its
    # namespace: the same float32 products from another GEMM library, equal up to rounding.
    for host, device in zip(*results):
        np.testing.assert_allclose(host, device, rtol=1e-5, atol=1e-7)


def test_array_operations_per_step_do_not_grow_with_same_shape_blocks():
    """The running average of the usual factor step and the preconditioning of same-shape
    blocks take a fixed number of device operations, however many such blocks there are (on a
    GPU every operation costs a launch's host time; per-block work made the step host-bound)."""
    def operations(copies):
        blocks = [LinearBlock(f"fc{i}", 6, 5, bias=True) for i in range(copies)]
        with standin.installed():
            engine = KFACEngine(blocks, Communicator(MPI.COMM_SELF), factor_update_interval=1,
                                inverse_update_interval=100, xp=standin.xp)
            rng = np.random.default_rng(copies)
            grads = [standin.to_device(rng.standard_normal(b.grad_shape)) for b in blocks]
            stats = [standin.to_device(b.statistics(rng.standard_normal((8, 6)), rng.standard_normal((8, 5)), 1 / 8))
                     for b in blocks]
            engine.step(grads, stats, lr=0.1)  # the first step inverts
            counts = {}
            for stage in ("update_all", "precondition"):
                method = getattr(engine.state, stage)

                def counted(*args, _method=method, _stage=stage, **kwargs):
                    before = standin.OPERATIONS["count"]
                    try:
                        return _method(*args, **kwargs)
                    finally:
                        counts[_stage] = standin.OPERATIONS["count"] - before
                setattr(engine.state, stage, counted)
            engine.step(grads, stats, lr=0.1)
        return counts

    few, many = operations(2), operations(12)
    assert few == many, (few, many)


@pytest.mark.parametrize("device", ["standin", ON_CUDA])
@pytest.mark.parametrize("make", [lambda: LinearBlock("fc", 100, 70, True),
                                  lambda: ConvBlock("grouped", 16, 6, (3, 3), (1, 1), (1, 1), (1, 1), True, groups=2)],
                         ids=["one-pair-of-101-and-70", "two-groups-of-73"])
def test_factors_wider_than_the_gather_index_on_the_device_path(make, device):
    """Factors of order > 64 are packed and unpacked through ``ops`` on a device (not by one
    gather index): statistics, factors and the damped solve equal the host path's (to
    rounding on a GPU, whose kernels sum in another order)."""
    block = make()
    rng = np.random.default_rng(5)
    if isinstance(block, LinearBlock):
        a, g = rng.standard_normal((9, 100)), rng.standard_normal((9, 70))
    else:
        a, g = rng.standard_normal((3, 16, 5, 4)), rng.standard_normal((3, 6, 5, 4))
    grad = rng.standard_normal(block.grad_shape)
    assert max(n for _, n in block.factor_shapes) > 64
    host_stats = block.statistics(a, g, 1 / 9)
    host_factors = block.factors(host_stats)
    host_solve = block.solve(host_stats, grad, 1e-2)
    if device == "cuda":
        import cupy

        scope, put = contextlib.nullcontext(), cupy.asarray
    else:
        scope, put = standin.installed(), standin.to_device
    with scope:
        stats = block.statistics(put(a), put(g), 1 / 9)
        factors = block.factors(stats)
        solve = block.solve(stats, put(grad), 1e-2)
        got_stats, got_factors, got_solve = stats.get(), [f.get() for f in factors], solve.get()
    rtol = 1e-13 if device == "standin" else 1e-9
    np.testing.assert_allclose(got_stats, host_stats, rtol=rtol, atol=1e-13)
    for got, want in zip(got_factors, host_factors):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-13)
    np.testing.assert_allclose(got_solve, host_solve, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not CUDA, reason="needs CuPy and a CUDA device")
def test_cupy_runs_on_torchs_current_stream_without_deprecated_calls():
    """Inside ``device_scope`` CuPy's current stream is torch's (the default one and a side
    stream alike), so kernels are ordered with the model's; no deprecated CuPy API is used."""
    import warnings

    import cupy

    side = torch.cuda.Stream()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for stream in (torch.cuda.current_stream(), side):
            with torch.cuda.stream(stream), bridge.device_scope(torch.device("cuda")):
                assert cupy.cuda.get_current_stream().ptr == stream.cuda_stream
                x = cupy.arange(4.0)  # work queued on torch's stream
                x *= 2
            stream.synchronize()
            assert x.get().tolist() == [0.0, 2.0, 4.0, 6.0]


def test_batchnorm_statistics_are_one_device_operation():
    """A BatchNorm layer's statistics reach its packed buffer through one ``ops`` call (two
    kernel launches on a GPU), not ~20 array operations of host time each."""
    from hpckfac.layers import BatchNormBlock

    rng = np.random.default_rng(6)
    block = BatchNormBlock("bn", 8, 1e-5)
    x, g = rng.standard_normal((4, 8, 5, 5)), rng.standard_normal((4, 8, 5, 5))
    host_stats = np.zeros(block.stat_size)
    block.add_output_grad(host_stats, g, 0.5, x)
    with standin.installed():
        stats = standin.to_device(np.zeros(block.stat_size))
        before = standin.OPERATIONS["count"]
        block.add_output_grad(stats, standin.to_device(g), 0.5, standin.to_device(x))
        assert standin.OPERATIONS["count"] - before <= 3  # the op, and the (N, C, T) views of x and g
        np.testing.assert_array_equal(stats.get(), host_stats)


class TiedTokens(nn.Module):
    """A token Embedding with a padding token and a position Embedding (positions shared by the
    batch), a Linear over the positions, and a head tied to the token table through ``F.linear``
    (its gradient reaches every token's column)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.pos, self.mix = nn.Embedding(10, 6, padding_idx=0), nn.Embedding(7, 6), nn.Linear(6, 6)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]).unsqueeze(0))
        return nn.functional.linear(torch.tanh(self.mix(h)).mean(1), self.embed.weight)


def test_the_embedding_checks_of_the_first_factor_step_read_the_device_once(caplog):
    """The first factor step compares every Embedding's gradient with its token counts on the
    device and reads the results back once for all of them (tokens 5-9 are never looked up, yet
    the tied head gives them gradient: named in a warning); the padding token's zero count is
    written on the device. The gradients equal the host path's."""
    def run(checked: bool):
        torch.manual_seed(0)
        model = TiedTokens().double()
        pre = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), **OPTIONS)
        pre._outside_checked = checked  # True: as if an earlier step had checked
        gen = torch.Generator().manual_seed(2)
        tokens, labels = torch.randint(0, 5, (6, 7), generator=gen), torch.randint(0, 10, (6,), generator=gen)
        before = standin.HOST_READS["count"]
        nn.functional.cross_entropy(model(tokens), labels).backward()
        pre.step()
        return standin.HOST_READS["count"] - before, [p.grad.clone() for p in model.parameters()]

    _, host = run(False)
    caplog.clear()
    with device_path(), caplog.at_level("WARNING", logger="hpckfac"):
        unchecked, _ = run(True)
        assert "own calls cannot give" not in caplog.text
        checked, device = run(False)
    assert checked == unchecked + 1, (checked, unchecked)
    assert "K-FAC layers embed: their weights get gradient the layers' own calls cannot give" in caplog.text
    for got, want in zip(device, host):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_a_convolution_gather_index_is_shared_by_its_shape_and_freed_with_its_last_block():
    """The channel-major gather index of a convolution's ``A`` (as large as the packed factor)
    is uploaded once for the blocks of one shape and goes with the last of them: blocks of many
    widths, each used and dropped, leave nothing in the table of device constants."""
    rng = np.random.default_rng(7)
    gc.collect()  # blocks an earlier test left for the collector take their uploads now, not midway
    before = set(arrays._constants)

    def used(channels: int, name: str) -> ConvBlock:
        block = ConvBlock(name, channels, 3, (3, 3), (1, 1), (1, 1), (1, 1), True)
        a = rng.standard_normal((2, channels, 5, 5))
        want = block.a_factor(a, packed=True)
        np.testing.assert_array_equal(block.a_factor(standin.to_device(a), packed=True).get(), want)
        return block

    with standin.installed():
        first, second = used(4, "first"), used(4, "second")
        assert len(set(arrays._constants) - before) == 1  # one upload for both
        del first
        gc.collect()
        assert len(set(arrays._constants) - before) == 1  # the second still uses it
        del second
        gc.collect()
        assert set(arrays._constants) == before
        for channels in range(2, 12):
            used(channels, f"conv{channels}")
        gc.collect()
    assert set(arrays._constants) == before


def test_a_collection_while_a_new_block_takes_a_shared_gather_index_keeps_the_index():
    """The last earlier owner of an upload may be collected at any allocation, also while
    ``arrays.constant`` notes a new owner of the same key: the new owner still gets the index
    (the same values as the host's), shared, until it is collected itself."""
    class Owner:
        pass

    class CollectingOwners(dict):
        # A garbage collection at the point where noting a new owner allocates.
        def setdefault(self, *args):
            gc.collect()
            return super().setdefault(*args)

    host = np.arange(6, dtype=np.int32)
    key = ("a test's index", 6)
    gc.collect()  # no other test's garbage for the collection below to release
    with standin.installed():
        gone = Owner()
        gone.cycle = gone  # freed by the collector only
        arrays.constant(host, standin.xp, key, gone)
        del gone
        plain = arrays._owners
        arrays._owners = CollectingOwners(plain)
        try:
            new = Owner()
            got = arrays.constant(host, standin.xp, key, new)
        finally:
            plain.clear()
            plain.update(arrays._owners)
            arrays._owners = plain
        np.testing.assert_array_equal(got.get(), host)
        assert arrays.constant(host, standin.xp, key) is got  # still kept, not uploaded again
        del new
        gc.collect()
        assert not any(cache_key[0] == key for cache_key in arrays._constants)
