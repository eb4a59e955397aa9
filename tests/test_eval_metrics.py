"""Evaluation: registered metrics, one pass per probe, and every ranking following a metric's
declared direction (ayt/eval/metrics.py, ayt/eval/probe.py). No Ray here (the sharded probe:
tests/test_eval_sharded.py).

Mutations caught: the 2-step sampler started from scratch again (3N network passes, not 2N);
Fréchet statistics from a biased covariance or a mean over the wrong axis (FID no longer
torch-fidelity's); KID or precision/recall fed features in another order or of another sampler;
`Comparison.outcome` back to "negative is better" for every metric (the higher-precision group
would read "worse"); Tune's `mode="min"` written back into tune_backend (the constructed
higher-is-better study would minimise).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ayt.config import load_config
from ayt.data import load_dataset
from ayt.errors import ConfigError
from ayt.eval import metrics as registry
from ayt.eval.classifier import DigitClassifier, save_classifier
from ayt.eval.metrics import MAX, MIN, Metric, Quantity, register_metric
from ayt.networks.precond import build_denoiser

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 24          # samples per sampler: small, and not a multiple of the batches below


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny config on the embedded digits, a random classifier as the extractor, a random denoiser."""
    out = tmp_path_factory.mktemp("eval")
    cfg = load_config([f"out_dir={out}", "experiment=smoke", f"fid.num_samples={N}", "fid.batch_size=10",
                       "eval.feature_batch_size=7", "eval.metrics=[fid,kid,prc]", "eval.kid.subsets=5"])
    data = load_dataset(cfg.dataset, train=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weights = str(out / "classifier.pt")
        save_classifier(DigitClassifier(data.channels, data.resolution, data.num_classes, width=8), weights)
        net = build_denoiser(cfg.network, cfg.edm, data.resolution, data.channels).eval()
    return SimpleNamespace(cfg=cfg, data=data, weights=weights, net=net, cache=str(out / "cache"))


class Counting(nn.Module):
    """Counts the images the wrapped denoiser is run on."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.images = net, 0

    def forward(self, x, sigma):
        self.images += x.shape[0]
        return self.net(x, sigma)


def test_one_evaluation_runs_the_network_twice_per_sample(setup):
    from ayt.eval.probe import EvalProbe
    probe = EvalProbe(setup.cfg, setup.weights, setup.cache, setup.data, "cpu")
    counting = Counting(setup.net)
    values = probe(counting)
    assert counting.images == 2 * N                 # 1-step: N; 2-step continues from it: N more
    assert set(values) == {f"eval/{q}_{k}step" for q in ("fid", "kid", "precision", "recall") for k in (1, 2)}
    assert set(probe.timings) == {"generation", "extraction", "statistics"}
    assert probe.last[1].shape[0] == min(N, 64) and probe.last[2].shape == probe.last[1].shape


def test_probe_metrics_are_torch_fidelitys_on_the_same_images(setup):
    """FID, KID and precision/recall of the probe's samples equal torch-fidelity's own
    `calculate_metrics` on those images against the same reference and extractor."""
    from torch_fidelity import calculate_metrics

    from ayt.eval.fid import UInt8ImageDataset
    from ayt.eval.probe import EvalProbe
    probe = EvalProbe(setup.cfg, setup.weights, setup.cache, setup.data, "cpu")
    values = probe(setup.net)
    reference, _ = probe.references["classifier"]
    for k in (1, 2):
        images = probe.generate(setup.net)[k]
        expected = calculate_metrics(
            input1=UInt8ImageDataset(images), input2=reference._reference_dataset(),
            input2_cache_name=reference.images_cache_name, cache_root=setup.cache, fid=True, kid=True, prc=True,
            feature_extractor=reference.feature_extractor, feature_extractor_weights_path=setup.weights,
            cuda=False, save_cpu_ram=True, verbose=False, kid_subsets=5, kid_subset_size=N, batch_size=64)
        assert values[f"eval/fid_{k}step"] == pytest.approx(expected["frechet_inception_distance"], rel=1e-5)
        assert values[f"eval/kid_{k}step"] == pytest.approx(expected["kernel_inception_distance_mean"], rel=1e-4)
        assert values[f"eval/precision_{k}step"] == pytest.approx(expected["precision"], abs=1e-12)
        assert values[f"eval/recall_{k}step"] == pytest.approx(expected["recall"], abs=1e-12)
    assert values["eval/fid_1step"] != values["eval/fid_2step"]        # each sampler's own images


def test_fd_dinov2_from_a_local_stand_in(setup, tmp_path):
    """The DINOv2 extractor loads release-shaped weights (a small random stand-in), resizes its
    position grid to 224 / 14 = 16 patches a side, and FD_DINOv2 is a Fréchet distance of its
    features (0 against itself)."""
    from ayt.eval.dinov2 import load_dinov2, write_random_dinov2_weights
    from ayt.eval.metrics import frechet_distance
    from ayt.eval.probe import EvalProbe
    path = write_random_dinov2_weights(tmp_path / "dinov2.pth", grid=4)
    vit = load_dinov2(path)
    assert len(vit.blocks) == 2 and vit.position(17, 224).shape == (1, 16 * 16 + 1, 64)
    cfg = load_config([f"out_dir={tmp_path}", "experiment=smoke", f"fid.num_samples={N}", "fid.batch_size=12",
                       "eval.metrics=[fid,fd_dinov2]", f"eval.dinov2_weights={path}"])
    probe = EvalProbe(cfg, setup.weights, str(tmp_path / "cache"), setup.data, "cpu")
    values = probe(setup.net)
    assert math.isfinite(values["eval/fd_dinov2_1step"]) and values["eval/fd_dinov2_1step"] > 0
    rows = probe.features(probe.networks["dinov2"], probe.generate(setup.net)[1])
    same = probe.feature_set(rows, gather=False)
    assert rows.shape == (N, 64) and frechet_distance(same, same) == pytest.approx(0.0, abs=1e-6)
    torch.save({"weight": torch.zeros(1)}, tmp_path / "not_dino.pt")
    with pytest.raises(ConfigError) as err:
        load_dinov2(tmp_path / "not_dino.pt")
    assert err.value.field == "eval.dinov2_weights"


@pytest.mark.parametrize("override, field", [
    ("eval.metrics=[fid,density]", "eval.metrics"),
    ("eval.metrics=[fd_dinov2]", "eval.dinov2_weights"),
    ("eval.metrics=[fid,fd_dinov2]", "eval.dinov2_weights"),
])
def test_bad_metric_config_is_one_line_naming_the_field_before_any_work(tmp_path, capsys, override, field):
    from ayt.train import main
    assert main([f"out_dir={tmp_path}", "experiment=smoke", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]
    assert not (tmp_path / "cache").exists()                 # nothing was built
    # weights that only an unevaluated metric would read are not looked at
    load_config([f"out_dir={tmp_path}", "eval.dinov2_weights=/nonexistent/dinov2.pth"])


def test_study_metric_must_be_evaluated(tmp_path, capsys):
    from ayt.studies.engine.cli import study_main
    assert study_main("speed", [f"out_dir={tmp_path}", "study.metric=recall_2step"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "study.metric" in err[0] and "prc" in err[0]


# ---- direction -------------------------------------------------------------------------------

class Sharpness(Metric):
    """A stand-in higher-is-better metric (registered only inside the test that needs it)."""

    name = "sharpness"
    quantities = (Quantity("sharpness", MAX, "sharpness"),)

    def compute(self, generated, reference):
        return {"sharpness": float(generated.n)}


@pytest.fixture
def sharpness(monkeypatch):
    monkeypatch.setitem(registry.METRICS, Sharpness.name, Sharpness)
    yield Sharpness


def test_the_registry_answers_direction_for_every_name_form(sharpness):
    assert registry.direction("fid") == registry.direction("eval/fid_2step") == registry.direction("kid_1step") == MIN
    assert registry.direction("precision_1step") == registry.direction("eval/recall_2step") == MAX
    assert registry.direction("sharpness_2step") == MAX and registry.mode("eval/sharpness_1step") == "max"
    assert registry.better(0.9, 0.8, "recall_1step") and registry.better(10.0, 20.0, "fid_1step")
    assert not registry.better(math.nan, 1.0, "fid") and registry.better(1.0, math.nan, "precision")
    assert registry.best([3.0, math.nan, 1.0], "fid_1step") == 1.0 and registry.best([0.2, 0.7], "precision") == 0.7
    assert registry.ranked([0.2, 0.9, math.nan, 0.5], float, "recall_2step")[:3] == [0.9, 0.5, 0.2]
    assert registry.logged_keys(["prc"]) == ["eval/precision_1step", "eval/precision_2step",
                                             "eval/recall_1step", "eval/recall_2step"]
    assert "sharpness_1step" in registry.study_metrics()
    with pytest.raises(ValueError):           # a quantity another metric already logs
        register_metric(type("Twin", (Metric,), {"name": "twin", "quantities": (Quantity("fid", MIN, "FID"),)}))
    with pytest.raises(KeyError):
        registry.direction("eval/tangent/cos_all")


def _trials(key: str, values: dict[str, list[float]]):
    from ayt.studies.engine.trials import Trial
    return [Trial(f"{group}{seed}", f"{group}{seed}", {"loss": group, "seed": str(seed)}, 16, "FINISHED", False,
                  {key: [(50, v * 0.8), (100, v)]}) for group, finals in values.items() for seed, v in enumerate(finals)]


def test_a_higher_is_better_study_metric_is_maximised_and_the_higher_group_is_better(tmp_path, sharpness):
    """Constructed: group `mfd` has the higher precision on every seed. Tune maximises it (the
    searcher and ASHA get mode=max), its best and target follow, and the report calls it better."""
    from ayt.studies.engine.plan import plan_study
    from ayt.studies.report.table import findings, group_rows, table_lines, targets
    from ayt.studies.engine.tune_backend import _scheduler, optuna_searcher
    plan = plan_study("speed", [f"out_dir={tmp_path}", "study.metric=precision_1step", "eval.metrics=[fid,prc]",
                                "study.search=tpe", "study.num_samples=4", "study.scheduler=asha",
                                "+study.axes.lr={low: 1e-4, high: 1e-3, log: true}"])
    assert plan.metric == "eval/precision_1step" and plan.mode == "max"
    assert optuna_searcher(plan)._mode == "max" and _scheduler(plan)._mode == "max"
    key = plan.metric
    trials = _trials(key, {"pseudo_huber": [0.40, 0.42, 0.41], "mfd": [0.60, 0.63, 0.61]})
    assert trials[3].best(key) == 0.60 and trials[3].first_reaching(key, 0.45) == 50
    study = {"target": {"fid": None, "reference": {"loss": "pseudo_huber"}}}
    rows = group_rows(trials, targets(trials, study, key), key, study)
    mfd = next(r for r in rows if r["group"] == "loss=mfd")
    assert mfd["vs_reference"].startswith("better") and mfd["paired_vs_reference"].startswith("better")
    text = "\n".join(findings(rows, key))
    assert "Highest final precision_1step: loss=mfd" in text
    assert "final precision 1-step" in table_lines(rows, key)[0]
