"""jobs/: every script parses; the local scripts print their mpiexec commands and
really run a tiny configuration at 1 and 2 ranks."""
import glob
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest


JOBS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs")
SCRIPTS = sorted(p for ext in ("sh", "sbatch", "pbs") for p in glob.glob(os.path.join(JOBS, f"*.{ext}")))
BIN = os.path.dirname(sys.executable)


def run_script(name, env, *args, timeout=600):
    full = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), PYTHON=sys.executable, **env)
    proc = subprocess.run(["bash", os.path.join(JOBS, name), *args], capture_output=True, text=True,
                          env=full, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_every_script_parses():
    assert len(SCRIPTS) >= 6
    for path in SCRIPTS:
        proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


def test_cluster_templates_bind_one_rank_per_gpu():
    for name in ("slurm_train.sbatch", "slurm_scaling.sbatch"):
        text = open(os.path.join(JOBS, name)).read()
        assert "#SBATCH --gpus-per-task=1" in text and "srun" in text
        # One GPU per rank: an explicit --gpu-bind replaces the per-task binding --gpus-per-task implies.
        binds = re.findall(r"--gpu-bind=(\S+)", text)
        assert binds and all(b == "single:1" for b in binds), binds
    for name in ("pbs_train.pbs", "pbs_scaling.pbs"):
        text = open(os.path.join(JOBS, name)).read()
        assert "#PBS -l select=" in text and "ngpus=" in text and "mpiprocs=" in text and "mpirun" in text
    for name in ("slurm_train.sbatch", "pbs_train.pbs", "slurm_scaling.sbatch", "pbs_scaling.pbs"):
        text = open(os.path.join(JOBS, name)).read()
        assert ("python -m hpckfac train --optimizer" in text or "python -m hpckfac.bench scaling" in text)
        assert '--device "$DEVICE"' in text and "DEVICE=${DEVICE:-cuda}" in text


def test_local_scaling_dry_run_prints_commands(tmp_path):
    out_dir = tmp_path / "absent"
    out = run_script("local_scaling.sh", {"DRY_RUN": "1", "OUT": str(out_dir)})
    lines = [l for l in out.splitlines() if l.startswith("+ ")]
    for mode in ("strong", "weak"):
        for p in (1, 2, 4):
            assert any(f"-n {p} " in l and f"--mode {mode}" in l and f"{mode}_{p}.json" in l for l in lines)
        assert any("--combine" in l and f"{out_dir}/{mode}.json" in l for l in lines)
    assert any(f"hpckfac.bench model --calibrate {out_dir}/strong.json" in l for l in lines)
    assert not out_dir.exists()  # a dry run writes nothing


def test_local_train_dry_run_prints_commands():
    out = run_script("local_train.sh", {"DRY_RUN": "1", "STEPS": "7"}, "--seed", "3")
    lines = [l for l in out.splitlines() if l.startswith("+ ")]
    assert len(lines) == 3
    for p, line in zip((1, 2, 4), lines):
        assert f"-n {p} " in line and "-m hpckfac train --optimizer kfac" in line
        assert "--steps 7" in line and line.endswith("--seed 3") and f"kfac_{p}ranks" in line


def test_local_scaling_runs_at_1_and_2_ranks(tmp_path):
    # The small model's own scale and image size are the defaults for MODEL=small.
    out = run_script("local_scaling.sh", {"RANKS": "1 2", "MODES": "strong", "MODEL": "small",
                                          "BATCH": "4", "REPEAT": "2", "OUT": str(tmp_path)})
    assert "--scale 1 --image 8" in out
    assert "error_pct" in out and "OTU+18" in out
    combined = json.loads((tmp_path / "strong.json").read_text())
    runs = combined["results"]["runs"]
    assert sorted((r["ranks"], r["assignment"]) for r in runs) == [
        (1, "contiguous"), (1, "lpt"), (2, "contiguous"), (2, "lpt")]
    assert all(r["efficiency"] > 0 for r in runs)
    assert (tmp_path / "strong.png").stat().st_size > 1000
    assert set(json.loads((tmp_path / "model.json").read_text())["results"]["calibration"]) == {"lpt", "contiguous"}


def test_local_train_runs_at_1_and_2_ranks(tmp_path):
    run_script("local_train.sh", {"RANKS": "1 2", "BATCH": "32", "STEPS": "2", "OUT": str(tmp_path)})
    for p in (1, 2):
        assert any((tmp_path / f"kfac_{p}ranks").iterdir())


def stub_launchers(tmp_path, *names):
    """Stand-ins for srun/mpirun/python on PATH: each appends its name and arguments to a log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in names:
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, log


def launches(log, launcher):
    return [line.split() for line in log.read_text().splitlines() if line.startswith(launcher + " ")]


def flag(words, name):
    return next(w.split("=", 1)[1] for w in words if w.startswith(name + "="))


def test_slurm_scaling_fills_nodes_and_sweeps_both_modes(tmp_path):
    stubs, log = stub_launchers(tmp_path, "srun", "python")
    env = dict(stubs, SLURM_NTASKS="8", SLURM_NTASKS_PER_NODE="4", SLURM_CPUS_PER_TASK="2",
               SLURM_JOB_ID="42", OUT=str(tmp_path / "out"))
    subprocess.run(["bash", os.path.join(JOBS, "slurm_scaling.sbatch")], env=dict(os.environ, **env),
                   check=True, capture_output=True, text=True, timeout=60)
    steps = launches(log, "srun")
    assert len(steps) == 2 * 4  # strong and weak at 1, 2, 4, 8 ranks
    for words in steps:
        p = int(flag(words, "--ntasks"))
        # Ranks packed 4 to a node: ceil(P/4) nodes, min(P, 4) per node, P x per node covered.
        assert int(flag(words, "--nodes")) == math.ceil(p / 4)
        assert int(flag(words, "--ntasks-per-node")) == min(p, 4)
        assert flag(words, "--cpus-per-task") == "2" and flag(words, "--gpus-per-task") == "1"
        mode, batch = words[words.index("--mode") + 1], int(words[words.index("--batch") + 1])
        assert batch == (128 if mode == "strong" else 32) and (mode == "weak" or batch % p == 0)
        assert words[words.index("--json") + 1] == f"{tmp_path}/out/{mode}_{p}.json"
    assert sorted(int(flag(w, "--ntasks")) for w in steps) == [1, 1, 2, 2, 4, 4, 8, 8]
    after = [" ".join(w) for w in launches(log, "python")]
    assert sum("--combine" in c for c in after) == 2 and any("model --calibrate" in c for c in after)
    # A weak-only study has no strong runs to calibrate the model on: it must not end in an error.
    log.unlink()
    subprocess.run(["bash", os.path.join(JOBS, "slurm_scaling.sbatch")],
                   env=dict(os.environ, **env, MODES="weak"), check=True, capture_output=True, timeout=60)
    assert not any("model" in w for w in launches(log, "python")) and len(launches(log, "srun")) == 4
    # Rank counts of one's own, e.g. ending at a whole allocation that is not a power of two.
    log.unlink()
    subprocess.run(["bash", os.path.join(JOBS, "slurm_scaling.sbatch")], check=True, capture_output=True,
                   env=dict(os.environ, **dict(env, SLURM_NTASKS="12"), RANKS="1 4 12", STRONG_BATCH="96"), timeout=60)
    steps = launches(log, "srun")
    assert [int(flag(w, "--ntasks")) for w in steps] == [1, 4, 12] * 2
    assert [int(flag(w, "--nodes")) for w in steps] == [1, 1, 3] * 2
    for bad in ("16", "0", "two"):
        proc = subprocess.run(["bash", os.path.join(JOBS, "slurm_scaling.sbatch")], capture_output=True, text=True,
                              env=dict(os.environ, **env, RANKS=f"1 {bad}"), timeout=60)
        assert proc.returncode == 2 and "RANKS" in proc.stderr
    # Outside an allocation: one clear line, nothing launched.
    proc = subprocess.run(["bash", os.path.join(JOBS, "slurm_scaling.sbatch")], capture_output=True, text=True,
                          env={k: v for k, v in dict(os.environ, **stubs).items() if not k.startswith("SLURM_")})
    assert proc.returncode != 0 and "sbatch" in proc.stderr


def test_pbs_scaling_maps_ranks_per_node_and_forwards_the_environment(tmp_path):
    stubs, log = stub_launchers(tmp_path, "mpirun", "python")
    nodefile = tmp_path / "nodes"
    nodefile.write_text("".join(f"n{i // 4}\n" for i in range(8)))  # 2 nodes x 4 mpiprocs
    env = dict(os.environ, **stubs, PBS_NODEFILE=str(nodefile), PBS_JOBID="7.pbs", OUT=str(tmp_path / "out"),
               OMP_NUM_THREADS="8", UCX_TLS="rc,cuda_copy", HPCKFAC_LOG_LEVEL="INFO")
    subprocess.run(["bash", os.path.join(JOBS, "pbs_scaling.pbs")], env=env, check=True, capture_output=True,
                   timeout=60)
    runs = launches(log, "mpirun")
    assert sorted(int(w[w.index("-np") + 1]) for w in runs) == [1, 1, 2, 2, 4, 4, 8, 8]
    for words in runs:
        p = int(words[words.index("-np") + 1])
        assert words[words.index("--map-by") + 1] == f"ppr:{min(p, 4)}:node:PE=8"
        forwarded = {words[i + 1] for i, w in enumerate(words) if w == "-x"}
        assert {"OMP_NUM_THREADS", "PATH", "UCX_TLS", "HPCKFAC_LOG_LEVEL"} <= forwarded
        mode, batch = words[words.index("--mode") + 1], int(words[words.index("--batch") + 1])
        assert batch == (128 if mode == "strong" else 32)
    log.unlink()
    subprocess.run(["bash", os.path.join(JOBS, "pbs_scaling.pbs")], env=dict(env, RANKS="2 8"), check=True,
                   capture_output=True, timeout=60)
    assert [int(w[w.index("-np") + 1]) for w in launches(log, "mpirun")] == [2, 8, 2, 8]
    proc = subprocess.run(["bash", os.path.join(JOBS, "pbs_scaling.pbs")], env=dict(env, RANKS="9"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "RANKS" in proc.stderr
    log.unlink()
    subprocess.run(["bash", os.path.join(JOBS, "pbs_scaling.pbs")], env=dict(env, MODES="weak"), check=True,
                   capture_output=True, timeout=60)
    assert not any("model" in w for w in launches(log, "python"))
    # The training template forwards the same variables (one launch, all 8 ranks, 4 per node).
    log.unlink()
    subprocess.run(["bash", os.path.join(JOBS, "pbs_train.pbs")], env=env, check=True, capture_output=True,
                   timeout=60)
    (words,) = launches(log, "mpirun")
    assert words[words.index("-np") + 1] == "8" and words[words.index("--map-by") + 1] == "ppr:4:node:PE=8"
    assert {"UCX_TLS", "HPCKFAC_LOG_LEVEL"} <= {words[i + 1] for i, w in enumerate(words) if w == "-x"}
    assert words[words.index("--batch-size") + 1] == str(32 * 8)


def test_pbs_select_lines_agree_with_the_launch():
    # A chunk's cores are its ranks x threads per rank, its GPUs one per rank; PBS sets
    # OMP_NUM_THREADS from ompthreads (default: all ncpus), which mpirun's PE= then binds.
    for name in ("pbs_train.pbs", "pbs_scaling.pbs"):
        text = open(os.path.join(JOBS, name)).read()
        select = dict(kv.split("=") for kv in re.search(r"^#PBS -l select=\d+:(\S+)", text, re.M)[1].split(":"))
        ranks, threads = int(select["mpiprocs"]), int(select["ompthreads"])
        assert int(select["ncpus"]) == ranks * threads and int(select["ngpus"]) == ranks
        assert f"RANKS_PER_NODE=${{RANKS_PER_NODE:-{ranks}}}" in text
        assert f"OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads}}}" in text


def run_gpu_validate(tmp_path, **env):
    out = tmp_path / "out"
    full = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), OUT=str(out), QUICK="1", **env)
    proc = subprocess.run(["bash", os.path.join(JOBS, "gpu_validate.sh")], capture_output=True, text=True,
                          env=full, timeout=120)
    return proc, out


def archived(out):
    import tarfile

    with tarfile.open(out / "gpu_validate.tar.gz") as archive:
        return {os.path.normpath(name) for name in archive.getnames()}


def test_gpu_validate_without_a_gpu_stops_at_once_with_its_logs(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so that a GPU node runs this test as well.
    proc, out = run_gpu_validate(tmp_path, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "FAIL     preflight" in proc.stdout and "sees no CUDA device" in proc.stdout
    assert sorted(os.listdir(out)) == ["gpu_validate.tar.gz", "preflight.log", "summary.txt"]
    assert {"summary.txt", "preflight.log"} <= archived(out)


def test_gpu_validate_keeps_to_its_budget_and_reports_skipped_steps(tmp_path):
    # A node whose GPU tests all skip (nothing validated) and whose first benchmark hangs.
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\nif [[ $1 == - || $1 == -c ]]; then cat > /dev/null; echo ok; exit 0; fi\n'
                    'if [[ " $* " == *" pytest "* ]]; then echo "5 skipped in 0.01s"; exit 0; fi\nexec sleep 1000\n')
    stub.chmod(0o755)
    start = time.monotonic()
    proc, out = run_gpu_validate(tmp_path, PYTHON=str(stub), MPIEXEC="no-such-mpiexec", BUDGET="22")
    assert time.monotonic() - start < 30
    assert proc.returncode == 1, proc.stdout + proc.stderr
    words = {line.split()[1]: line.split()[0] for line in proc.stdout.splitlines()
             if line.split() and line.split()[0] in ("OK", "FAIL", "SKIP", "TIMEOUT")}
    assert words["env"] == "OK" and words["tests-kernels"] == words["tests-factors"] == "FAIL"
    assert "no test passed: 5 skipped" in proc.stdout
    assert words["mpi2-collectives"] == words["train-cuda-2rank"] == "SKIP" and "no no-such-mpiexec" in proc.stdout
    assert words["bench-kernels"] == "TIMEOUT" and words["bench-step-profile"] == "SKIP"
    assert "BUDGET=22 s spent" in proc.stdout
    assert {"summary.txt", "bench-kernels.log", "tests-factors.log"} <= archived(out)


@pytest.mark.parametrize("name", ["slurm_scaling.sbatch", "pbs_scaling.pbs"])
def test_scaling_templates_refuse_a_strong_batch_that_does_not_split_before_any_run(tmp_path, name):
    stubs, log = stub_launchers(tmp_path, "srun", "mpirun", "python")
    nodefile = tmp_path / "nodes"
    nodefile.write_text("".join(f"n{i // 4}\n" for i in range(12)))
    env = dict(os.environ, **stubs, SLURM_NTASKS="12", SLURM_NTASKS_PER_NODE="4", SLURM_CPUS_PER_TASK="2",
               SLURM_JOB_ID="1", PBS_NODEFILE=str(nodefile), PBS_JOBID="1.pbs", OMP_NUM_THREADS="8",
               OUT=str(tmp_path / "out"), RANKS="1 2 4 8 12")
    proc = subprocess.run(["bash", os.path.join(JOBS, name)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "STRONG_BATCH: 128 does not split evenly over 12 ranks" in proc.stderr
    assert not log.exists()  # nothing launched
    subprocess.run(["bash", os.path.join(JOBS, name)], env=dict(env, MODES="weak"), check=True,
                   capture_output=True, timeout=60)  # the weak study's batch is per rank: any count
    subprocess.run(["bash", os.path.join(JOBS, name)], env=dict(env, STRONG_BATCH="96"), check=True,
                   capture_output=True, timeout=60)


@pytest.mark.parametrize("name", ["slurm_train.sbatch", "slurm_scaling.sbatch"])
def test_slurm_templates_run_without_cpus_per_task(tmp_path, name):
    # Without #SBATCH --cpus-per-task Slurm sets no SLURM_CPUS_PER_TASK: one core per rank, not an unbound variable.
    stubs, log = stub_launchers(tmp_path, "srun", "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(stubs, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_ID="3", OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", os.path.join(JOBS, name)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = launches(log, "srun")
    assert steps and all(flag(words, "--cpus-per-task") == "1" for words in steps)


@pytest.mark.parametrize("version, flags", [("mpiexec (Open MPI) 5.0.11", "--oversubscribe "),
                                            ("mpiexec (OpenRTE) 4.1.6", "--oversubscribe "),
                                            ("HYDRA build details:\n    Version: 5.0.2", "")])
@pytest.mark.parametrize("name", ["local_train.sh", "local_scaling.sh"])
def test_local_scripts_oversubscribe_under_open_mpi(tmp_path, name, version, flags):
    """Open MPI's mpiexec refuses 4 ranks on a 2-core machine unless told --oversubscribe;
    MPICH's runs them and needs no flag. MPIEXEC_FLAGS, when set, replaces the choice."""
    launcher = tmp_path / "mpiexec"
    launcher.write_text(f"#!/bin/sh\necho '{version}'\n")
    launcher.chmod(0o755)
    env = {"DRY_RUN": "1", "RANKS": "4", "MODES": "strong", "MPIEXEC": str(launcher)}
    lines = [l for l in run_script(name, env).splitlines() if l.startswith(f"+ {launcher} ")]
    assert lines and all(l.startswith(f"+ {launcher} {flags}-n 4 ") for l in lines), lines
    lines = [l for l in run_script(name, dict(env, MPIEXEC_FLAGS="--bind-to core")).splitlines()
             if l.startswith(f"+ {launcher} ")]
    assert lines and all(l.startswith(f"+ {launcher} --bind-to core -n 4 ") for l in lines), lines


@pytest.mark.parametrize("name", ["slurm_train.sbatch", "pbs_train.pbs"])
def test_training_templates_checkpoint_and_resume_a_stopped_run(tmp_path, name):
    """The training templates checkpoint on a schedule and resume from OUT once it holds
    checkpoints (a run stopped before the time limit, submitted again), not when its checkpoints
    folder holds only the temporary file of a run killed while writing its first one (hpckfac train
    --resume would refuse it: no checkpoint); Slurm signals the ranks before the limit with a
    signal hpckfac train stops on by default."""
    stubs, log = stub_launchers(tmp_path, "srun", "mpirun", "python")
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n0\nn0\n")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_"))}
    env.update(stubs, SLURM_NTASKS="2", SLURM_JOB_ID="3", PBS_NODEFILE=str(nodefile), OUT=str(out))
    launcher = "srun" if name.startswith("slurm") else "mpirun"
    for files, resumed in (([], False), ([".step_00000200.pt.x1y2.tmp"], False), (["step_00000200.pt"], True)):
        if files:
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            for file in files:
                (out / "checkpoints" / file).write_bytes(b"")
            log.unlink()
        proc = subprocess.run(["bash", os.path.join(JOBS, name)], env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        (words,) = launches(log, launcher)
        assert words[words.index("--checkpoint-every") + 1] == "200"
        assert ("--resume" in words) is resumed and (not resumed or words[words.index("--resume") + 1] == str(out))
    if name.startswith("slurm"):
        signal_line = re.search(r"^#SBATCH --signal=(\w+)@(\d+)", open(os.path.join(JOBS, name)).read(), re.M)
        from hpckfac.train.config import TrainConfig, stop_signals

        assert signal_line and stop_signals(signal_line[1]) and \
            set(stop_signals(signal_line[1])) <= set(stop_signals(TrainConfig().stop_signals))


@pytest.mark.parametrize("status, requeue, requeued", [(75, "1", True), (75, "0", False), (1, "1", False),
                                                       (0, "1", False)])
def test_slurm_training_template_requeues_a_stopped_run_when_asked(tmp_path, status, requeue, requeued):
    """Exit status 75 (stopped with a checkpoint) and REQUEUE=1: the job goes back in the queue;
    the template exits with the run's status either way."""
    stubs, log = stub_launchers(tmp_path, "srun", "python", "scontrol")
    (tmp_path / "bin" / "srun").write_text(f'#!/bin/sh\necho "srun $*" >> "{log}"\nexit {status}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(stubs, SLURM_NTASKS="2", SLURM_JOB_ID="77", OUT=str(tmp_path / "out"), REQUEUE=requeue)
    proc = subprocess.run(["bash", os.path.join(JOBS, "slurm_train.sbatch")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == status, proc.stderr
    assert launches(log, "scontrol") == ([["scontrol", "requeue", "77"]] if requeued else [])
