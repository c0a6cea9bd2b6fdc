"""The convergence study's bookkeeping (first reach, seed statistics, choice of the best
setting) and a miniature end-to-end run writing its table, JSON and plot."""
import json
import statistics

import pytest

from hpckfac.bench import convergence as conv

PNG = b"\x89PNG\r\n\x1a\n"


def _records(accs, step_s=0.5):
    return [{"step": 2 * (i + 1), "wall": step_s * 2 * (i + 1), "test_acc": a} for i, a in enumerate(accs)]


def test_first_reach_takes_the_first_evaluation_at_or_above_the_target():
    records = _records([0.90, 0.96, 0.94, 0.97, 0.99])
    assert conv.first_reach(records, 0.95) == (4, 2.0)
    assert conv.first_reach(records, 0.97) == (8, 4.0)
    assert conv.first_reach(records, 0.995) == (None, None)


def test_first_loss_below():
    records = [{"step": 2, "loss": 0.3}, {"step": 4, "loss": 0.05}, {"step": 6, "loss": 0.01}]
    assert conv.first_loss_below(records, 0.05) == 4 and conv.first_loss_below(records, 0.001) is None


def test_summary_statistics_over_seeds_count_runs_that_never_reach():
    runs = []
    for steps97, final in ((10, 0.98), (14, 0.975), (None, 0.96)):
        runs.append({"steps_95%": 6, "wall_95%": 3.0, "median_wall_95%": 2.5, "steps_97%": steps97,
                     "wall_97%": None if steps97 is None else steps97 / 2,
                     "median_wall_97%": None if steps97 is None else steps97 / 3,
                     "steps_loss": 5, "final_acc": final, "step_ms": 40.0})
    s = conv.summarise(runs)
    assert s["steps_97%"] == {"mean": 12.0, "std": 2.0, "reached": 2, "runs": 3}
    assert s["final_acc"]["mean"] == pytest.approx(statistics.fmean([0.98, 0.975, 0.96]))
    assert s["final_acc"]["std"] == pytest.approx(statistics.pstdev([0.98, 0.975, 0.96]))
    assert conv._cell(s["steps_97%"], ".1f") == "12.0 ± 2.0 (2/3)"
    assert conv._cell(conv._stats([None, None]), ".1f") == "never (0/2)"


def test_ratios_compare_means_over_every_seed_only():
    """K-FAC at 97% in 10 steps on one seed of two (the other never), SGD in 20 on both: the
    mean over the seed that got there would make K-FAC 2x faster; the ratio is not known."""
    def summary(steps):
        return conv.summarise([{"steps_95%": 4, "wall_95%": 1.0, "median_wall_95%": 1.0, "steps_97%": s,
                                "wall_97%": s and s / 10, "median_wall_97%": s and s / 10, "steps_loss": 8,
                                "final_acc": 0.97, "step_ms": 100.0} for s in steps])

    best = [{"method": m, "summary": summary([10, None] if m == "kfac" else [20, 20])} for m in conv.METHODS]
    ratios = conv._ratios(best)
    assert ratios["kfac/sgd"] == {"steps_97%": None, "wall_97%": None, "median_wall_97%": None, "steps_loss": 1.0}
    assert ratios["kfac-10/10/adam"]["steps_97%"] == 1.0
    # The other way round: SGD misses on a seed, so its mean would flatter it just as well.
    best = [{"method": m, "summary": summary([20, None] if m == "sgd" else [10, 10])} for m in conv.METHODS]
    ratios = conv._ratios(best)
    assert ratios["kfac/sgd"]["steps_97%"] is None and ratios["kfac/adam"]["steps_97%"] == pytest.approx(10 / 10)


def test_best_setting_prefers_fewest_steps_to_97_then_95_then_final_accuracy():
    a = {"steps_95%": 8, "steps_97%": 20, "final_acc": 0.98}
    b = {"steps_95%": 10, "steps_97%": 16, "final_acc": 0.975}
    c = {"steps_95%": 4, "steps_97%": None, "final_acc": 0.99}
    d = {"steps_95%": 6, "steps_97%": 16, "final_acc": 0.97}
    assert min([a, b, c, d], key=conv._rank_key) is d
    assert min([a, c], key=conv._rank_key) is a
    e = dict(d, final_acc=0.985)  # as fast as d to both targets, more accurate at the end
    assert min([d, e], key=conv._rank_key) is e and min([e, d], key=conv._rank_key) is e


def test_a_run_s_figures_come_from_its_records_and_step_times(monkeypatch):
    """A scripted training run: accuracy 0.90, 0.96, 0.95, 0.975 at steps 2, 4, 6, 8; steps of 10,
    30, 20 and 100 ms. The run reports the last and the best accuracy, the median step time, and
    per target the first step and seconds there and the steps times the median step."""
    from types import SimpleNamespace

    import hpckfac.train.loop as loop

    records = [dict(r, loss=loss) for r, loss in zip(_records([0.90, 0.96, 0.95, 0.975]), (0.5, 0.2, 0.045, 0.03))]
    monkeypatch.setattr(loop, "Trainer", lambda config, comm: SimpleNamespace(
        run=lambda: SimpleNamespace(records=records, step_seconds=[0.01, 0.03, 0.02, 0.1])))
    study = conv.Study(batch=8, steps=8, eval_every=2, warmup=0, lrs={}, dampings=())
    run = conv.run_one(None, "sgd", 8, 0.1, None, 0, study)
    assert (run["final_acc"], run["best_acc"], run["wall"]) == (0.975, 0.975, 4.0)
    assert run["step_ms"] == pytest.approx(25.0)  # the median of 10, 20, 30 and 100 ms
    assert (run["steps_95%"], run["wall_95%"], run["steps_97%"], run["wall_97%"]) == (4, 2.0, 8, 4.0)
    assert run["median_wall_95%"] == pytest.approx(4 * 0.025) and run["median_wall_97%"] == pytest.approx(8 * 0.025)
    assert run["steps_loss"] == 6  # the first training loss at or below 0.05
    records[-1]["test_acc"] = 0.93  # the best is no longer the last
    assert conv.run_one(None, "sgd", 8, 0.1, None, 0, study)["best_acc"] == 0.96


def test_miniature_study_writes_table_json_and_plot(tmp_path, monkeypatch, capsys):
    tiny = (conv.Study(batch=64, steps=3, eval_every=1, warmup=0,
                       lrs={"sgd": (0.1,), "adam": (3e-3,), "kfac": (0.05, 0.1)}, dampings=(1e-2,)),)
    monkeypatch.setattr(conv, "QUICK", tiny)
    # A signal ends the study as it ends any script, not one of its runs (then reported as complete).
    import hpckfac.train.loop as loop
    monkeypatch.setattr(loop, "StopOnSignal", lambda *args, **kwargs: pytest.fail("a run installed stop handlers"))
    assert conv.main(["--quick", "--seeds", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "steps→97%" in out and "kfac/sgd to 97%" in out
    result = json.load(open(tmp_path / "convergence.json"))
    assert result["benchmark"] == "convergence"
    best = result["results"]["best"]
    assert [b["method"] for b in best] == ["kfac", "kfac-10/10", "sgd", "adam"]
    assert all(len(b["runs"]) == 2 and [r["seed"] for r in b["runs"]] == [0, 1] for b in best)
    assert len(result["results"]["grid"]) == 6  # two learning rates for each K-FAC variant, one for SGD, Adam
    assert (tmp_path / "convergence.png").read_bytes()[:8] == PNG
