"""Layer shapes and the alpha-beta performance model against hand-computed values."""
import itertools
import json
import math

import numpy as np
import pytest

from hpckfac.assignment import assign_owners, owner_loads
from hpckfac.bench import model, shapes
from hpckfac.stages.engine import ITERATION_STAGES


# ----------------------------------------------------------------------------- shapes


def test_resnet50_shapes():
    net = shapes.resnet50()
    assert len(net.kron) == 54 and len(net.batchnorm) == 53
    assert sum(s.linear for s in net.kron) == 1
    assert max(s.d_A for s in net.kron) == 4608 == 3 * 3 * 512
    assert max(s.d_G for s in net.kron) == 2048
    # torchvision's resnet50(): 25,557,032 parameters = conv 23,454,912 + fc 2,049,000 + BN 53,120.
    assert net.params == 25_557_032
    assert sum(s.params for s in net.kron if not s.linear) == 23_454_912
    assert sum(s.channels for s in net.batchnorm) == 26_560
    conv1, fc = net.kron[0], net.kron[-1]
    assert (conv1.d_A, conv1.d_G, conv1.h_out) == (147, 64, 112)
    assert (fc.d_A, fc.d_G, fc.positions) == (2049, 1000, 1)
    assert {s.h_out for s in net.kron if s.name.startswith("layer4")} <= {7, 14}
    assert net.kron[-2].h_out == 7
    # Every convolution is followed by its BatchNorm of the same channels and spatial size.
    for conv, bn in zip(net.layers[:-1:2], net.layers[1::2]):
        assert (conv.c_out, conv.h_out) == (bn.channels, bn.h)
    # Forward pass of ResNet-50: ~4.1 GMACs per 224x224 image (4,089,184,256 in its
    # convolutions and fc, the "4.09 GFLOPS" of torchvision's table).
    assert 8.0e9 < net.forward_flops < 8.3e9
    assert net.forward_flops == 2 * 4_089_184_256


@pytest.mark.parametrize("image, last", [(224, 7), (112, 4), (64, 2), (32, 1)])
def test_resnet50_shapes_at_other_sizes(image, last):
    # The image size changes only spatial sizes (stem /2, max pool /2, then stages
    # /1, /2, /2, /2, each rounding up), the class count only the fc layer.
    for classes, params in ((1000, 25_557_032), (10, 25_557_032 - 2048 * 990 - 990)):
        net = shapes.resnet50(image, classes)
        assert (len(net.kron), len(net.batchnorm), net.image) == (54, 53, image)
        assert net.params == params and net.kron[-1].d_G == classes
        assert net.kron[0].h_out == -(-image // 2) and net.kron[-2].h_out == last
        assert [s.d_A for s in net.kron] == [s.d_A for s in shapes.resnet50().kron]


def test_scaled_shapes():
    net = shapes.scaled(shapes.resnet50(), 4)
    assert max(s.d_A for s in net.kron) == 4608 // 4
    assert net.kron[0].c_in == 3 and net.kron[0].c_out == 16
    assert net.kron[-1].d_A == 2048 // 4 + 1 and net.kron[-1].d_G == 250
    assert shapes.scaled(shapes.resnet50(), 1) == shapes.resnet50()
    with pytest.raises(ValueError, match="factor"):
        shapes.scaled(shapes.resnet50(), 0)
    # Past the widest layer every channel count is 1, never 0; the colour channels stay 3.
    tiny = shapes.scaled(shapes.resnet50(), 4096)
    assert {s.c_out for s in tiny.kron} == {1} and {s.channels for s in tiny.batchnorm} == {1}
    assert tiny.kron[0].c_in == 3 and {s.c_in for s in tiny.kron[1:]} == {1}


# torch itself warns on the even kernel's forward, before from_torch refuses its shape.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
def test_from_torch_string_padding():
    # padding="same" and "valid" are the explicit zeros they stand for: the same shapes, and
    # blocks that take the recorded sizes' tensors.
    import torch

    def net(first, second):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=first), torch.nn.Conv2d(4, 5, 5, padding=second))

    named = shapes.from_torch("net", net("same", "valid"), (1, 3, 8, 8))
    assert named == shapes.from_torch("net", net(1, 0), (1, 3, 8, 8))
    assert [(s.padding, s.h_in, s.h_out) for s in named.kron] == [(1, 8, 8), (0, 8, 4)]
    for block, s in zip(shapes.blocks(named)[0], named.kron):
        assert block.output_size((s.h_in, s.h_in)) == (s.h_out, s.h_out)
    with pytest.raises(ValueError, match="same"):  # an even kernel pads one side more: no one padding
        shapes.from_torch("net", torch.nn.Conv2d(3, 4, 4, padding="same"), (1, 3, 8, 8))


@pytest.mark.parametrize("conv", [dict(kernel_size=(3, 5)), dict(kernel_size=3, groups=2)], ids=["oblong", "grouped"])
def test_from_torch_refuses_convolutions_it_cannot_describe(conv):
    # KronShape holds one kernel side and a dense C_in k^2 patch: others would be counted wrong.
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 6, **conv))
    with pytest.raises(ValueError, match="layer 1 is not a square, ungrouped convolution"):
        shapes.from_torch("net", net, (1, 4, 8, 8))


def test_small_cnn_matches_torch():
    from hpckfac.models import digits_cnn

    net = shapes.get("small")
    assert net.params == sum(p.numel() for p in digits_cnn().parameters())
    assert len(net.kron) == sum(1 for _ in net.kron) and net.kron[-1].linear
    assert net.kron[0].positions == 64  # 8x8 input, 3x3 stem with padding 1
    with pytest.raises(ValueError, match="model"):
        shapes.get("vgg")


# ----------------------------------------------------------------------------- collectives


def test_ring_formulas_hand_computed():
    n, alpha, beta = 1e6, 1e-5, 1e-9
    # 2*3/4*1e6*1e-9 + 2*3*1e-5
    assert model.ring_allreduce_time(n, 4, alpha, beta) == pytest.approx(1.5e-3 + 6e-5)
    # 3/4*1e6*1e-9 + 3*1e-5
    assert model.ring_scatter_gather_time(n, 4, alpha, beta) == pytest.approx(7.5e-4 + 3e-5)
    assert model.ring_scatter_gather_time(n, 1, alpha, beta) == 0.0
    assert model.ring_allreduce_time(n, 1, alpha, beta) == 0.0
    # MPI's: a few bytes by recursive doubling, one message per doubling (none at one rank);
    # a large buffer by halving and doubling, the ring's bandwidth term in 2 log2 P messages.
    assert model.mpi_allreduce_time(0.0, 1, alpha, beta) == 0.0
    assert model.mpi_allreduce_time(0.0, 2, alpha, beta) == pytest.approx(1e-5)
    assert model.mpi_allreduce_time(0.0, 5, alpha, beta) == pytest.approx(3e-5)
    assert model.mpi_allreduce_time(800.0, 1024, alpha, beta) == pytest.approx(10 * (1e-5 + 8e-7))
    assert model.mpi_allreduce_time(n, 4, alpha, beta) == pytest.approx(1.5e-3 + 4e-5)
    # "auto": the ring from 128 KiB per ring message, MPI's below.
    big, small = 4 * 2**17, 4 * 2**17 - 1
    assert model.auto_allreduce_time(big, 4, alpha, beta) == model.ring_allreduce_time(big, 4, alpha, beta)
    assert model.auto_allreduce_time(small, 4, alpha, beta) == model.mpi_allreduce_time(small, 4, alpha, beta)
    # Fused buckets, each by its own choice: 2 MiB and 1 MiB at 16 ranks, 128 KiB and 64 KiB per
    # ring message: the ring for the first, MPI's for the second.
    mib = 2**20
    assert model.fused_allreduce_time([mib, mib, mib], 16, alpha, beta, bucket_bytes=2 * mib) == pytest.approx(
        model.ring_allreduce_time(2 * mib, 16, alpha, beta) + model.mpi_allreduce_time(mib, 16, alpha, beta))
    # An allreduce is a reduce-scatter followed by an all-gather.
    assert model.ring_allreduce_time(n, 7, alpha, beta) == pytest.approx(
        2 * model.ring_scatter_gather_time(n, 7, alpha, beta))


# ----------------------------------------------------------------------------- work and prediction


def tiny_model():
    """conv (3x3, 2->4 channels, 4x4 output) + BN + Linear(4 -> 3, bias)."""
    conv = shapes.KronShape("conv", 2, 4, kernel=3, stride=1, padding=1, h_in=4, h_out=4)
    bn = shapes.BatchNormShape("bn", 4, 4)
    fc = shapes.KronShape("fc", 4, 3, bias=True, linear=True)
    return shapes.ModelShapes("tiny", (conv, bn, fc), 4)


def test_blocks_of_the_shapes_in_model_order():
    """The engine's blocks: a bias-free Linear's A without the bias row; BatchNorm among them
    with "kfac", set aside for the allreduce with "allreduce"."""
    fc = shapes.KronShape("head", 4, 3, bias=False, linear=True)
    net = shapes.ModelShapes("tiny", tiny_model().layers + (fc,), 4)
    engine, reduced = shapes.blocks(net)
    assert [b.name for b in engine] == ["conv", "bn", "fc", "head"] and reduced == []
    assert engine[-1].cost() == 4 ** 3 + 3 ** 3 and engine[-2].cost() == 5 ** 3 + 3 ** 3
    engine, reduced = shapes.blocks(net, "allreduce")
    assert [b.name for b in engine] == ["conv", "fc", "head"] and [b.name for b in reduced] == ["bn"]


def test_stage_work_hand_computed():
    work = model.Workload(tiny_model(), batch=5, comm_bytes=4)
    w = model.stage_work(work, 1)
    # conv: d_A 18, d_G 4, 16 positions; fc: d_A 5, d_G 3; BN: 10 flops per element.
    assert w["local_factors"] == 2 * 5 * 16 * (18 ** 2 + 4 ** 2) + 2 * 5 * (5 ** 2 + 3 ** 2) + 10 * 5 * 4 * 16
    assert w["inversion"] == (18 ** 3 + 4 ** 3) + 8 * 4 + (5 ** 3 + 3 ** 3)
    assert w["precondition"] == 2 * 4 * 18 * 22 + 8 * 4 + 2 * 3 * 5 * 8
    # Factor step, one rank: packed A and G + presence flag + gradient per Kronecker block;
    # BN: 3 per channel + flag + 2 per channel.
    stats = (171 + 10 + 1 + 72) + (3 * 4 + 1 + 8) + (15 + 6 + 1 + 15)
    assert w["reduce_scatter"] == 4 * stats
    assert w["all_gather"] == 4 * (72 + 8 + 15 + 2)  # + the owner's partial KL sum, mantissa and exponent
    assert w["allreduce"] == 0
    assert w["forward_backward"] == 3 * 5 * (2 * 16 * 4 * 18 + 2 * 3 * 4)
    # Running averages: 3 x the packed statistics (A 171 + G 10, BN 3 per channel, A 15 + G 6);
    # writing .grad: every block's gradient elements.
    assert w["running_average"] == 3 * ((171 + 10) + 3 * 4 + (15 + 6))
    assert w["write_grads"] == 72 + 8 + 15


def test_stage_work_of_the_most_loaded_owner_at_two_ranks():
    # lpt at two ranks: the conv block (cost 18^3 + 4^3) alone on one rank, BN and fc on the other.
    w = model.stage_work(model.Workload(tiny_model(), batch=5, comm_bytes=4), 2)
    assert w["inversion"] == 18 ** 3 + 4 ** 3
    assert w["running_average"] == 3 * (171 + 10)
    assert w["precondition"] == 2 * 4 * 18 * 22
    assert w["write_grads"] == 72 + 8 + 15  # every gradient is written on every rank


def test_stage_work_follows_the_assignment():
    """ResNet-50/8 at 16 ranks: the owners' loads of the assignment asked for, contiguous and lpt
    apart (layer order leaves one owner far more than the balanced split)."""
    net = shapes.scaled(shapes.resnet50(64), 8)
    specs = model.block_specs(net)
    costs, grads = [b.cost() for b in specs], [b.precondition_flops() for b in specs]
    work = {}
    for method in ("lpt", "contiguous"):
        owners = assign_owners(costs, 16, method)
        work[method] = model.stage_work(model.Workload(net, batch=2, assignment=method), 16)
        assert work[method]["inversion"] == max(owner_loads(costs, owners, 16))
        assert work[method]["precondition"] == max(owner_loads(grads, owners, 16))
    assert work["contiguous"]["inversion"] > work["lpt"]["inversion"]


def test_intervals_amortise_and_batchnorm_allreduce():
    base = model.stage_work(model.Workload(tiny_model(), batch=5), 2)
    lazy = model.stage_work(model.Workload(tiny_model(), batch=5, factor_interval=2, inverse_interval=4), 2)
    assert lazy["local_factors"] == pytest.approx(base["local_factors"] / 2)
    assert lazy["inversion"] == pytest.approx(base["inversion"] / 4)
    # The running averages blend new statistics only on factor steps; every step preconditions,
    # gathers and writes its gradients.
    assert lazy["running_average"] == pytest.approx(base["running_average"] / 2)
    for stage in ("precondition", "all_gather", "write_grads"):
        assert lazy[stage] == base[stage], stage
    grads_only = 4 * (72 + 8 + 15)
    assert lazy["reduce_scatter"] == pytest.approx((base["reduce_scatter"] + grads_only) / 2)
    bn = model.stage_work(model.Workload(tiny_model(), batch=5, batchnorm="allreduce"), 2)
    assert bn["allreduce"] == 4 * 8
    with pytest.raises(ValueError, match="batchnorm"):
        model.block_specs(tiny_model(), "sgd")


def test_predict_hand_computed():
    work = model.Workload(tiny_model(), batch=5)
    machine = model.Machine("m", factor_flops=1e9, inverse_rate=1e8, gemm_flops=2e9, alpha=1e-5, beta=1e-9)
    w = model.stage_work(work, 2)
    t = model.predict(work, machine, 2)
    assert t["local_factors"] == pytest.approx(w["local_factors"] / 1e9)
    assert t["inversion"] == pytest.approx(w["inversion"] / 1e8)
    assert t["precondition"] == pytest.approx(w["precondition"] / 2e9)
    assert t["reduce_scatter"] == pytest.approx(0.5 * w["reduce_scatter"] * 1e-9 + 1e-5)
    assert t["all_gather"] == pytest.approx(0.5 * w["all_gather"] * 1e-9 + 1e-5)
    # Every parameter owned by a block: the presence flags alone, one message at two ranks.
    assert t["allreduce"] == pytest.approx(1e-5) and "forward_backward" not in t
    assert t["total"] == pytest.approx(sum(t[s] for s in ITERATION_STAGES))
    # Four ranks on two cores: compute takes twice as long per rank.
    shared = model.predict(work, model.Machine("m", 1e9, 1e8, 2e9, 1e-5, 1e-9, cores=2), 4)
    alone = model.predict(work, machine, 4)
    for stage in ("local_factors", "running_average", "inversion", "precondition", "write_grads"):
        assert shared[stage] == pytest.approx(2 * alone[stage]), stage
    for stage in ("reduce_scatter", "all_gather", "allreduce"):
        assert shared[stage] == pytest.approx(alone[stage]), stage
    # Fewer ranks than cores: each rank has its own, compute at the full rate (never faster).
    few = model.predict(work, model.Machine("m", 1e9, 1e8, 2e9, 1e-5, 1e-9, cores=2), 1)
    assert few["local_factors"] == pytest.approx(model.predict(work, machine, 1)["local_factors"])


def test_predict_sgd_hand_computed():
    # 3 x forward flops (2 * 16 * 4 * 18 + 2 * 3 * 4 a example) at the training rate, then one fused
    # bucket of every gradient (72 + 8 + 15 elements of 2 bytes) by MPI's recursive doubling at 4 ranks.
    work = model.Workload(tiny_model(), batch=5, comm_bytes=2)
    machine = model.Machine("m", 1e9, 1e8, 2e9, alpha=1e-5, beta=1e-9, train_flops=1e9)
    compute = 3 * 5 * (2 * 16 * 4 * 18 + 2 * 3 * 4) / 1e9
    assert model.predict_sgd(work, machine, 4) == pytest.approx(compute + 2 * (1e-5 + 2 * 95 * 1e-9))
    rows = model.prediction_rows(tiny_model(), machine, [4], 5, comm_bytes=2)
    assert rows[0]["sgd_ms"] == pytest.approx(1e3 * (compute + 2 * (1e-5 + 2 * 95 * 1e-9)))
    assert rows[0]["kfac/sgd"] == pytest.approx(rows[0]["total_ms"] / rows[0]["sgd_ms"])


def test_workload_from_config_splits_a_strong_batch():
    config = scaling_config()
    assert [model.workload_from_config(config, p).batch for p in (1, 2, 4)] == [8, 4, 2]
    assert model.workload_from_config(dict(config, mode="weak"), 4).batch == 8
    assert model.workload_from_config(dict(config, comm_dtype="float64"), 1).comm_bytes == 8


def test_strong_scaling_divides_the_batch():
    rows = model.prediction_rows(shapes.resnet50(), model.PRESETS["v100-edr"], [1, 4], 128, "strong")
    assert [r["batch"] for r in rows] == [128, 128]
    assert rows[1]["local_factors_ms"] == pytest.approx(rows[0]["local_factors_ms"] / 4)
    # The global batch stays fixed: 32,768 at 64 and 1024 V100s is 512 and 32 examples per GPU,
    # whose factor GEMMs (2 rows d^2, rows = batch |T|) cost 16x and 1x those of 32 per GPU.
    rows = model.prediction_rows(shapes.resnet50(), model.PRESETS["v100-edr"], [64, 1024], 32768, "strong")
    per_gpu = sum(2.0 * 32 * s.positions * (s.d_A ** 2 + s.d_G ** 2) for s in shapes.resnet50().kron)
    assert [r["batch"] for r in rows] == [32768, 32768]
    assert rows[1]["local_factors_ms"] == pytest.approx(1e3 * (per_gpu + sum(
        10.0 * 32 * s.channels * s.positions for s in shapes.resnet50().batchnorm)) / 10e12)
    assert rows[0]["local_factors_ms"] == pytest.approx(16 * rows[1]["local_factors_ms"])


def test_strong_scaling_refuses_a_batch_that_does_not_split(tmp_path):
    # 32 images over 64 GPUs (or 100 over 3) would silently become another global batch.
    for batch, ranks in ((32, [1, 64]), (100, [3])):
        with pytest.raises(ValueError, match="global batch"):
            model.prediction_rows(shapes.resnet50(), model.PRESETS["v100-edr"], ranks, batch, "strong")
        with pytest.raises(ValueError, match="global batch"):
            model.main(["--mode", "strong", "--batch", str(batch), "--ranks", ",".join(map(str, ranks))])
    # Left out, the strong batch is OTU+18's global 32,768, which splits over every default rank count.
    out = tmp_path / "strong.json"
    assert model.main(["--mode", "strong", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]["predictions"]["v100-edr"]["rows"]
    assert {r["batch"] for r in rows} == {32768} and rows[-1]["ranks"] == 4096
    # Weak scaling: the batch is per GPU, any rank count goes.
    rows = model.prediction_rows(shapes.resnet50(), model.PRESETS["v100-edr"], [3], 100, "weak")
    assert rows[0]["batch"] == 300


def test_resnet50_inversion_stage_stops_at_the_largest_block():
    net = shapes.resnet50()
    machine = model.PRESETS["v100-edr"]
    t = {p: model.predict(model.Workload(net, 32), machine, p) for p in (64, 1024)}
    largest = 4608 ** 3 + 512 ** 3
    assert t[64]["inversion"] == pytest.approx(largest / machine.inverse_rate)
    assert t[1024]["inversion"] == t[64]["inversion"]
    # Communication grows with P, compute per GPU does not (weak scaling).
    assert t[1024]["reduce_scatter"] > t[64]["reduce_scatter"]
    assert t[1024]["local_factors"] == t[64]["local_factors"]


# ----------------------------------------------------------------------------- imbalance


def brute_force_imbalance(costs, ranks):
    best = min(max(owner_loads(costs, o, ranks)) for o in itertools.product(range(ranks), repeat=len(costs)))
    return best / (sum(costs) / ranks)


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_lpt_imbalance_near_brute_force_optimum(ranks):
    # Inversion costs d_A^3 + d_G^3 of ResNet-like blocks (random widths).
    rng = np.random.default_rng(ranks)
    dims = rng.choice([64, 147, 256, 576, 1024, 1152, 2304], size=(7, 2))
    costs = [float(a) ** 3 + float(g) ** 3 for a, g in dims]
    lpt = model.imbalance(costs, assign_owners(costs, ranks, "lpt"), ranks)
    best = brute_force_imbalance(costs, ranks)
    assert best <= lpt + 1e-12
    assert lpt <= (4 / 3 - 1 / (3 * ranks)) * best + 1e-12


def test_imbalance_table_resnet50():
    net = shapes.resnet50()
    rows = {r["ranks"]: r for r in model.imbalance_table(net, [1, 2, 4, 107, 1024])}
    assert rows[1]["lpt"] == rows[1]["contiguous"] == 1.0
    for row in rows.values():
        assert row["bound"] <= row["lpt"] + 1e-12 and row["bound"] <= row["contiguous"] + 1e-12
        assert row["lpt"] <= row["contiguous"] + 1e-12
    # 107 blocks (54 Kronecker + 53 BatchNorm): beyond that ranks own nothing, and the
    # largest block alone sets the maximum load.
    costs = [b.cost() for b in model.block_specs(net)]
    assert len(costs) == 107 and rows[1024]["owners_max"] == 107
    assert rows[1024]["lpt"] == pytest.approx(max(costs) / (sum(costs) / 1024))
    # Each column is its own assignment's max/mean owner load.
    for p, row in rows.items():
        for method in ("lpt", "contiguous"):
            owners = assign_owners(costs, p, method)
            loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(p)]
            assert row[method] == pytest.approx(max(loads) / (sum(costs) / p)), (p, method)
    assert rows[4]["contiguous"] > 3 * rows[4]["lpt"]


def test_imbalance_bound_hand_computed():
    # Block costs 5896, 32 and 152 (sum 6080): the largest block or the mean, over the mean.
    rows = model.imbalance_table(tiny_model(), [1, 2, 3, 5])
    assert [r["bound"] for r in rows] == pytest.approx([1.0, 5896 / 3040, 5896 / (6080 / 3), 5896 / (6080 / 5)])
    assert [r["owners_max"] for r in rows] == [1, 2, 3, 3]
    assert rows[1]["lpt"] == pytest.approx(5896 / 3040)


# ----------------------------------------------------------------------------- calibration


def scaling_config():
    return {"model": "small", "image": 8, "scale": 1, "batch": 8, "mode": "strong",
            "comm_dtype": "float32", "batchnorm": "kfac"}


# BatchNorm allreduced in float64 on ResNet-50: at two ranks its gradients (53 layers, 424,960
# bytes) go by the ring, so the calibration fits alpha and beta to an allreduce point too.
RESNET50_ALLREDUCE = {"model": "resnet50", "image": 32, "batchnorm": "allreduce", "comm_dtype": "float64"}


@pytest.mark.parametrize("changes", [{}, RESNET50_ALLREDUCE], ids=["small", "resnet50_bn_allreduce"])
def test_calibration_recovers_known_machine(changes):
    config = dict(scaling_config(), **changes)
    if changes:
        allreduce = model.stage_work(model.workload_from_config(config, 2), 2)["allreduce"]
        assert model.reduction_algorithm("auto", int(allreduce), 2) == "ring"
    truth = model.Machine("truth", factor_flops=3e9, inverse_rate=5e8, gemm_flops=2e9,
                          alpha=4e-5, beta=2e-9, cores=2)
    runs = []
    for p in (1, 2, 4):
        t = model.predict(model.workload_from_config(config, p), truth, p)
        runs.append({"ranks": p, "assignment": "lpt", "stages": {s: t[s] for s in ITERATION_STAGES}})
    fitted = model.calibrate(config, runs, cores=2)
    for field in ("factor_flops", "inverse_rate", "gemm_flops", "alpha", "beta"):
        assert getattr(fitted, field) == pytest.approx(getattr(truth, field), rel=1e-6)
    rows = model.validation_rows(config, runs, fitted)
    assert all(abs(r["error_pct"]) < 1e-6 for r in rows)
    # Stages measured 1.25 x the prediction: the prediction misses by 1 - 1/1.25 = 20% of the
    # measured time, not 25% of the predicted one.
    slower = [dict(r, stages={s: 1.25 * t for s, t in r["stages"].items()}) for r in runs]
    assert [r["error_pct"] for r in model.validation_rows(config, slower, fitted)] == pytest.approx([-20.0] * 3)
    # A machine 1000 times as fast (stages of microseconds): every rate 1000 times as high.
    fast = [dict(r, stages={s: t / 1000 for s, t in r["stages"].items()}) for r in runs]
    quick = model.calibrate(config, fast, cores=2)
    for field in ("factor_flops", "inverse_rate", "gemm_flops"):
        assert getattr(quick, field) == pytest.approx(1000 * getattr(truth, field), rel=1e-6)
    assert (quick.alpha, quick.beta) == pytest.approx((truth.alpha / 1000, truth.beta / 1000), rel=1e-6)
    with pytest.raises(ValueError, match="one-rank"):
        model.calibrate(config, runs[1:], cores=2)
    # The streaming stages at different rates: one rate for both, their work over their time.
    work1 = model.stage_work(model.workload_from_config(config, 1), 1)
    runs[0]["stages"] = dict(runs[0]["stages"], running_average=3e-6, write_grads=1e-6)
    fitted = model.calibrate(config, runs, cores=2)
    assert fitted.memory_rate == pytest.approx((work1["running_average"] + work1["write_grads"]) / 4e-6)


def test_calibration_doubts():
    good = model.Machine("m", 3e9, 5e8, 2e9, alpha=4e-5, beta=2e-9)
    rows = [{"error_pct": 3.0}, {"error_pct": -8.0}]
    assert model.calibration_doubts(good, rows) == []
    # The small model's runs once fitted alpha 0 and beta 845 s/GB: both flagged.
    bad = model.Machine("m", 3e9, 5e8, 2e9, alpha=0.0, beta=845e-9)
    doubts = model.calibration_doubts(bad, rows)
    assert len(doubts) == 2 and "fitted at 0" in doubts[0] and "845.0 s/GB" in doubts[1]
    assert "misses a measured total by 70%" in model.calibration_doubts(good, [{"error_pct": -70.0}])[0]


def one_parameter_fits(points: list[tuple[float, float, float]]) -> tuple[tuple[float, float], tuple[float, float]]:
    """The least-squares ``(alpha, 0)`` and ``(0, beta)`` of ``t = m alpha + b beta``, written out:
    ``sum(m t) / sum(m^2)`` and ``sum(b t) / sum(b^2)``."""
    m, b, t = (np.array(column, dtype=float) for column in zip(*points))
    return (float(m @ t / (m @ m)), 0.0), (0.0, float(b @ t / (b @ b)))


def squared_error(points: list[tuple[float, float, float]], fit: tuple[float, float]) -> float:
    return sum((m * fit[0] + b * fit[1] - t) ** 2 for m, b, t in points)


def test_alpha_beta_fit_recovers_noisy_timings():
    """Collective times drawn from alpha 20 us and beta 1 ns/B with 1% noise, over the messages and
    bytes of ring collectives at 2 to 16 ranks: the fit is the least-squares solution of the 2x2
    normal equations, solved here by Cramer's rule, and close to the truth."""
    rng = np.random.default_rng(7)
    alpha, beta = 2e-5, 1e-9
    points = []
    for p in (2, 4, 8, 16):
        for n in rng.uniform(1e5, 1e7, size=3):
            m, b = p - 1, (p - 1) / p * n
            points.append((m, b, (m * alpha + b * beta) * rng.uniform(0.99, 1.01)))
    m, b, t = (np.array(column) for column in zip(*points))
    det = (m @ m) * (b @ b) - (m @ b) ** 2
    want = (((b @ b) * (m @ t) - (m @ b) * (b @ t)) / det, ((m @ m) * (b @ t) - (m @ b) * (m @ t)) / det)
    assert model._fit_alpha_beta(points) == pytest.approx(want, rel=1e-9)
    assert model._fit_alpha_beta(points) == pytest.approx((alpha, beta), rel=0.05)


def test_alpha_beta_fit_never_negative():
    # Times that fall with the message count would need alpha < 0: clipped to 0, beta alone is
    # fitted (the better of the two one-parameter fits).
    falling = [(1, 1e6, 2e-3), (3, 1.5e6, 1.5e-3)]
    alpha_only, beta_only = one_parameter_fits(falling)
    assert squared_error(falling, beta_only) < squared_error(falling, alpha_only)
    assert model._fit_alpha_beta(falling) == pytest.approx(beta_only, rel=1e-12)
    # Times that fall with the bytes would need beta < 0: alpha alone.
    shrinking = [(1, 2e6, 1e-3), (3, 1e6, 3.1e-3)]
    alpha_only, beta_only = one_parameter_fits(shrinking)
    assert squared_error(shrinking, alpha_only) < squared_error(shrinking, beta_only)
    assert model._fit_alpha_beta(shrinking) == pytest.approx(alpha_only, rel=1e-12)
    assert model._fit_alpha_beta([]) == (0.0, 0.0)


def test_alpha_beta_fit_of_points_that_cannot_separate_them():
    """Bytes proportional to messages (every point of one rank count and one size) cannot tell
    latency from bandwidth: one parameter is fitted, the other 0, not a minimum-norm mixture."""
    rng = np.random.default_rng(11)
    points = [(m, 4e5 * m, float(t)) for m, t in zip((1, 2, 3, 5), rng.uniform(1e-3, 5e-3, size=4))]
    fit = model._fit_alpha_beta(points)
    assert 0.0 in fit and max(fit) > 0
    # Either one-parameter fit predicts the same times (its column is the other's multiple).
    alpha_only, _ = one_parameter_fits(points)
    assert [m * fit[0] + b * fit[1] for m, b, _ in points] == pytest.approx([m * alpha_only[0] for m, _, _ in points])


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_json_and_png(tmp_path, capsys):
    config = scaling_config()
    truth = model.Machine("truth", 3e9, 5e8, 2e9, 4e-5, 2e-9, cores=2)
    runs = [{"ranks": p, "assignment": a,
             "stages": {s: v for s, v in model.predict(model.workload_from_config(config, p), truth, p).items()
                        if s in ITERATION_STAGES}}
            for p in (1, 2) for a in ("lpt", "contiguous")]
    combined = tmp_path / "combined.json"
    combined.write_text(json.dumps({"config": config, "results": {"runs": runs}}))
    out, png = tmp_path / "model.json", tmp_path / "model.png"
    assert model.main(["--calibrate", str(combined), "--cores", "2", "--ranks", "1,8,1024",
                       "--json", str(out), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "OTU+18" in text and "error_pct" in text
    assert "measured_ms: the sum of the measured stage medians (not the scaling table's iter_ms)" in text
    result = json.loads(out.read_text())["results"]
    assert set(result["predictions"]) == set(model.PRESETS)
    assert set(result["calibration"]) == {"lpt", "contiguous"}
    assert result["otu18"]["ms_per_iteration"] == pytest.approx(600_000 / 1760)
    assert [r["ranks"] for r in result["predictions"]["v100-edr"]["rows"]] == [1, 8, 1024]
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        model.main(["--batch", "0"])
    assert "error: --batch: expected an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        model.main(["--ranks", f"1,{2**20 + 1}"])
    assert f"error: --ranks: at most {2**20} ranks, got {2**20 + 1}" in capsys.readouterr().err
    assert math.isfinite(result["predictions"]["h100-ndr"]["rows"][-1]["total_ms"])


def test_cli_takes_the_cores_and_machine_settings_it_is_given(tmp_path, capsys):
    """--cores sets the calibrated machine's cores; --alpha and --beta override the preset, whose
    rows are then those of the overridden machine; a rank count below 1 is refused."""
    config = scaling_config()
    truth = model.Machine("truth", 3e9, 5e8, 2e9, 4e-5, 2e-9, cores=2)
    runs = [{"ranks": p, "assignment": "lpt",
             "stages": {s: model.predict(model.workload_from_config(config, p), truth, p)[s] for s in ITERATION_STAGES}}
            for p in (1, 2)]
    combined, out = tmp_path / "combined.json", tmp_path / "model.json"
    combined.write_text(json.dumps({"config": config, "results": {"runs": runs}}))
    assert model.main(["--calibrate", str(combined), "--cores", "5", "--preset", "v100-edr", "--ranks", "1,4",
                       "--alpha", "1e-3", "--beta", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"]
    assert result["calibration"]["lpt"]["machine"]["cores"] == 5 and "GF/s, 5 cores" in capsys.readouterr().out
    machine = result["predictions"]["v100-edr"]["machine"]
    assert (machine["alpha"], machine["beta"], machine["inverse_rate"]) == (1e-3, 0.0, 2e12)
    want = model.prediction_rows(shapes.resnet50(), model.Machine(**machine), [1, 4], 32)
    for got, row in zip(result["predictions"]["v100-edr"]["rows"], want, strict=True):
        assert got == pytest.approx(row)
    assert want[1]["all_gather_ms"] == pytest.approx(3 * 1.0)  # (P-1) alpha at 4 ranks, no bandwidth term
    with pytest.raises(ValueError, match="--ranks: expected comma-separated integers >= 1, got '0,2'"):
        model.main(["--ranks", "0,2"])


def test_cli_calibrates_on_the_cores_it_may_run_on(tmp_path, monkeypatch, capsys):
    """Without ``--cores`` the calibration takes the CPUs this process may run on, as the runs
    of a study started in the same shell had them (``taskset -c 0 jobs/local_scaling.sh``: one
    core of a larger machine, its 2-rank runs sharing it), not the machine's count."""
    import os

    config = scaling_config()
    truth = model.Machine("truth", 3e9, 5e8, 2e9, 4e-5, 2e-9, cores=1)
    runs = [{"ranks": p, "assignment": "lpt",
             "stages": {s: v for s, v in model.predict(model.workload_from_config(config, p), truth, p).items()
                        if s in ITERATION_STAGES}}
            for p in (1, 2)]
    combined = tmp_path / "combined.json"
    combined.write_text(json.dumps({"config": config, "results": {"runs": runs}}))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert model.main(["--calibrate", str(combined), "--ranks", "1,8"]) == 0
    assert "GF/s, 1 cores" in capsys.readouterr().out


def test_measured_rates_are_positive():
    rates = model.measure_rates(tiny_model(), batch=3, repeat=1)
    assert set(rates) == {"factor_flops", "inverse_rate", "gemm_flops", "plain_gemm"}
    assert all(math.isfinite(v) and v > 0 for v in rates.values())
