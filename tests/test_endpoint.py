"""A study's endpoint (ayt/studies/protocols/endpoint.py): how a trial's curve becomes its one score, fixed
in the config, checked before any work, and what Tune's scheduler and sampler rank by.

The variance test draws synthetic curves with a known seed level and known jitter between
evaluations and checks each endpoint's variance against σ_seed² + σ²·Σw² (so `final` is the
largest); a wrong weight (auc not divided by its span, last_k over k+1 points) fails it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ayt.metrics import FID_1STEP
from ayt.studies.engine import schema
from ayt.studies.protocols.endpoint import Endpoint, jitter_variance, score
from ayt.studies.engine.plan import plan_study
from ayt.studies.runner import study_main

ROOT = Path(__file__).resolve().parents[1]
FINAL, LAST3, AUC = Endpoint("final"), Endpoint("last_k", 3), Endpoint("auc")


def test_each_endpoint_is_its_definition_on_a_curve():
    xs = [1000.0, 2000.0, 4000.0, 8000.0]          # uneven spacing: the trapezoid weights differ
    ys = [90.0, 60.0, 50.0, 44.0]
    curve = list(zip(xs, ys))
    assert score(curve, FINAL) == 44.0
    assert score(curve, LAST3) == pytest.approx((60 + 50 + 44) / 3)
    assert score(curve, AUC) == pytest.approx(np.trapezoid(ys, xs) / (8000 - 1000))
    assert score(curve[::-1], AUC) == score(curve, AUC)                 # order of the points does not matter
    # a curve so far: fewer than k evaluations are all averaged, an auc of one evaluation is itself
    assert score(curve[:2], LAST3) == pytest.approx(75.0)
    assert score(curve[:1], AUC) == 90.0 and math.isnan(score([], FINAL))
    # iterations or images seen: proportional within a trial, the same score
    assert score([(x / 16, y) for x, y in curve], AUC) == pytest.approx(score(curve, AUC))
    assert LAST3.label == "last_3" and "last 3 evaluations" in LAST3.words


def test_last_k_and_auc_have_the_jitter_variance_the_formula_says_and_final_the_larger_one():
    rng = np.random.default_rng(0)
    xs = np.arange(1, 9) * 3200.0                   # 8 evenly spaced evaluations
    tau, sigma, reps = 2.0, 5.0, 20_000              # SD of a seed's own level; jitter between evaluations
    trend = 40 + 200 * np.exp(-xs / 4000)
    curves = trend + rng.normal(0, tau, (reps, 1)) + rng.normal(0, sigma, (reps, len(xs)))
    n = len(xs)
    expected = {"final": tau ** 2 + sigma ** 2, "last_3": tau ** 2 + sigma ** 2 / 3,
                "auc": tau ** 2 + sigma ** 2 * (n - 1.5) / (n - 1) ** 2}
    found = {}
    for endpoint in (FINAL, LAST3, AUC):
        scores = np.array([endpoint.score(list(zip(xs, c))) for c in curves])
        found[endpoint.label] = scores.var(ddof=1)
        formula = tau ** 2 + jitter_variance(endpoint, xs, sigma)
        assert formula == pytest.approx(expected[endpoint.label])
        # the variance of a sample variance of 20,000 normals: ~1% relative SE; 4% is > 3 SE
        assert found[endpoint.label] == pytest.approx(formula, rel=0.04), endpoint.label
    assert found["final"] > 1.5 * found["last_3"] and found["final"] > 1.5 * found["auc"]


def test_tune_ranks_by_the_endpoint(tmp_path):
    """Optuna's searcher and ASHA read the endpoint's key from every report (the metric itself at
    `final`, which keeps what earlier studies' searchers were built with)."""
    from ayt.studies.engine.tune_backend import _scheduler, optuna_searcher
    args = [f"out_dir={tmp_path}", "study.num_samples=4", "study.startup_trials=2"]
    plan = plan_study("huber_sweep", [*args, "study.endpoint=last_k", "study.endpoint_k=2"])
    assert plan.tune_metric == "score/fid_1step" and plan.metric == FID_1STEP
    assert optuna_searcher(plan).metric == plan.tune_metric == _scheduler(plan).metric
    assert plan.endpoint.reporter([plan.metric]).keys == ["score/fid_1step"]
    final = plan_study("huber_sweep", args)           # committed: pinned to final
    assert final.tune_metric == FID_1STEP == optuna_searcher(final).metric == _scheduler(final).metric


def test_every_report_carries_the_endpoint_of_the_curve_so_far(shared_out_dir, one_torch_thread):
    """The real training loop (smoke preset, 6 iterations, 3 evaluations) with a study's scores:
    each report that evaluated carries `score/fid_1step`, the last_2 of the curve so far."""
    from ayt.config import load_config
    from ayt.training.loop import WorkerContext, train_consistency
    from ayt.training.prepare import ensure_artifacts

    class Recording(WorkerContext):
        def __init__(self):
            super().__init__("cpu")
            self.reports = []

        def report(self, metrics, write_checkpoint=None):
            self.reports.append(dict(metrics))

    cfg = load_config(["experiment=smoke", "progress=false", f"out_dir={shared_out_dir}", "training.iterations=6",
                       "training.eval_every=2", "training.checkpoint_every=2", "fid.num_samples=50",
                       "name=endpoint-reports"])
    ctx = Recording()
    ctx.scores = Endpoint("last_k", 2).reporter([FID_1STEP])
    train_consistency(cfg, ensure_artifacts(cfg, progress=False), ctx, progress=False)
    evaluated = [r for r in ctx.reports if FID_1STEP in r]
    assert len(evaluated) == 3
    curve = []
    for r in evaluated:
        curve.append(r[FID_1STEP])
        assert r["score/fid_1step"] == pytest.approx(np.mean(curve[-2:]))


def _one_metric_pilot(path: Path) -> Path:
    """A finished study's report directory that evaluated fid_1step only."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "curves.csv").write_text("run,axis.loss,axis.seed,iteration,images_seen,fid_1step\n"
                                     "mfd-s0,mfd,0,100,1600,90.0\nmfd-s0,mfd,0,200,3200,80.0\n")
    return path


@pytest.mark.parametrize("overrides, field, words", [
    (["study.endpoint=median"], "study.endpoint", "allowed: final, last_k, auc"),
    (["study.endpoint=last_k", "study.endpoint_k=5"], "study.endpoint_k", "budget has 4"),
    (["study.endpoint=auc", "study.budget.evals=1", "study.budget.amount=320"], "study.endpoint", ">= 2 evaluations"),
    (["study.detect=ten"], "study.detect", "positive number"),
    (["study.detect=0%"], "study.detect", "positive number"),
    (["study.pilot=no/such/study"], "study.pilot", "does not exist"),
    (["study.pilot={pilot}", "study.metric=fid_2step"], "study.pilot", "measured fid_1step, not fid_2step"),
])
def test_bad_endpoint_plan_input_is_one_line_naming_the_field(tmp_path, capsys, overrides, field, words):
    pilot = _one_metric_pilot(tmp_path / "pilot")
    args = [f"out_dir={tmp_path}", *(o.format(pilot=pilot) for o in overrides)]
    assert study_main("batch_size_sweep", ["--cfg", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and words in err[0], err


COMMITTED = sorted(p.parent.name for p in (ROOT / "studies").glob("*/report.md")
                   if (ROOT / "conf" / "study" / f"{p.parent.name}.yaml").is_file())


def _study_block(name: str, *overrides: str) -> dict:
    from omegaconf import OmegaConf

    from ayt.config import compose_config
    return OmegaConf.to_container(compose_config([f"+study={name}", *overrides]).study, resolve=True)


@pytest.mark.parametrize("name", COMMITTED)
def test_a_committed_study_keeps_its_id_and_its_endpoint(name):
    """Each committed study scores at `final` as it ran, and none of the fields added since
    (endpoint, the confirmation's baseline on the search seeds) reaches what its id hashes;
    another endpoint is another study."""
    study = _study_block(name)
    assert study["endpoint"] == "final"
    added = {"endpoint", "endpoint_k", "pilot", "detect", "baseline_on_search_seeds"}
    identity = schema.identity(study)
    assert not added & set(identity) and not added & set(identity["protocol"].get("confirm") or {})
    assert schema.identity(_study_block(name, "study.endpoint=auc")) != identity


def test_a_new_study_defaults_to_last_3():
    """(docs/statistics.md says why.)"""
    from ayt.studies.protocols import endpoint
    study = _study_block("batch_size_sweep")
    assert endpoint.of(study) == Endpoint("last_k", 3)
    # a budget of fewer evaluations averages them all; a k set by hand above it is refused (above)
    assert endpoint.of(_study_block("batch_size_sweep", "study.budget.evals=2")) == Endpoint("last_k", 2)
    assert schema.identity(study) != schema.identity(_study_block("batch_size_sweep", "study.endpoint=final"))
    # endpoint_k means nothing at another endpoint: it stays out of the id there
    assert schema.identity(_study_block("batch_size_sweep", "study.endpoint=auc", "study.endpoint_k=2")) \
        == schema.identity(_study_block("batch_size_sweep", "study.endpoint=auc"))
