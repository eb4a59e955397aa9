"""The "tune, then repeat" protocol without Ray: how its stages are planned and how stage 1's
choice is made; and what a paired comparison relies on (trials of one seed share their data
order, noise and t draws across losses)."""

from __future__ import annotations

import math

import pytest
import torch

from ayt.errors import ConfigError
from ayt.studies.protocol import choose, repeat_edit
from ayt.studies.runner import plan_study, study_main

TTR = ["study.protocol.name=tune_then_repeat"]
AXES = "+study.axes.batch_size=[8,32]"


def test_stage_one_tunes_lr_per_group_on_its_own_seeds_and_stage_two_uses_each_choice(tmp_path):
    plan = plan_study("speed", [f"out_dir={tmp_path}", *TTR, "study.protocol.tune.low=5e-4",
                                "study.protocol.tune.high=8e-3", "study.protocol.tune.points=5"])
    assert [p.study["protocol"]["group"] for p in plan.tune_plans] == ["loss=pseudo_huber", "loss=mfd"]
    for sub, loss in zip(plan.tune_plans, ("pseudo_huber", "mfd")):
        assert {c.loss.name for c in sub.trial_configs} == {loss}
        assert sorted(float(c.lr) for c in sub.trial_configs) == [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]
        assert {int(c.seed) for c in sub.trial_configs} == {1000}           # not the repeat seeds
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
])
def test_bad_protocol_settings_fail_before_any_work(tmp_path, capsys, override, field, words):
    args = [f"out_dir={tmp_path}", *TTR, override, "--cfg"]
    code = study_main("speed", args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and field in err and words in err, err
    assert not (tmp_path / "mlflow.db").exists()


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
