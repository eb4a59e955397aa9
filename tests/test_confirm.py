"""search_then_confirm: the search's best found against a baseline on seeds the
search did not use, and the search options it rests on (start-up trials, GP, ASHA checks).

The end-to-end test runs the real runner (Ray Tune, Optuna, MLflow on sqlite) on huber_sweep
at toy size; the rest check the parts that decide: which trials become candidates, the
paired, Holm-adjusted verdict, and every new option refused before any work.
"""

from __future__ import annotations

import json
import math

import pytest
from mlflow.tracking import MlflowClient

from ayt.errors import ConfigError
from ayt.studies.engine.cli import study_main
from ayt.studies.protocols.search_then_confirm import BASELINE, choose_candidates, verdicts
from ayt.studies.engine.plan import plan_study
from ayt.studies.engine.sampler import optuna_sampler, search_notes, startup_trials
from ayt.studies.report.stats import holm
from ayt.studies.engine.trials import Trial

TINY = ["study.preset=smoke", "fid.num_samples=100", "progress=false", "study.budget.evals=2"]


def _trial(name: str, huber_c: float, final: float, *, stopped: bool = False, status: str = "FINISHED") -> Trial:
    return Trial(run_id=name, name=name, axes={"loss.huber_c": repr(huber_c), "seed": "0"}, batch_size=32,
                 status=status, stopped_early=stopped, curves={"eval/fid_1step": [(10, final + 50), (20, final)]})


def test_holm_adjusts_step_down_and_keeps_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])          # capped at 1
    adjusted = holm([0.2, math.nan, 0.001])
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.002)


def test_candidates_are_the_best_distinct_trials_that_ran_the_whole_budget(tmp_path):
    """Mutations caught: a trial ASHA stopped early (scored at a lower fidelity) or a failed
    one chosen; the same setting twice; ranking by the highest FID."""
    plan = plan_study("huber_sweep", [f"out_dir={tmp_path}", *TINY])
    trials = [_trial("a", 0.01, 30.0), _trial("stopped", 0.02, 10.0, stopped=True),
              _trial("failed", 0.03, 5.0, status="FAILED"), _trial("b", 0.04, 20.0), _trial("b-again", 0.04, 21.0),
              _trial("c", 0.05, 40.0), _trial("nan", 0.06, math.nan)]
    chosen = choose_candidates(trials, plan.space, plan.metric, 2)
    assert [(c.name, c.trial, c.settings) for c in chosen] == [("best1", "b", {"loss.huber_c": 0.04}),
                                                               ("best2", "a", {"loss.huber_c": 0.01})]
    assert chosen[0].search_final == 20.0
    assert len(choose_candidates(trials, plan.space, plan.metric, 10)) == 3       # as many as there are


def test_verdicts_are_paired_by_seed_and_holm_adjusted():
    base = {s: 50.0 + s for s in range(5)}
    better = {s: 50.0 + s - 5.0 + 0.1 * (-1) ** s for s in range(5)}       # 5 lower on every seed
    same = {s: 50.0 + s + (0.5 if s % 2 else -0.5) for s in range(5)}
    found = {v.candidate: v for v in verdicts({BASELINE: base, "best1": better, "best2": same})}
    assert found["best1"].words == "better than the baseline" and found["best1"].comparison.estimate < -4
    assert found["best1"].p_holm >= found["best1"].comparison.p                # adjusted, never below
    assert found["best2"].words.startswith("inconclusive: detects ±")        # its power, not "no difference"
    # The seeds are what pairs them: shifted seeds leave no pair.
    lone = verdicts({BASELINE: base, "best1": {s + 10: v for s, v in better.items()}})
    assert lone[0].words.startswith("no verdict")


@pytest.mark.parametrize("args, field", [
    (["study.protocol.confirm.k=9", "study.num_samples=8"], "study.protocol.confirm.k"),
    (["study.protocol.confirm.seeds=[0,1]"], "study.protocol.confirm.seeds"),
    (["study.protocol.confirm.seeds=[7]"], "study.protocol.confirm.seeds"),
    (["+study.protocol.confirm.baseline={loss.foo: 1}"], "study.protocol.confirm.baseline"),
    (["+study.protocol.confirm.baseline={loss.huber_c: abc}"], "study.protocol.confirm.baseline"),
    (["study.asha.grace_evals=2"], "study.asha.grace_evals"),             # TINY: 2 evaluations, no rung left
    (["study.num_samples=1", "study.protocol.confirm.k=1"], "study.asha.reduction_factor"),
    (["study.startup_trials=0"], "study.startup_trials"),
    (["study.search=bayes"], "study.search"),
])
def test_new_search_options_are_refused_before_any_work(tmp_path, capsys, args, field):
    with pytest.raises(ConfigError) as err:
        plan_study("huber_sweep", [f"out_dir={tmp_path}", *TINY, *args])
    assert str(err.value).startswith(field), str(err.value)
    assert study_main("huber_sweep", [f"out_dir={tmp_path}", *TINY, *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ayt: config error: {field}"), lines
    assert not (tmp_path / "huber_sweep").exists()                     # nothing ran, nothing written


def test_a_budget_within_the_start_up_is_announced_as_random_search(tmp_path):
    plan = plan_study("huber_sweep", [f"out_dir={tmp_path}", *TINY, "study.num_samples=12"])
    assert startup_trials(plan) == 12 and "this is a random search" in search_notes(plan)[0]
    plan = plan_study("huber_sweep", [f"out_dir={tmp_path}", *TINY, "study.num_samples=13"])
    assert search_notes(plan) == []
    plan = plan_study("huber_sweep", [f"out_dir={tmp_path}", *TINY, "study.startup_trials=null", "study.search=random",
                                      "study.num_samples=3", "study.protocol.name=single"])
    assert startup_trials(plan) is None and search_notes(plan) == []


def test_gp_is_a_search_option_with_its_start_up_from_the_config(tmp_path):
    import optuna
    plan = plan_study("huber_sweep", [f"out_dir={tmp_path}", *TINY, "study.search=gp", "study.startup_trials=5"])
    sampler = optuna_sampler(plan)
    assert isinstance(sampler, optuna.samplers.GPSampler) and startup_trials(plan) == 5


def test_the_committed_searches_are_sized_past_their_start_up(tmp_path):
    """What studies/huber_sweep and studies/aug_sweep ran: >= 48 trials, TPE past its start-up,
    ASHA, confirmation of 3 on 5 fresh seeds."""
    for name in ("huber_sweep", "aug_sweep"):
        plan = plan_study(name, [f"out_dir={tmp_path}"])
        study = plan.study
        assert plan.space.trial_count() >= 48 and search_notes(plan) == [] and study["scheduler"] == "asha"
        assert study["protocol"]["name"] == "search_then_confirm"
        confirm = study["protocol"]["confirm"]
        assert confirm["k"] == 3 and len(confirm["seeds"]) >= 5 and not set(confirm["seeds"]) & set(study["seeds"])


def test_search_then_confirm_reruns_the_best_and_the_baseline_on_fresh_seeds(ray_session, shared_out_dir, capsys,
                                                                             stand_in_metric):
    """The protocol end to end: a 3-trial random search on seed 0, then its best 2 and the
    default (huber_c = 0) on seeds 5 and 6, each a child run of the `-confirm` study; the
    confirm report compares them paired by seed; a resume adds nothing. The trials train for
    real; the driver ranks them by a stand-in FID the test sets ((huber_c - 0.01)², lowest
    nearest 0.01), so which trials are best does not rest on the numbers a machine trains to.
    Mutations caught: confirmation on the search's seed; the baseline missing or not at the
    defaults; best1 / best2 not the search's lowest / second-lowest final FID; the section or
    its link missing; a resume duplicating runs."""
    def stand_in(params) -> float:
        return (float(params["loss.huber_c"]) - 0.01) ** 2
    stand_in_metric(stand_in)
    out = shared_out_dir
    args = [f"out_dir={out}", "study.name=confirm-huber", "study.search=random", "study.startup_trials=null",
            "study.num_samples=3", "study.scheduler=none", "study.protocol.confirm.k=2",
            "study.protocol.confirm.seeds=[5,6]", "study.budget.amount=128", "study.max_concurrent_trials=1",
            "study.protocol.confirm.baseline_on_search_seeds=true", *TINY]
    assert study_main("huber_sweep", args) == 0
    printed = capsys.readouterr().out
    assert "ayt: stage 2:" in printed and "best1 = " in printed
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")

    def children(experiment: str):
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], max_results=100)
        return [r for r in runs if "mlflow.parentRunId" in r.data.tags], [r for r in runs if
                                                                          "mlflow.parentRunId" not in r.data.tags]
    searched, _ = children("confirm-huber")
    confirmed, parents = children("confirm-huber-confirm")
    assert len(searched) == 3 and {r.data.params["axis.seed"] if "axis.seed" in r.data.params else
                                   r.data.params["seed"] for r in searched} == {"0"}
    assert len(confirmed) == 6 and len(parents) == 1
    assert {r.data.params["axis.seed"] for r in confirmed} == {"5", "6"}
    by_candidate: dict[str, set[str]] = {}
    for run in confirmed:
        by_candidate.setdefault(run.data.params["axis.candidate"], set()).add(run.data.params["loss.huber_c"])
    assert set(by_candidate) == {BASELINE, "best1", "best2"}
    assert by_candidate[BASELINE] == {"0.0"}                                      # the config's default
    ranked = sorted(searched, key=lambda r: stand_in(r.data.params))
    for name, run in zip(("best1", "best2"), ranked):
        assert float(next(iter(by_candidate[name]))) == pytest.approx(float(run.data.params["loss.huber_c"]))
    assert all(len(values) == 1 for values in by_candidate.values())            # one setting per candidate
    record = json.loads((out / "confirm-huber-confirm" / "confirmation.json").read_text())
    assert record["search_seeds"] == [0] and record["seeds"] == [5, 6] and record["search_trials"] == 3
    # The baseline on the search's own seed, between the stages: the gap splits into seed and selection.
    on_search_seed, _ = children("confirm-huber-baseline")
    assert [(r.data.params["axis.seed"], r.data.params["loss.huber_c"]) for r in on_search_seed] == [("0", "0.0")]
    assert record["baseline_search_seeds"] == {"0": pytest.approx(stand_in({"loss.huber_c": "0.0"}))}
    report = (out / "confirm-huber-confirm" / "report.md").read_text()
    assert "## Confirmation: the best found against the baseline, on fresh seeds" in report
    assert "| best1 |" in report and "| best2 |" in report and "p (Holm)" in report
    assert "Split of that gap: the baseline itself scored" in report
    assert (out / "confirm-huber-confirm" / "confirm.png").stat().st_size > 0
    assert "../confirm-huber-confirm/report.md" in (out / "confirm-huber" / "report.md").read_text()
    # Resumed: both stages are found finished; nothing runs twice.
    assert study_main("huber_sweep", [*args, "resume=true"]) == 0
    assert len(children("confirm-huber")[0]) == 3 and len(children("confirm-huber-confirm")[0]) == 6
    assert len(children("confirm-huber-confirm")[1]) == 1 and len(children("confirm-huber-baseline")[0]) == 1
    # --report writes both stages' reports again from MLflow, training nothing.
    (out / "confirm-huber-confirm" / "report.md").unlink()
    assert study_main("huber_sweep", [*args, "--report"]) == 0
    assert "| best1 |" in (out / "confirm-huber-confirm" / "report.md").read_text()
    assert len(children("confirm-huber")[0]) == 3 and len(children("confirm-huber-confirm")[0]) == 6
    assert study_main("huber_sweep", [*args, "study.name=never-ran", "--report"]) == 2
