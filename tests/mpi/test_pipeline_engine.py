"""KFACEngine (stages 2-4) at any rank count against a dense float64 oracle.

Every rank draws every rank's local statistics and gradients from the same
seed, so each rank can compute the oracle: averages over ranks, running
averages, pi-damped inverses by np.linalg.inv, V = G^-1 grad A^-1, BatchNorm
per-channel solves, and the KL clip, all written out here independently of
the pipeline code.
"""
import math

import numpy as np
import pytest

from hpckfac.comm import CollectiveMismatchError
from hpckfac.layers import BatchNormBlock, ConvBlock, LinearBlock
from hpckfac.stages.engine import KFACEngine

DAMPING, DECAY, LR = 1e-2, 0.9, 0.5


def make_blocks(n=4):
    blocks = [LinearBlock("fc1", 5, 4, bias=True), ConvBlock("conv", 2, 3, (3, 3), (2, 2), (1, 1), (1, 1), bias=True),
              BatchNormBlock("bn", 3, 1e-5), LinearBlock("fc2", 4, 3, bias=False)]
    return blocks[:n]


def spd(rng, n):
    x = rng.standard_normal((n, n + 2))
    return x @ x.T / (n + 2)


def triu_pack(mat):
    return mat[np.triu_indices(mat.shape[0])]


def triu_unpack(packed, n):
    """The symmetric matrix whose upper triangle ``triu_pack`` gave."""
    mat = np.zeros((n, n))
    mat[np.triu_indices(n)] = packed
    return mat + np.triu(mat, 1).T


def draw(rng, blocks, size):
    """Per rank: dense statistics per block and packed ones (the engine's input), and gradients."""
    dense, packed, grads = [], [], []
    for _ in range(size):
        d_r, p_r, g_r = [], [], []
        for b in blocks:
            if isinstance(b, BatchNormBlock):
                mats = np.stack([spd(rng, 2) for _ in range(b.num_features)])
                d_r.append([mats])
                p_r.append(np.stack([mats[:, 0, 0], mats[:, 0, 1], mats[:, 1, 1]], axis=1).ravel())
                g_r.append(rng.standard_normal((b.num_features, 2)))
            else:
                a, g = spd(rng, b.d_A), spd(rng, b.d_G)
                d_r.append([a, g])
                p_r.append(np.concatenate([triu_pack(a), triu_pack(g)]))
                g_r.append(rng.standard_normal((b.d_G, b.d_A)))
        dense.append(d_r)
        packed.append(p_r)
        grads.append(g_r)
    return dense, packed, grads


class Oracle:
    def __init__(self, blocks, kl_clip):
        self.blocks, self.kl_clip = blocks, kl_clip
        self.running, self.inverse = [None] * len(blocks), [None] * len(blocks)

    def update(self, dense_per_rank, present, decay):
        for l in range(len(self.blocks)):
            ranks = [r for r in range(len(dense_per_rank)) if present[r][l]]
            if not ranks:
                continue
            new = [sum(dense_per_rank[r][l][k] for r in ranks) / len(ranks) for k in range(len(dense_per_rank[0][l]))]
            if self.running[l] is None:
                self.running[l] = new
            else:
                self.running[l] = [decay * old + (1 - decay) * n for old, n in zip(self.running[l], new)]

    def invert(self, damping, missing_only=False):
        """Inverses of every block with statistics (``missing_only``: of those without an
        inverse yet, which the engine inverts at the step that first needs them)."""
        for l, b in enumerate(self.blocks):
            if self.running[l] is None or (missing_only and self.inverse[l] is not None):
                continue
            if isinstance(b, BatchNormBlock):
                (f,) = self.running[l]
                self.inverse[l] = [np.linalg.inv(f + damping * np.eye(2))]
            else:
                a, g = self.running[l]
                pi = math.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
                self.inverse[l] = [np.linalg.inv(a + pi * math.sqrt(damping) * np.eye(len(a))),
                                   np.linalg.inv(g + math.sqrt(damping) / pi * np.eye(len(g)))]

    def precondition(self, grads_per_rank, damping):
        self.invert(damping, missing_only=True)
        vs, total = [], 0.0
        for l, b in enumerate(self.blocks):
            grad = sum(g[l] for g in grads_per_rank) / len(grads_per_rank)
            if self.inverse[l] is None:  # never had statistics: the gradient passes through
                v = grad
            elif isinstance(b, BatchNormBlock):
                v = np.einsum("cij,cj->ci", self.inverse[l][0], grad)
            else:
                v = self.inverse[l][1] @ grad @ self.inverse[l][0]
            vs.append(v)
            total += float(np.sum(v * grad))
        nu = 1.0 if self.kl_clip is None else min(1.0, math.sqrt(self.kl_clip / (LR ** 2 * total)))
        return [nu * v for v in vs], nu


def run(comm, blocks, steps, fui, iui, kl_clip, assignment="lpt", absent=None, seed=0, damping=DAMPING, decay=DECAY):
    """``damping`` and ``decay``: constants or schedules (callables of the step), as the engine takes them."""
    engine = KFACEngine(blocks, comm, damping=damping, factor_decay=decay, factor_update_interval=fui,
                        inverse_update_interval=iui, kl_clip=kl_clip, assignment=assignment, comm_dtype=np.float64)
    oracle = Oracle(blocks, kl_clip)
    rng = np.random.default_rng(seed)
    nus = []
    for k in range(steps):
        dense, packed, grads = draw(rng, blocks, comm.size)
        # absent(k, rank, block): that rank has no statistics of the block at step k
        present = [[not (absent and absent(k, r, l)) for l in range(len(blocks))] for r in range(comm.size)]
        stats = [p if present[comm.rank][l] else None for l, p in enumerate(packed[comm.rank])]
        assert engine.is_factor_step() == (k % fui == 0) and engine.is_inverse_step() == (k % iui == 0)
        damping_k, decay_k = (v(k) if callable(v) else v for v in (damping, decay))
        if k % fui == 0:
            oracle.update(dense, present, decay_k)
        if k % iui == 0:
            oracle.invert(damping_k)
        out = engine.step(grads[comm.rank], stats if k % fui == 0 else None, lr=LR)
        want, nu = oracle.precondition(grads, damping_k)
        assert engine.last_nu == pytest.approx(nu, rel=1e-12)
        nus.append(nu)
        for got, expected in zip(out, want):
            np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    return engine, nus


@pytest.mark.mpi
@pytest.mark.parametrize("assignment", ["lpt", "contiguous"])
def test_engine_matches_dense_oracle_with_intervals_and_kl_clip(comm, assignment):
    _, nus = run(comm, make_blocks(), steps=7, fui=2, iui=3, kl_clip=1e-3, assignment=assignment)
    assert min(nus) < 1.0  # the clip was active


@pytest.mark.mpi
def test_engine_damping_and_decay_schedules_are_read_at_each_step(comm):
    # Statistics at every step, inverses every second one: each uses that step's values.
    run(comm, make_blocks(), steps=5, fui=1, iui=2, kl_clip=1e-3, damping=lambda k: DAMPING * 3.0 ** k,
        decay=lambda k: DECAY / (1 + k))


@pytest.mark.mpi
def test_engine_two_blocks_ranks_owning_nothing(comm):
    engine, _ = run(comm, make_blocks(2), steps=3, fui=1, iui=1, kl_clip=None)
    assert sorted(set(engine.owners)) == list(range(min(2, comm.size)))
    if comm.rank >= 2:  # owns nothing: empty segments in both collectives
        assert engine.owned == [] and engine.layout.gather_counts[comm.rank] == 0
        assert engine.layout.reduce_counts(True)[comm.rank] == 0


def repeated_blocks():
    """Blocks of repeated shapes, interleaved: each shape's blocks are preconditioned together."""
    return [LinearBlock("a", 5, 4, bias=True), BatchNormBlock("bn1", 3, 1e-5), LinearBlock("b", 5, 4, bias=True),
            ConvBlock("c", 2, 3, (3, 3), (1, 1), (1, 1), (1, 1), bias=False), BatchNormBlock("bn2", 4, 1e-5),
            LinearBlock("d", 5, 4, bias=True), ConvBlock("e", 2, 3, (3, 3), (2, 2), (0, 0), (1, 1), bias=False)]


@pytest.mark.mpi
def test_engine_preconditions_same_shape_blocks_together(comm):
    # Block "b" has no statistics on any rank at step 0: its run is inverted again once it has,
    # and preconditioned block by block until the next inverse step.
    absent = lambda k, r, l: k == 0 and l == 2
    engine, nus = run(comm, repeated_blocks(), steps=7, fui=1, iui=3, kl_clip=1e-3, absent=absent)
    assert min(nus) < 1.0
    # Each rank's owned blocks in model order, those of one batch_key at the first one's place.
    key = {l: ("alone", l) if b.batch_key is None else b.batch_key for l, b in enumerate(engine.blocks)}
    for rank, owned in enumerate(engine.layout.owned):
        mine = [l for l, r in enumerate(engine.owners) if r == rank]
        first = {k: min(m for m in mine if key[m] == k) for k in {key[m] for m in mine}}
        assert owned == sorted(mine, key=lambda l: (first[key[l]], l)), (rank, owned)
    state = engine.state
    names = [b.name for b in state.blocks]
    for key in {b.batch_key for b in state.blocks}:  # the layout puts each key's blocks together
        where = [i for i, b in enumerate(state.blocks) if b.batch_key == key]
        assert where == list(range(where[0], where[0] + len(where))), names
    if comm.size == 1:  # one owner of everything: the three Linear blocks are one batched run
        runs = {tuple(names[lo:hi]): state._stacks.get(r) for r, (lo, hi) in enumerate(state._runs)}
        assert runs[("a", "b", "d")] is not None and runs[("bn1", "bn2")] is not None


@pytest.mark.mpi
def test_engine_blocks_without_statistics_average_over_present_ranks(comm):
    # Rank 0 never sees block 1; at step 1 no rank sees block 0 (its running average must not move).
    absent = lambda k, r, l: (l == 1 and r == 0 and comm.size > 1) or (k == 1 and l == 0)
    engine, _ = run(comm, make_blocks(), steps=3, fui=1, iui=1, kl_clip=None, absent=absent)
    assert engine.state.refused == 0  # a block no rank had is skipped, not refused as non-finite


@pytest.mark.mpi
def test_engine_statistics_absent_after_a_step_with_them_leave_nothing_behind(comm):
    # From step 1 on, each (step, block) misses one rank (none at one rank: the block is skipped)
    # that did send that block's statistics before: the send buffer, reused across steps, must
    # not carry the earlier step's statistics into the average over the present ranks.
    absent = lambda k, r, l: k >= 1 and (k + r + l) % 3 == 0
    run(comm, make_blocks(), steps=5, fui=1, iui=1, kl_clip=None, absent=absent, seed=11)


@pytest.mark.mpi
def test_engine_refuses_non_finite_statistics_and_propagates_non_finite_gradients(comm):
    blocks = make_blocks()
    engine = KFACEngine(blocks, comm, damping=DAMPING, factor_decay=DECAY, kl_clip=1e-3, comm_dtype=np.float64)
    rng = np.random.default_rng(3)
    _, packed, grads = draw(rng, blocks, comm.size)
    engine.step(grads[comm.rank], packed[comm.rank], lr=LR)
    before = engine.state_dict()
    _, fresh, _ = draw(rng, blocks, comm.size)  # other statistics, so that an accepted update shows
    bad = [p.copy() for p in fresh[comm.rank]]
    if comm.rank == comm.size - 1:
        bad[0][0] = np.nan  # the first block only: each block's update is judged on its own
    out = engine.step(grads[comm.rank], bad, lr=LR)  # poisoned statistics, finite gradients
    assert all(np.isfinite(v).all() for v in out)
    after = engine.state_dict()
    names = list(before["blocks"])
    np.testing.assert_array_equal(before["blocks"][names[0]]["factors"], after["blocks"][names[0]]["factors"])
    for name in names[1:]:
        assert not np.array_equal(before["blocks"][name]["factors"], after["blocks"][name]["factors"])
    for p in bad:
        p[0] = np.nan if comm.rank == comm.size - 1 else p[0]
    kept = engine.state_dict()
    engine.step(grads[comm.rank], bad, lr=LR)  # every block poisoned on one rank: nothing changes
    for name in names:
        np.testing.assert_array_equal(kept["blocks"][name]["factors"], engine.state_dict()["blocks"][name]["factors"])
    nan_grads = [g.copy() for g in grads[comm.rank]]
    nan_grads[0][0, 0] = np.inf
    out = engine.step(nan_grads, packed[comm.rank], lr=LR)
    assert all(not np.isfinite(v).all() for v in out)  # nu is NaN: a GradScaler skips this step
    for name, block in engine.state_dict()["blocks"].items():
        assert np.isfinite(block["factors"]).all() and all(np.isfinite(x).all() for x in block["inverses"])


@pytest.mark.mpi
def test_engine_state_dict_resumes_on_another_rank_count(comm):
    from hpckfac.comm import Communicator
    from mpi4py import MPI

    blocks = make_blocks()
    kwargs = dict(damping=DAMPING, factor_decay=DECAY, factor_update_interval=2, inverse_update_interval=3,
                  kl_clip=1e-3, comm_dtype=np.float64)
    engine = KFACEngine(blocks, comm, **kwargs)
    rng = np.random.default_rng(5)
    data = [draw(rng, blocks, 1) for _ in range(6)]
    for k in range(3):
        _, packed, grads = data[k]
        engine.step(grads[0], packed[0], lr=LR)  # every rank the same data: the mean is that data
    state = engine.state_dict()
    single = KFACEngine(make_blocks(), Communicator(MPI.COMM_SELF), **kwargs)
    single.load_state_dict(state)
    assert single.steps == 3
    for k in range(3, 6):
        _, packed, grads = data[k]
        a = engine.step(grads[0], packed[0], lr=LR)
        b = single.step(grads[0], packed[0], lr=LR)
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-12)


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4])
def test_engine_state_dict_holds_every_owners_blocks_as_they_are(comm, n, monkeypatch):
    """state_dict() on every rank holds each block's factors and inverses exactly as its owner
    has them (gathered here by pickles, independently), None where absent: a block without
    statistics so far has neither; with 2 blocks some ranks own nothing. The arrays travel as
    one flat AllGatherV, never as pickles, and are returned as views of it."""
    blocks = make_blocks(n)
    engine = KFACEngine(blocks, comm, damping=DAMPING, factor_decay=DECAY, factor_update_interval=1,
                        inverse_update_interval=1, comm_dtype=np.float64)
    rng = np.random.default_rng(11)
    assert all(s == {"factors": None, "inverses": None} for s in engine.state_dict()["blocks"].values())
    for _ in range(2):
        _, packed, grads = draw(rng, blocks, comm.size)
        stats = [None] + packed[comm.rank][1:]  # the first block never gets statistics
        engine.step(grads[comm.rank], stats, lr=LR)
    owners, state = {}, engine.state
    mine = {blocks[l].name: {"factors": np.array(state.running[i]) if state.initialized[i] else None,
                             "inverses": None if state.inverses[i] is None else [np.array(x) for x in state.inverses[i]]}
            for i, l in enumerate(engine.owned)}
    for part in comm.mpi.allgather(mine):
        owners.update(part)
    monkeypatch.setattr(comm, "allgather_object", lambda *a, **k: pytest.fail("state_dict() pickled its arrays"))
    state = engine.state_dict()
    assert list(state["blocks"]) == [b.name for b in blocks]
    # Views of the one gathered buffer, every block's fixed share of it: one copy of the state.
    held = [x for b in state["blocks"].values() for x in [b["factors"], *(b["inverses"] or [])] if x is not None]
    assert len({id(x.base) for x in held}) == 1 and held[0].base is not None
    assert held[0].base.nbytes == sum(2 + b.stat_size + sum(math.prod(s) for s in b.inverse_shapes)
                                      for b in blocks) * np.dtype(np.float64).itemsize
    for block in blocks:
        got, want = state["blocks"][block.name], owners[block.name]
        if block is blocks[0]:
            assert got == {"factors": None, "inverses": None}
            continue
        assert got["factors"].dtype == np.float64 and np.array_equal(got["factors"], want["factors"])
        assert len(got["inverses"]) == len(want["inverses"]) == len(block.inverse_shapes)
        for x, y in zip(got["inverses"], want["inverses"]):
            assert x.shape == y.shape and np.array_equal(x, y)


def assert_same_state(got, want):
    """Two ``state_dict()``s hold the same steps, hyperparameters and blocks, None where absent."""
    assert got["steps"] == want["steps"] and got["hyperparameters"] == want["hyperparameters"]
    assert list(got["blocks"]) == list(want["blocks"])
    for name, block in want["blocks"].items():
        mine = got["blocks"][name]
        assert (mine["factors"] is None) == (block["factors"] is None), name
        assert (mine["inverses"] is None) == (block["inverses"] is None), name
        if block["factors"] is not None:
            np.testing.assert_array_equal(mine["factors"], block["factors"])
        for x, y in zip(mine["inverses"] or [], block["inverses"] or []):
            np.testing.assert_array_equal(x, y)


@pytest.mark.mpi
@pytest.mark.parametrize("trained", [False, True])
def test_engine_state_round_trips_a_block_without_statistics_and_resumes(comm, trained):
    """A state whose first block never had statistics loads into an engine (a fresh one, or one
    whose every block has factors and inverses of its own) built with other hyperparameters, as it
    was saved: the checkpoint's hyperparameters, that block without factors or inverses (not
    zeros nor what the engine had). Both engines then follow the same steps, that block's first
    statistics taken as its running average as they are."""
    kwargs = dict(damping=DAMPING, factor_decay=DECAY, inverse_update_interval=2, kl_clip=1e-3,
                  comm_dtype=np.float64)
    engine = KFACEngine(make_blocks(), comm, **kwargs)
    rng = np.random.default_rng(17)
    for _ in range(3):
        _, packed, grads = draw(rng, engine.blocks, comm.size)
        engine.step(grads[comm.rank], [None] + packed[comm.rank][1:], lr=LR)
    state = engine.state_dict()
    assert state["blocks"]["fc1"] == {"factors": None, "inverses": None}
    # Every hyperparameter other than the checkpoint's: the checkpoint's win.
    resumed = KFACEngine(make_blocks(), comm, damping=0.5, factor_decay=0.5, factor_update_interval=2,
                         inverse_update_interval=3, kl_clip=None, comm_dtype=np.float64)
    other = np.random.default_rng(18)
    for _ in range(2 if trained else 0):
        _, packed, grads = draw(other, resumed.blocks, comm.size)
        resumed.step(grads[comm.rank], packed[comm.rank], lr=LR)
    resumed.load_state_dict(state)
    settings = ("damping", "factor_decay", "factor_update_interval", "inverse_update_interval", "kl_clip")
    assert [getattr(resumed, name) for name in settings] == [DAMPING, DECAY, 1, 2, 1e-3]
    assert_same_state(resumed.state_dict(), state)
    for _ in range(3):  # the first block's statistics from now on
        _, packed, grads = draw(rng, engine.blocks, comm.size)
        want = engine.step(grads[comm.rank], packed[comm.rank], lr=LR)
        got = resumed.step(grads[comm.rank], packed[comm.rank], lr=LR)
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y)
    assert_same_state(resumed.state_dict(), engine.state_dict())


@pytest.mark.mpi
def test_engine_steps_read_no_per_rank_lists(comm, monkeypatch):
    """A step's cost must not grow with the rank count in Python: the collectives get the per-rank
    counts as int64 arrays made at construction, and the owner's segment offsets are not summed
    anew over the ranks before it; the results are those of an engine left as it is."""
    def engine():
        return KFACEngine(make_blocks(), comm, damping=DAMPING, factor_decay=DECAY, kl_clip=1e-3,
                          comm_dtype=np.float64)

    def steps(e):
        rng = np.random.default_rng(5)
        out = []
        for k in range(3):  # a factor step, then two without statistics
            _, packed, grads = draw(rng, e.blocks, comm.size)
            e.factor_update_interval = 1 if k == 0 else 10
            out.append([v.copy() for v in e.step(grads[comm.rank], packed[comm.rank] if k == 0 else None, lr=LR)])
        return out

    want = steps(engine())
    watched = engine()

    def refuse(*args, **kwargs):
        raise AssertionError("a step summed or read the per-rank counts again")

    monkeypatch.setattr(watched.layout, "segment_start", refuse)
    monkeypatch.setattr(watched.layout, "reduce_counts", refuse)
    seen = []
    for name in ("reduce_scatter_v", "allgather_v"):
        real = getattr(comm, name)
        monkeypatch.setattr(comm, name, lambda buf, counts, *a, _real=real, **kw: seen.append(counts)
                            or _real(buf, counts, *a, **kw))
    got = steps(watched)
    if comm.size == 1:  # the segment is the send buffer and the gathered buffer the owner's output
        assert seen == []
    else:
        assert len(seen) == 6 and all(isinstance(c, np.ndarray) and c.dtype == np.int64 for c in seen)
        assert seen[2] is seen[4] and seen[3] is seen[5]  # made once, not per step
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            np.testing.assert_array_equal(a, b)


@pytest.mark.mpi
def test_engine_timings_are_each_stages_own_seconds(comm, monkeypatch):
    """``timings`` holds each stage's own seconds of the last step, as on a device that runs
    the work queued so far when ``synchronize`` is called: here every stage queues its own
    amount of seconds, and so does the work before each step (a backward pass), which no stage
    may count. Statistics every second step, inverses every third; with two blocks some ranks
    own nothing and precondition nothing."""
    import time

    from hpckfac.stages.engine import STAGES

    blocks = make_blocks(2)
    engine = KFACEngine(blocks, comm, damping=DAMPING, factor_decay=DECAY, factor_update_interval=2,
                        inverse_update_interval=3, kl_clip=1e-3, comm_dtype=np.float64)
    clock = {"now": 0.0, "queued": 0.0}
    seconds = dict(zip(STAGES, (1.0, 2.0, 4.0, 8.0, 16.0)))

    def synchronize():
        clock["now"], clock["queued"] = clock["now"] + clock["queued"], 0.0

    def queueing(stage, real):
        def run(*args, **kwargs):
            clock["queued"] += seconds[stage]
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])
    for stage, owner, name in (("reduce_scatter", type(engine.reduce_scatter), "__call__"),
                               ("running_average", engine.state, "update_all"), ("inversion", engine.state, "invert"),
                               ("precondition", engine.state, "precondition"),
                               ("all_gather", type(engine.all_gather), "__call__")):
        monkeypatch.setattr(owner, name, queueing(stage, getattr(owner, name)))
    engine.synchronize = synchronize
    rng = np.random.default_rng(2)
    for k in range(7):
        _, packed, grads = draw(rng, blocks, comm.size)
        clock["queued"] += 100.0  # the step's backward pass, still running when the step starts
        engine.step(grads[comm.rank], packed[comm.rank] if k % 2 == 0 else None, lr=LR)
        ran = {"reduce_scatter": True, "running_average": k % 2 == 0, "inversion": k % 3 == 0,
               "precondition": bool(engine.owned), "all_gather": True}
        assert engine.timings == {stage: seconds[stage] if ran[stage] else 0.0 for stage in STAGES}, k


@pytest.mark.mpi
def test_engine_state_with_factors_but_no_inverses_round_trips_and_inverts_them(comm):
    """A block saved with factors and no inverses (inverted at the step that first needs them)
    loads as such, into an engine with inverses of its own, at any rank count (with two blocks
    some ranks own nothing): ``state_dict()`` holds those factors and None for its inverses, not
    arrays of zeros, which no state would load again; the next step, one that does not invert,
    inverts it from those factors: its inverses and results are those of an engine that loaded
    the same factors with their dense damped inverses."""
    kwargs = dict(damping=DAMPING, factor_decay=DECAY, factor_update_interval=2, inverse_update_interval=3,
                  kl_clip=1e-3, comm_dtype=np.float64)
    blocks = make_blocks(2)
    engine = KFACEngine(blocks, comm, **kwargs)
    rng = np.random.default_rng(23)
    for k in range(5):
        _, packed, grads = draw(rng, blocks, comm.size)
        engine.step(grads[comm.rank], packed[comm.rank] if k % 2 == 0 else None, lr=LR)
    state = engine.state_dict()
    name = blocks[1].name
    state["blocks"][name] = {"factors": state["blocks"][name]["factors"].copy(), "inverses": None}
    resumed = KFACEngine(make_blocks(2), comm, **kwargs)
    other = np.random.default_rng(24)
    for _ in range(2):  # inverses of its own, which the load replaces with none
        _, packed, grads = draw(other, blocks, comm.size)
        resumed.step(grads[comm.rank], packed[comm.rank], lr=LR)
    resumed.load_state_dict(state)
    assert_same_state(resumed.state_dict(), state)
    oracle = Oracle(blocks, None)
    factors, d_A = state["blocks"][name]["factors"], blocks[1].d_A
    oracle.running[1] = [triu_unpack(factors[:d_A * (d_A + 1) // 2], d_A),
                         triu_unpack(factors[d_A * (d_A + 1) // 2:], blocks[1].d_G)]
    oracle.invert(DAMPING)
    state["blocks"][name]["inverses"] = [x[None] for x in oracle.inverse[1]]
    inverted = KFACEngine(make_blocks(2), comm, **kwargs)
    inverted.load_state_dict(state)
    _, _, grads = draw(rng, blocks, comm.size)  # step 5: no statistics, no inversion
    got = resumed.step(grads[comm.rank], None, lr=LR)
    want = inverted.step(grads[comm.rank], None, lr=LR)
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
    saved = resumed.state_dict()["blocks"][name]["inverses"]
    for x, y in zip(saved, state["blocks"][name]["inverses"]):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.mpi
@pytest.mark.parametrize("what", ["grads", "stats"])
@pytest.mark.parametrize("count", [3, 5])
def test_engine_refuses_another_count_of_gradients_or_statistics(comm, what, count):
    """A step given fewer or more gradient matrices (or, at a factor step, statistics) than it
    has blocks raises ValueError on every rank before any collective, naming the count, and leaves
    the engine as it was: its next step matches the dense oracle's first."""
    blocks = make_blocks()
    engine = KFACEngine(blocks, comm, damping=DAMPING, factor_decay=DECAY, kl_clip=None, comm_dtype=np.float64)
    dense, packed, grads = draw(np.random.default_rng(3), blocks, comm.size)
    given = {"grads": grads[comm.rank], "stats": packed[comm.rank]}
    given[what] = (given[what] * 2)[:count]
    message = (r"^grads: expected 4 gradient matrices, got %d$" % count if what == "grads" else
               r"^stats: a factor-update step needs one entry per block \(4\)$")
    with pytest.raises(ValueError, match=message):
        engine.step(given["grads"], given["stats"], lr=LR)
    assert engine.steps == 0
    oracle = Oracle(blocks, None)
    oracle.update(dense, [[True] * len(blocks)] * comm.size, DECAY)
    oracle.invert(DAMPING)
    want, _ = oracle.precondition(grads, DAMPING)
    out = engine.step(grads[comm.rank], packed[comm.rank], lr=LR)
    for got, expected in zip(out, want):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.mpi
def test_engine_ranks_loaded_at_other_step_counts_fail_on_every_rank(comm):
    """Ranks that load states of the same settings but other step counts (each rank its own
    checkpoint) raise CollectiveMismatchError on every rank at the next step, naming the step
    counts, rather than stepping on at different steps (both factor steps here, so their
    collectives alone would match). At one rank the loaded count goes on."""
    blocks = make_blocks()
    kwargs = dict(damping=DAMPING, factor_decay=DECAY, inverse_update_interval=10, kl_clip=None,
                  comm_dtype=np.float64)
    engine = KFACEngine(blocks, comm, **kwargs)
    rng = np.random.default_rng(4)
    for _ in range(3):
        _, packed, grads = draw(rng, blocks, comm.size)
        engine.step(grads[comm.rank], packed[comm.rank], lr=LR)
    state = engine.state_dict()
    last = comm.rank == comm.size - 1
    engine.load_state_dict({**state, "steps": 3 + last})
    _, packed, grads = draw(rng, blocks, comm.size)
    if comm.size == 1:
        engine.step(grads[0], packed[0], lr=LR)
        assert engine.steps == 5
        return
    with pytest.raises(CollectiveMismatchError, match=r"step: .*rank %d has 4.*load_state_dict\(\) must run on "
                                                      r"every rank" % (comm.size - 1)):
        engine.step(grads[comm.rank], packed[comm.rank], lr=LR)


@pytest.mark.mpi
def test_engine_step_checks_and_uses_the_settings_it_is_given(comm):
    """``damping`` passed to ``step`` in ``settings`` (a value the caller took from
    ``current_settings``) is checked as the engine's own is: an invalid one raises ValueError
    naming it, at that step, before anything runs; a valid one is the step's damping, not the
    engine's attribute."""
    blocks = make_blocks()
    engine = KFACEngine(blocks, comm, damping=DAMPING, factor_decay=DECAY, kl_clip=None, comm_dtype=np.float64)
    dense, packed, grads = draw(np.random.default_rng(6), blocks, comm.size)
    with pytest.raises(ValueError, match=r"^damping: .*got 0\.0 \(at step 0\)$"):
        engine.step(grads[comm.rank], packed[comm.rank], lr=LR, settings={"damping": 0.0})
    assert engine.steps == 0
    given = 7 * DAMPING
    oracle = Oracle(blocks, None)
    oracle.update(dense, [[True] * len(blocks)] * comm.size, DECAY)
    oracle.invert(given)
    want, _ = oracle.precondition(grads, given)
    out = engine.step(grads[comm.rank], packed[comm.rank], lr=LR, settings={"damping": given})
    assert engine.damping == DAMPING
    for got, expected in zip(out, want):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.mpi
def test_engine_load_names_the_replaced_hyperparameters_on_rank_zero_alone(comm, caplog):
    """Every rank loads the same state: the warning naming the checkpoint's hyperparameters that
    replace the current ones is said once, by rank 0, and the values are the checkpoint's."""
    blocks = make_blocks()
    engine = KFACEngine(blocks, comm, damping=DAMPING, factor_decay=DECAY, comm_dtype=np.float64)
    _, packed, grads = draw(np.random.default_rng(8), blocks, comm.size)
    engine.step(grads[comm.rank], packed[comm.rank], lr=LR)
    state = engine.state_dict()
    other = KFACEngine(make_blocks(), comm, damping=3 * DAMPING, factor_decay=DECAY, comm_dtype=np.float64)
    with caplog.at_level("WARNING", logger="hpckfac"):
        other.load_state_dict(state)
    said = caplog.text.count("the checkpoint's hyperparameters replace the current ones: damping 0.03 -> 0.01")
    # Gathered, so that a wrong count fails on every rank rather than leaving the others waiting.
    assert comm.allgather_object(said) == [1] + [0] * (comm.size - 1), caplog.text
    assert other.damping == DAMPING and other.steps == 1
