"""``python -m hpckfac.bench step`` end to end on a tiny ResNet: the table's configurations and
ratios in the JSON, and the profile report of every configuration."""
import json
import re

import pytest

from hpckfac.bench import step


def test_step_benchmark_writes_results_and_profiles(tmp_path, capsys):
    out, profile = tmp_path / "step.json", tmp_path / "profile.txt"
    argv = ["--steps", "3", "--warmup", "1", "--batch", "4", "--depth", "8", "--width", "4",
            "--configs", "sgd,kfac_1_10", "--json", str(out), "--profile", str(profile), "--profile-steps", "2"]
    assert step.main(argv) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"sgd", "kfac_1_10"}
    assert rows["sgd"]["median_vs_sgd"] == 1.0 and rows["kfac_1_10"]["median_ms"] > 0
    assert rows["kfac_1_10"]["local_factors_ms"] > 0 and "local_factors_ms" not in rows["sgd"]
    text = profile.read_text()
    sections = text.split("== ")[1:]
    assert [s.split()[0] for s in sections] == ["sgd", "kfac_1_10"]
    for section in sections:
        assert "torch.profiler, 2 steps" in section and "cProfile, 2 steps" in section
    # The K-FAC section names the preconditioner's own functions; no device table on the CPU.
    assert "preconditioner.py" in sections[1] and "device busy" not in text
    assert f"profiles: {profile}" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--threads", "100000"], "--threads must be in \\[0, "), (["--threads", "-1"], "--threads must be in"),
    (["--warmup", "-5"], "--warmup must be >= 0"), (["--steps", "0"], "--steps and --batch must be positive"),
])
def test_bad_arguments_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        step.parse(argv)
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
