"""Seeds until decisive: a study whose first round is inconclusive adds seeds and
stops when its comparison is decisive or its seeds run out; every option is refused before
any work, naming the field. The rounds run through the real `run_in_rounds` on a real plan;
only the training is replaced by a synthetic FID per seed (no Ray), so what is tested is the
decision, the record and the report section. The real-Ray test trains for real and decides on
a stand-in FID, so the case it tests happens on every machine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ayt.errors import ConfigError
from ayt.studies.protocols import seed_rounds
from ayt.studies.engine.plan import plan_study
from ayt.studies.report.section import ReportContext
from ayt.studies.engine.trials import Trial

BASE = ["study.axes.batch_size=[16]", "study.axes.loss=[pseudo_huber,mfd]", "study.budget.amount=640",
        "study.preset=smoke"]


def _plan(tmp_path, *extra):
    return plan_study("batch_size_sweep", [f"out_dir={tmp_path}", *BASE, *extra])


def _synthetic(differences: list[float]):
    """A fit that 'trains' each round's trials: pseudo-Huber at 100 + seed, MFD at that plus
    `differences[seed]`; the trials so far are what `load` returns."""
    trials: list[Trial] = []
    rounds: list[tuple[str, list[int]]] = []

    def fit(plan):
        rounds.append((plan.study_id, list(plan.space.seeds)))
        for loss in ("pseudo_huber", "mfd"):
            for seed in plan.space.seeds:
                fid = 100 + seed + (differences[seed] if loss == "mfd" else 0)
                trials.append(Trial(run_id=f"{loss}{seed}", name=f"{loss}-s{seed}",
                                    axes={"batch_size": "16", "loss": loss, "seed": str(seed)}, batch_size=16,
                                    status="FINISHED", stopped_early=False,
                                    curves={"eval/fid_1step": [(20, fid + 50), (40, fid)]}))
        return [object()] * (2 * len(plan.space.seeds))
    return fit, (lambda: list(trials)), rounds


def test_the_schedule_adds_step_seeds_until_every_listed_seed_is_used():
    study = {"seed_rounds": {"first": 3, "step": 2}}
    assert seed_rounds.schedule(study, list(range(8))) == [(0, 1, 2), (3, 4), (5, 6), (7,)]


def test_an_inconclusive_first_round_adds_seeds_and_stops_once_decisive(tmp_path):
    """MFD is ~20 FID worse, noisily: at the rounds' level (99% over 5 looks) 3 and 5 seeds
    cannot tell, 7 can (paired p 0.004). Mutations caught: never adding a round, adding all rounds regardless, or
    reusing the study id (the round would restore round 0's experiment instead of running)."""
    plan = _plan(tmp_path, "study.seeds=[0,1,2,3,4,5,6,7,8,9]", "study.seed_rounds.first=3",
                 "study.seed_rounds.step=2")
    fit, load, rounds = _synthetic([30, -5, 25, 20, 28, 18, 24, 22, 19, 26])
    results = seed_rounds.run_in_rounds(plan, fit, load, plan.metric)
    assert [s for _, s in rounds] == [[0, 1, 2], [3, 4], [5, 6]]      # not capped: seeds 7-9 never ran
    assert rounds[0] == (plan.study_id, [0, 1, 2]) and rounds[1] == (f"{plan.study_id}-r1", [3, 4])
    assert len({sid for sid, _ in rounds}) == len(rounds)
    assert len(results) == 2 * sum(len(s) for _, s in rounds)
    record = json.loads((plan.out_dir / seed_rounds.ROUNDS_FILE).read_text())
    assert record["looks"] == 5 and record["level"] == pytest.approx(1 - 0.05 / 5)
    assert record["stopped"] == "every named comparison decisive"
    first, last = record["rounds"][0], record["rounds"][-1]
    assert first["open"] == ["batch_size=16, loss=mfd"] and last["open"] == []
    assert last["decisions"][0]["outcome"] == "worse" and last["decisions"][0]["seeds"] == len(record["seeds_used"])

    ctx = ReportContext(plan=plan, trials=load(), out=plan.out_dir)
    section = seed_rounds.SeedRoundsSection()
    assert section.applies(ctx)
    text = "\n".join(section.write(ctx).lines)
    assert "every named comparison decisive" in text and "Bonferroni" in text
    assert f"| batch_size=16, loss=mfd | {len(record['seeds_used'])} | worse |" in text


def test_no_difference_runs_to_the_cap_and_says_so(tmp_path):
    plan = _plan(tmp_path, "study.seeds=[0,1,2,3,4,5,6]", "study.seed_rounds.first=3", "study.seed_rounds.step=2")
    fit, load, rounds = _synthetic([10, -10, 8, -8, 5, -5, 1])
    seed_rounds.run_in_rounds(plan, fit, load, plan.metric)
    assert [s for _, s in rounds] == [[0, 1, 2], [3, 4], [5, 6]]
    record = json.loads((plan.out_dir / seed_rounds.ROUNDS_FILE).read_text())
    assert record["stopped"].startswith("seed cap reached (7 seeds listed)")
    assert record["rounds"][-1]["decisions"][0]["outcome"] == "inconclusive"


@pytest.mark.parametrize("extra, field, words", [
    (["study.seeds=[0,1,2]", "study.seed_rounds.first=3"], "study.seed_rounds.first", "leaves no round"),
    (["study.seeds=[0,1,2,3]", "study.seed_rounds.first=1"], "study.seed_rounds.first", ">= 2"),
    (["study.seeds=[0,1,2,3]", "study.seed_rounds.first=2", "study.seed_rounds.step=0"], "study.seed_rounds.step",
     ">= 1"),
    (["study.seeds=[0,1,2,3]", "study.seed_rounds.first=2", "study.target.reference=null"], "study.seed_rounds",
     "study.target.reference"),
    (["study.seeds=[0,1,2,3]", "study.seed_rounds.first=2", 'study.seed_rounds.compare=["loss=pseudo_huber"]'],
     "study.seed_rounds.compare", "the reference group itself"),
    (["study.seeds=[0,1,2,3]", "study.seed_rounds.first=2", 'study.seed_rounds.compare=["loss=nope"]'],
     "study.seed_rounds.compare", "not a value of that axis"),
])
def test_each_seed_rounds_option_is_refused_before_any_work(tmp_path, extra, field, words):
    with pytest.raises(ConfigError) as err:
        _plan(tmp_path, *extra)
    assert err.value.field == field and words in str(err.value)


def test_seed_rounds_leave_the_ids_of_studies_without_them_alone(tmp_path):
    assert _plan(tmp_path).study_id == _plan(tmp_path, "study.seed_rounds.step=2").study_id
    assert _plan(tmp_path, "study.seeds=[0,1,2]").study_id != \
        _plan(tmp_path, "study.seeds=[0,1,2]", "study.seed_rounds.first=2").study_id


def test_seed_rounds_on_real_ray_add_a_round_and_a_resume_reruns_nothing(ray_session, shared_out_dir,
                                                                          stand_in_metric):
    """Two losses on 3 seeds, first round 2, trained on the real Ray and logged to MLflow; the
    driver decides on a stand-in FID the test sets (pseudo-Huber 100 + seed, MFD that ± 5 by
    seed parity: a paired difference of +5, -5, +5, so open on any seeds, on every machine):
    round 1 adds seed 2 and the cap ends it. Then resume=true: every round is restored, no
    trial reruns, no MLflow run is added. Mutation caught: a round keyed by the study's own id
    (its Tune experiment restored instead of run: seed 2 never trains)."""
    from mlflow.tracking import MlflowClient

    from ayt.studies.runner import study_main
    stand_in_metric(lambda p: 100 + int(p["seed"]) + (0 if p["loss"] == "pseudo_huber" else
                                                      5 if int(p["seed"]) % 2 == 0 else -5))
    out = shared_out_dir
    args = [f"out_dir={out}", "study.name=rounds", "study.axes.batch_size=[16]", "study.axes.loss=[pseudo_huber,mfd]",
            "study.seeds=[0,1,2]", "study.seed_rounds.first=2", "study.seed_rounds.step=1", "study.budget.amount=320",
            "study.max_concurrent_trials=1", "study.preset=smoke", "fid.num_samples=100", "progress=false",
            "study.budget.evals=1"]
    assert study_main("batch_size_sweep", args) == 0
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("rounds").experiment_id

    def children():
        runs = client.search_runs([experiment], max_results=100)
        return {r.info.run_id: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    first = children()
    assert sorted((r.data.params["loss"], r.data.params["seed"]) for r in first.values()) == \
        [(loss, str(s)) for loss in ("mfd", "pseudo_huber") for s in (0, 1, 2)]
    assert all(r.info.status == "FINISHED" for r in first.values())
    record = json.loads((out / "rounds" / seed_rounds.ROUNDS_FILE).read_text())
    assert [r["seeds"] for r in record["rounds"]] == [[0, 1], [2]] and record["stopped"].startswith("seed cap")
    assert [(d["group"], d["estimate"], d["p"]) for d in record["rounds"][0]["decisions"]] == \
        [("batch_size=16, loss=mfd", 0.0, 1.0)]                               # decided on the stand-in
    assert "## Seed rounds" in (out / "rounds" / "report.md").read_text()

    assert study_main("batch_size_sweep", [*args, "resume=true"]) == 0
    again = children()
    assert set(again) == set(first)                                           # no run added
    assert {k: r.info.end_time for k, r in again.items()} == {k: r.info.end_time for k, r in first.items()}
