"""``python -m hpckfac.bench comm``: the sizes and repetitions it runs, and the bus bandwidth it
reports from the slowest rank's times, on scripted timings."""
import json

import numpy as np
import pytest

from hpckfac.bench import comm


def test_sizes_grow_by_four_up_to_the_largest():
    assert comm.sizes(4096, 65536) == [4096, 16384, 65536]
    assert comm.sizes(4096, 65535) == [4096, 16384]
    assert comm.sizes(8, 8) == [8]


def test_repetitions_fall_with_the_size_above_16_mib_to_three_at_least():
    assert comm.repetitions(2**20, 20) == 20
    assert comm.repetitions(16 * 2**20, 20) == 20
    assert comm.repetitions(64 * 2**20, 20) == 20 * 16 // 64
    assert comm.repetitions(256 * 2**20, 20) == 3  # 20 * 16 / 256 = 1.25, raised to 3
    assert comm.repetitions(1024, 2) == 3


def test_labels_name_whole_units_only():
    assert [comm.label(n) for n in (4096, 3 * 2**20, 1536, 512)] == ["4 KiB", "3 MiB", "1536 B", "512 B"]


def test_calls_split_the_buffer_into_near_equal_segments():
    """At 4 ranks a buffer of 10 float64 elements: segments of 3, 3, 2, 2 (or some order of
    them) in the reduce-scatter and the all-gather, rank 2 gathering from a segment of its own."""
    seen = []

    class Comm:
        rank, size = 2, 4

        def allreduce(self, buf, algorithm):
            seen.append(("allreduce", buf.size, None, algorithm))

        def reduce_scatter_v(self, buf, counts, algorithm):
            seen.append(("reduce_scatter_v", buf.size, list(counts), algorithm))

        def allgather_v(self, segment, counts, algorithm):
            seen.append(("allgather_v", segment.size, list(counts), algorithm))

    for fn in comm.calls(Comm(), 80, np.dtype(np.float64)).values():
        fn()
    counts = seen[2][2]
    assert sorted(counts) == [2, 2, 3, 3] and sum(counts) == 10
    assert seen == [("allreduce", 10, None, "ring"), ("allreduce", 10, None, "mpi"),
                    ("reduce_scatter_v", 10, counts, "mpi"), ("reduce_scatter_v", 10, counts, "ring"),
                    ("allgather_v", counts[2], counts, "mpi"), ("allgather_v", counts[2], counts, "ring")]


def test_bus_bandwidth_of_the_slowest_rank_s_median(monkeypatch):
    """Four ranks, five calls of each collective: per call the slowest rank's seconds, their
    median, and the bytes a rank moves -- 2(P-1)/P of the buffer for an allreduce, (P-1)/P for
    reduce-scatter and all-gather -- over it."""
    rng = np.random.default_rng(5)
    size, repeat, nbytes = 4, 5, 2**20
    scripted = {name: rng.uniform(1e-4, 1e-3, size=(size, repeat)) for name in comm.COLLECTIVES}
    mine = {name: iter(scripted[name][0]) for name in comm.COLLECTIVES}

    class Comm:
        rank = 0

        def __init__(self):
            self.size = size

        def barrier(self):
            pass

        def allgather_object(self, samples):
            name = next(n for n in comm.COLLECTIVES if list(scripted[n][0]) == samples)
            return [list(rank) for rank in scripted[name]]

    def timed(fn, repeat, warmup, barrier):
        return [float(next(mine[fn()]))]

    calls = {name: (lambda name=name: name) for name in comm.COLLECTIVES}
    monkeypatch.setattr(comm, "calls", lambda c, n, dtype: calls)
    monkeypatch.setattr(comm, "time_calls", timed)
    row = comm.measure(Comm(), nbytes, np.dtype(np.float32), repeat)
    assert (row["bytes"], row["size"], row["repeat"]) == (nbytes, "1 MiB", repeat)
    moved = {"ring": 2 * 3 / 4, "mpi": 2 * 3 / 4, "rs_v_mpi": 3 / 4, "rs_v_ring": 3 / 4, "ag_v_mpi": 3 / 4,
             "ag_v_ring": 3 / 4}
    for name in comm.COLLECTIVES:
        seconds = np.median(scripted[name].max(axis=0))
        assert row[f"{name}_us"] == pytest.approx(1e6 * seconds), name
        assert row[f"{name}_GBps"] == pytest.approx(moved[name] * nbytes / seconds / 1e9), name
    assert row["ring/mpi_bw"] == pytest.approx(np.median(scripted["mpi"].max(axis=0))
                                               / np.median(scripted["ring"].max(axis=0)))


def test_one_rank_runs_every_size_and_writes_its_rows(tmp_path):
    out = tmp_path / "comm.json"
    assert comm.main(["--min-bytes", "4096", "--max-bytes", "16384", "--repeat", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["bytes"] for r in rows] == [4096, 16384] and [r["repeat"] for r in rows] == [3, 3]
    # One rank moves nothing: no bandwidth, though every call took time.
    assert all(r[f"{c}_GBps"] == 0 and r[f"{c}_us"] > 0 for r in rows for c in comm.COLLECTIVES)


def test_a_smallest_size_above_the_largest_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        comm.parse(["--min-bytes", "8192", "--max-bytes", "4096"])
    assert exit_info.value.code == 2 and "error: --min-bytes must not exceed --max-bytes" in capsys.readouterr().err
    assert comm.parse(["--min-bytes", "4096", "--max-bytes", "4096"]).max_bytes == 4096
