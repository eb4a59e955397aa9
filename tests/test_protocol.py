"""The "tune, then repeat" protocol: how its stages are planned, how stage 1's choice is made,
when an edge winner extends the range and whether the winner is told apart from the runner-up
(without Ray), one real run on the session's Ray where an edge winner extends the range and a
resume reruns nothing; and what a paired comparison relies on (trials of one seed share their
data order, noise and t draws across losses)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ayt.errors import ConfigError
from ayt.studies.protocols.tune_then_repeat import (TUNING_FILE, TuneStage, choose, edge_side, extension_values, next_extension,
                                                    repeat_edit, report_lines, separation, separation_words)
from ayt.studies.runner import plan_study, study_main
from ayt.studies.engine.schema import identity

TTR = ["study.protocol.name=tune_then_repeat", "study.protocol.tune.seeds=[1000,1001]"]
AXES = "+study.axes.batch_size=[8,32]"


def test_stage_one_tunes_lr_per_group_on_its_own_seeds_and_stage_two_uses_each_choice(tmp_path):
    plan = plan_study("speed", [f"out_dir={tmp_path}", *TTR, "study.protocol.tune.low=5e-4",
                                "study.protocol.tune.high=8e-3", "study.protocol.tune.points=5"])
    assert [p.study["protocol"]["group"] for p in plan.tune_plans] == ["loss=pseudo_huber", "loss=mfd"]
    for sub, loss in zip(plan.tune_plans, ("pseudo_huber", "mfd")):
        assert {c.loss.name for c in sub.trial_configs} == {loss}
        assert sorted(float(c.lr) for c in sub.trial_configs) == sorted([5e-4, 1e-3, 2e-3, 4e-3, 8e-3] * 2)
        assert {int(c.seed) for c in sub.trial_configs} == {1000, 1001}     # not the repeat seeds
        assert {int(c.training.iterations) for c in sub.trial_configs} == {1200}   # the study's own budget
        assert sub.base.tracking.experiment == "speed-tune" and not sub.tune_plans
    final = plan_study("speed", [f"out_dir={tmp_path}", *TTR],
                       repeat_edit({"loss=pseudo_huber": {"lr": 0.002}, "loss=mfd": {"lr": 0.008}}))
    lrs = {(c.loss.name, int(c.seed)): float(c.lr) for c in final.trial_configs}
    assert lrs == {("pseudo_huber", s): 0.002 for s in (0, 1, 2)} | {("mfd", s): 0.008 for s in (0, 1, 2)}
    assert final.study_id != plan.study_id and not final.tune_plans


@pytest.mark.parametrize("override, field, words", [
    ("study.protocol.name=bandit", "study.protocol.name", "allowed: single, tune_then_repeat"),
    ("+study.tuned.x={lr: 1e-3}", "study.tuned", "would skip that stage"),
    ("study.protocol.tune.seeds=[0]", "study.protocol.tune.seeds", "also repeat seeds"),
    ("study.protocol.tune.key=loss", "study.protocol.tune.key", "also a study axis"),
    ("study.protocol.tune.low=-1", "study.protocol.tune.low", "low > 0"),
    ("study.protocol.tune.search=bayes", "study.protocol.tune.search", "allowed: grid, tpe, random"),
    ("study.protocol.tune.seeds=[1000]", "study.protocol.tune.seeds", "needs >= 2 tuning seeds"),
    ("study.protocol.tune.seeds=[1000,1000]", "study.protocol.tune.seeds", "repeats a seed"),
    ("study.protocol.tune.max_extensions=-1", "study.protocol.tune.max_extensions", ">= 0"),
    ("study.protocol.tune.max_extensions=two", "study.protocol.tune.max_extensions", "two"),
    ("study.protocol.tune.floor=1e-3", "study.protocol.tune.floor", "must be <= low (0.0003)"),
    ("study.protocol.tune.floor=0", "study.protocol.tune.floor", "> 0 (a log range)"),
    ("study.protocol.tune.ceiling=1e-3", "study.protocol.tune.ceiling", "must be >= high (0.01)"),
    ("study.protocol.tune.allow_one_seed=maybe", "study.protocol.tune.allow_one_seed", "maybe"),
])
def test_bad_protocol_settings_fail_before_any_work(tmp_path, capsys, override, field, words):
    args = [f"out_dir={tmp_path}", *TTR, override, "--cfg"]
    code = study_main("speed", args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and field in err and words in err, err
    assert not (tmp_path / "mlflow.db").exists()


def test_one_tuning_seed_runs_only_when_asked_and_new_fields_keep_committed_ids(tmp_path):
    """A single tuning seed is refused (above) unless `allow_one_seed`; the new tune fields at
    their defaults leave a study's id as it was. Mutations caught: the override ignored; a new
    field counted in the id while at its default (every committed study would change id)."""
    one = [f"out_dir={tmp_path}", "study.protocol.name=tune_then_repeat", "study.protocol.tune.seeds=[1000]"]
    plan = plan_study("speed", [*one, "study.protocol.tune.allow_one_seed=true"])
    assert {int(c.seed) for sub in plan.tune_plans for c in sub.trial_configs} == {1000}
    plain = plan_study("speed", [f"out_dir={tmp_path}"])
    assert set(plain.study["protocol"]["tune"]) >= {"max_extensions", "allow_one_seed", "floor", "ceiling"}
    assert set(identity(plain.study)["protocol"]["tune"]) == {"key", "low", "high", "log", "search", "points",
                                                              "trials", "seeds"}      # the block before the tuning fields were added
    assert plan_study("speed", [f"out_dir={tmp_path}", "study.protocol.tune.max_extensions=1"]).study_id \
        != plain.study_id
    # The protocol alone runs on its default tuning seeds; a study that does not tune hashes them
    # as the old default, so its id is what it was.
    tuned = plan_study("speed", [f"out_dir={tmp_path}", "study.protocol.name=tune_then_repeat"])
    assert {int(c.seed) for sub in tuned.tune_plans for c in sub.trial_configs} == {1000, 1001}
    assert plain.study["protocol"]["tune"]["seeds"] == [1000, 1001]
    assert identity(plain.study)["protocol"]["tune"]["seeds"] == [1000]
    assert identity(tuned.study)["protocol"]["tune"]["seeds"] == [1000, 1001]


SPEED_TUNED = TuneStage(key="lr", low=2.5e-4, high=4e-3, log=True, search="grid", points=5, trials=6,
                        seeds=(1000, 1001), max_extensions=2)


def test_an_edge_winner_extends_the_range_one_grid_step_until_interior_or_the_cap():
    """speed_tuned's MFD won at 2.5e-4, the lowest value tried: the next round tries 1.25e-4 (the
    grid's own ratio, 2), then 6.25e-5, then stops at the cap; a winner that is interior stops
    it; the high edge steps up; a linear grid steps by its step, never past `floor`; a sampled
    stage or max_extensions=0 only flags. Mutations caught: stepping from the wrong edge, a
    ratio other than the grid's, no cap, the floor ignored, extending an interior winner."""
    grid = SPEED_TUNED.grid_values()
    assert grid == [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3]
    assert edge_side(grid, 2.5e-4) == "low" and edge_side(grid, 4e-3) == "high" and edge_side(grid, 1e-3) is None
    assert next_extension(SPEED_TUNED, 2.5e-4, grid) == (1.25e-4, "")
    assert next_extension(SPEED_TUNED, 1.25e-4, [1.25e-4, *grid]) == (6.25e-5, "")
    assert next_extension(SPEED_TUNED, 6.25e-5, [6.25e-5, 1.25e-4, *grid]) == (None, "cap")
    assert next_extension(SPEED_TUNED, 2.5e-4, [1.25e-4, *grid]) == (None, "interior")
    assert next_extension(SPEED_TUNED, 4e-3, grid) == (8e-3, "")
    assert extension_values(SPEED_TUNED) == [1.25e-4, 6.25e-5, 8e-3, 1.6e-2]
    linear = TuneStage(key="augment.p", low=0.2, high=0.6, log=False, search="grid", points=3, trials=1,
                       seeds=(1, 2), max_extensions=3, floor=0.05)
    assert next_extension(TuneStage(**{**linear.__dict__, "floor": None}), 0.2, [0.2, 0.4, 0.6]) == (0.0, "")
    assert next_extension(linear, 0.6, [0.2, 0.4, 0.6]) == (0.8, "")
    assert next_extension(linear, 0.2, [0.2, 0.4, 0.6]) == (None, "floor")          # 0.0 is below 0.05
    assert extension_values(linear) == [0.8, 1.0, 1.2]
    sampled = TuneStage(key="lr", low=1e-4, high=1e-2, log=True, search="tpe", points=4, trials=6, seeds=(1, 2),
                        max_extensions=2)
    assert next_extension(sampled, 1e-4, [1e-4, 1e-3]) == (None, "grid only")
    capped = TuneStage(**{**SPEED_TUNED.__dict__, "max_extensions": 0})
    assert next_extension(capped, 2.5e-4, grid) == (None, "cap") and extension_values(capped) == []


def test_the_winner_is_separated_from_the_runner_up_only_when_its_paired_interval_excludes_zero():
    """Two seeds 4 and 2 apart (speed_tuned's pseudo-Huber: 122 vs 125) are not separated; three
    seeds consistently 10-12 apart are; one seed cannot be tested. Mutations caught: the
    runner-up taken as the worst value, unpaired or reversed differences, 'separated' on a
    non-significant interval."""
    close = {1e-3: {"1000": 120.0, "1001": 124.0}, 2e-3: {"1000": 124.0, "1001": 126.0},
             5e-4: {"1000": 131.0, "1001": 133.0}, 4e-3: {"1000": 275.0, "1001": 290.0}}
    sep = separation(close, 1e-3)
    assert (sep["winner"], sep["runner_up"], sep["estimate"], sep["n"]) == (1e-3, 2e-3, -3.0, 2)
    assert not sep["separated"]
    assert separation_words(sep) == ("not separated (difference -3 [-15.7, +9.71] FID, winner − runner-up paired "
                                     "by tuning seed, n=2)")
    apart = {1e-3: {"1": 100.0, "2": 101.0, "3": 102.0}, 2e-3: {"1": 110.0, "2": 112.0, "3": 114.0},
             4e-3: {"1": 300.0, "2": 300.0, "3": 300.0}}
    sep = separation(apart, 1e-3)
    assert sep["runner_up"] == 2e-3 and sep["separated"]
    assert separation_words(sep).startswith("separated (difference -11 [")
    assert separation_words(separation({1e-3: {"1": 100.0}, 2e-3: {"1": 110.0}}, 1e-3)).startswith("not testable")
    assert separation({1e-3: {"1": 100.0, "2": 90.0}}, 1e-3) is None


def test_protocol_section_says_how_the_range_was_extended_and_whether_the_winner_is_separated(tmp_path):
    """The record run_tune_then_repeat writes, in the report's words. Mutations caught: an
    extension left out of the section, 'now interior' for a winner still at the edge, the cap
    not named, the separation line missing."""
    record = {"key": "lr", "low": 2.5e-4, "high": 4e-3, "log": True, "search": "grid", "seeds": [1000, 1001],
              "metric": "fid_1step", "max_extensions": 2, "floor": None, "ceiling": None, "groups": {
                  "loss=mfd": {"chosen": 2.5e-4, "means": {"0.000125": 300.0, "0.00025": 190.0, "0.0005": 480.0},
                               "extensions": [{"round": 1, "value": 1.25e-4, "side": "low"}], "stop": "interior",
                               "separation": {"winner": 2.5e-4, "runner_up": 1.25e-4, "estimate": -110.0,
                                              "low": -130.0, "high": -90.0, "n": 2, "separated": True}},
                  "loss=pseudo_huber": {"chosen": 1.6e-2, "means": {"0.004": 150.0, "0.008": 130.0, "0.016": 120.0},
                                        "extensions": [{"round": 1, "value": 8e-3, "side": "high"},
                                                       {"round": 2, "value": 1.6e-2, "side": "high"}],
                                        "stop": "cap", "separation": {"winner": 1.6e-2, "runner_up": 8e-3,
                                                                      "estimate": -10.0, "low": -50.0, "high": 30.0,
                                                                      "n": 2, "separated": False}}}}
    (tmp_path / TUNING_FILE).write_text(json.dumps(record))
    study = {"tuned": {"loss=mfd": {"lr": 2.5e-4}, "loss=pseudo_huber": {"lr": 1.6e-2}}}
    text = "\n".join(report_lines(study, tmp_path))
    assert "- loss=mfd: range extended below 0.00025 to 0.000125 (1 round): winner 0.00025 now interior." in text
    assert ("- loss=pseudo_huber: range extended above 0.004 to 0.016 (2 rounds): still at the edge after 2 "
            "extensions (cap, `study.protocol.tune.max_extensions`=2).") in text
    assert "- loss=mfd: winner 0.00025 vs runner-up 0.000125: separated (difference -110 [-130, -90] FID" in text
    assert "- loss=pseudo_huber: winner 0.016 vs runner-up 0.008: not separated (difference -10 [-50, +30]" in text
    assert "| loss=mfd | 0.00025 |" in text and "| loss=pseudo_huber | 0.016 (edge) |" in text
    assert "At the edge of the searched range for loss=pseudo_huber: the best value may lie outside [0.000125, " \
           "0.016]" in text and "up to 2 round(s)" in text


def test_hand_set_tuned_values_apply_to_every_trial_of_a_partial_group(tmp_path):
    """`study.tuned` labelled over some axes (each loss's lr from an earlier tuning) reaches every
    trial of that loss at every batch size, scaled by lr_scaling in the run; study identity
    changes with it, not with its source note. Mutations caught: exact-label matching only
    (no trial would get its lr), a label applied to the other loss, `tuned_source` in the hash."""
    tuned = repeat_edit({"loss=pseudo_huber": {"lr": 1e-3}, "loss=mfd": {"lr": 2.5e-4}})
    args = [f"out_dir={tmp_path}", AXES, 'study.fixed=["lr_scaling=sqrt","lr_ref_batch=16"]']
    plan = plan_study("speed", args, tuned)
    lrs = {(c.loss.name, int(c.batch_size)): float(c.lr) for c in plan.trial_configs}
    assert lrs == {("pseudo_huber", 8): 1e-3, ("pseudo_huber", 32): 1e-3, ("mfd", 8): 2.5e-4, ("mfd", 32): 2.5e-4}
    assert {c.lr_scaling for c in plan.trial_configs} == {"sqrt"}
    assert plan.study_id != plan_study("speed", args).study_id
    assert plan.study_id == plan_study("speed", [*args, "study.tuned_source=elsewhere"], tuned).study_id


@pytest.mark.parametrize("tuned, words", [
    ({"optimizer=adam": {"lr": 1e-3}}, "not <axis>=<value> with an axis of this study"),
    ({"loss=l2": {"lr": 1e-3}}, "not a value of that axis; allowed: pseudo_huber, mfd"),
    ({"loss=mfd": {}}, "must map config keys to values"),
    ({"loss=mfd": {"lr": 1e-3}, "batch_size=8": {"lr": 2e-3}}, "both set lr for the same trials"),
])
def test_bad_tuned_values_fail_before_any_work(tmp_path, tuned, words):
    """A study yaml's `tuned:` block (Hydra's command line cannot spell its `loss=mfd` keys)."""
    with pytest.raises(ConfigError) as err:
        plan_study("speed", [f"out_dir={tmp_path}", AXES], repeat_edit(tuned))
    assert err.value.field == "study.tuned" and words in str(err.value), str(err.value)
    assert not (tmp_path / "mlflow.db").exists()


def test_stage_one_choice_is_the_lowest_mean_and_ignores_failed_trials():
    best, means = choose({1e-3: [100.0, 120.0], 4e-3: [90.0, float("nan")], 1.6e-2: [None, float("nan")]})
    assert best == 4e-3 and means[1e-3] == 110.0 and math.isnan(means[1.6e-2])
    assert choose({1e-3: [float("nan")]})[0] is None


def test_trials_of_one_seed_share_data_order_noise_and_t_across_losses(tmp_path):
    """Paired statistics compare seed s of one loss with seed s of another: that is fair only
    if both saw the same images in the same order with the same noise and the same t."""
    from torch.utils.data import DataLoader, DistributedSampler

    from ayt.config import load_config
    from ayt.data import load_dataset
    from ayt.method.schedule import ConsistencySchedule, PairNoise

    def draws(loss: str, seed: int):
        cfg = load_config(["experiment=smoke", f"loss={loss}", f"seed={seed}", f"out_dir={tmp_path}"])
        data = load_dataset(cfg.dataset, train=True)
        sampler = DistributedSampler(data.as_torch_dataset(), num_replicas=1, rank=0, shuffle=True,
                                     seed=int(cfg.seed), drop_last=True)
        x, _ = next(iter(DataLoader(sampler.dataset, batch_size=int(cfg.batch_size), sampler=sampler)))
        n, eps = PairNoise(int(cfg.seed), torch.device("cpu")).draw(3, int(cfg.batch_size), tuple(x.shape[1:]))
        pair = ConsistencySchedule.from_config(cfg.schedule, cfg.edm).pair(x, n, eps, 3)
        return x, pair.t, pair.r, eps

    a, b, other = draws("pseudo_huber", 4), draws("mfd", 4), draws("mfd", 5)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], other[0]) and not torch.equal(a[1], other[1])


TINY = ["study.preset=smoke", "fid.num_samples=100", "progress=false", "study.budget.evals=2"]


def test_an_edge_winner_extends_the_range_and_a_resume_reruns_no_round(ray_session, shared_out_dir,
                                                                       stand_in_metric):
    """End to end on the session's Ray: one group, a 2-point grid [1e-4, 1e-3] on two tuning
    seeds, trained for real; the driver decides on a stand-in FID the test sets (lower at lower
    lr, by 10 per decade, 2% more on seed 8). So on every machine 1e-4 wins at the low edge,
    one extension round runs one grid step (x10) below it, 1e-5, on the same seeds, wins and
    stops at the cap, separated from 1e-4 (-10 and -10.2: -10.1 paired); the record and the
    report say so, stage 2 runs at 1e-5; a resume restores every round and adds no MLflow run.
    Mutations caught: no extension round; a step from the other edge or by another ratio; the
    extension's trials left out of the choice; a resume that reruns a round or duplicates its runs."""
    from mlflow.tracking import MlflowClient

    stand_in_metric(lambda p: 100 + 10 * round(math.log10(float(p["lr"]) / 1e-4)) * (1 + 0.02 * (int(p["seed"]) - 7)))
    out = shared_out_dir
    args = [f"out_dir={out}", "study.name=ttr_ext", "study.protocol.name=tune_then_repeat",
            "study.axes.loss=[pseudo_huber]", "study.seeds=[0]", "study.protocol.tune.low=1e-4",
            "study.protocol.tune.high=1e-3", "study.protocol.tune.points=2", "study.protocol.tune.seeds=[7,8]",
            "study.protocol.tune.max_extensions=1", "study.budget.amount=40", "study.max_concurrent_trials=1", *TINY]
    assert study_main("speed", args) == 0
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")

    def runs(experiment: str) -> tuple[list, list]:
        found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=500)
        return ([r for r in found if "mlflow.parentRunId" not in r.data.tags],
                [r for r in found if "mlflow.parentRunId" in r.data.tags])

    parents, tuning = runs("ttr_ext-tune")
    assert sorted(p.info.run_name.rsplit("-", 1)[0] for p in parents) == ["ttr_ext-tune-loss-pseudo_huber",
                                                                         "ttr_ext-tune-loss-pseudo_huber-ext1"]
    assert sorted((float(r.data.params["lr"]), r.data.params["seed"]) for r in tuning) == \
        [(lr, seed) for lr in (1e-5, 1e-4, 1e-3) for seed in ("7", "8")]
    record = json.loads((out / "ttr_ext" / TUNING_FILE).read_text())["groups"]["loss=pseudo_huber"]
    assert [r["value"] for r in record["extensions"]] == [1e-5] and record["chosen"] == 1e-5
    assert record["stop"] == "cap" and set(record["per_seed"]) == {"1e-05", "0.0001", "0.001"}
    sep = record["separation"]
    assert (sep["winner"], sep["runner_up"], sep["n"], sep["separated"]) == (1e-5, 1e-4, 2, True)
    assert sep["estimate"] == pytest.approx(-10.1)
    text = (out / "ttr_ext" / "report.md").read_text()
    assert "- loss=pseudo_huber: range extended below 0.0001 to 1e-05 (1 round): still at the edge after " \
           "1 extension (cap" in text, text
    assert "- loss=pseudo_huber: winner 1e-05 vs runner-up 0.0001: separated (difference -10.1 [" in text, text
    _, repeat = runs("ttr_ext")
    assert [(r.data.params["seed"], float(r.data.params["lr"])) for r in repeat] == [("0", 1e-5)]

    before = sorted(r.info.run_id for r in tuning + repeat)
    assert study_main("speed", [*args, "resume=true"]) == 0
    parents_again, tuning_again = runs("ttr_ext-tune")
    assert len(parents_again) == 2 and sorted(r.info.run_id for r in tuning_again + runs("ttr_ext")[1]) == before
