"""jobs/: every script parses; the local scripts print their mpiexec commands and
really run a tiny configuration at 1 and 2 ranks."""
import glob
import json
import os
import re
import subprocess
import sys


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
