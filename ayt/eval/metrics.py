"""Evaluation metrics as registered kinds: what an evaluation measures, and which way is better.

Each metric is one `Metric` subclass registered with `@register_metric`. It declares, once:

  name          how `eval.metrics` names it (conf/config.yaml), e.g. ``kid``
  quantities    what it logs, each with its direction: a `Quantity` ``q`` is logged once per
                sampler as ``eval/<q>_<k>step`` (k = 1, 2), e.g. ``prc`` logs precision and recall
  extractor     the feature network it reads (``dataset``: `dataset.fid_extractor`, the
                classifier or Inception; ``dinov2``: `eval.dinov2_weights`)
  needs_rows    whether it needs the features themselves (gathered from every rank) or only
                their Fréchet statistics (all-reduced sums)
  compute       the quantities from the generated and reference `FeatureSet`s
  check         (optional) config checks before any work, each raising ConfigError

and reads its options from ``eval.<name>`` (a yaml block, if it has any). Evaluation
(`ayt.eval.probe`) generates and extracts once per probe and hands every configured metric the
same features; everything that ranks trials (Tune's mode, ASHA, the searchers, "best",
targets, the confirmation's candidates, tuning's winner, verdict words, the report) asks
`direction` / `better` / `best` here, never assumes lower is better.

Adding a metric (e.g. density) is one class here (plus its `eval.<name>` yaml block if it has options):

    @register_metric
    class Density(Metric):
        '''Density (Naeem et al. 2020): how many real k-NN balls hold each sample.'''
        name = "density"
        quantities = (Quantity("density", MAX, "density"),)
        needs_rows = True

        def compute(self, generated, reference):
            return {"density": my_density(generated.rows, reference.rows, self.options.get("k", 5))}

This module imports neither torch nor torch-fidelity at import time: the config checks and the
study layer read the registry on every command's start-up.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Sequence

from ayt.errors import ConfigError

MIN, MAX = "min", "max"                  # lower is better | higher is better (Ray Tune's `mode` words)
DATASET_EXTRACTOR = "dataset"            # the extractor `dataset.fid_extractor` names (classifier | inception)
STEPS = (1, 2)                           # the samplers every evaluation runs: 1-step and 2-step
_KEY = re.compile(r"^(?:eval/)?(?P<quantity>.+)_(?P<steps>\d+)step$")


@dataclass(frozen=True)
class Quantity:
    """One logged number of a metric: ``eval/<name>_<k>step``, and which way is better."""

    name: str
    direction: str                       # MIN | MAX
    label: str                           # how tables and plots name it (FID, KID, precision)


@dataclass
class FeatureSet:
    """Features of one image set under one extractor, as the metrics read them: the Fréchet
    statistics (float64, from all-reduced sums) and, when a metric needs them, every row."""

    n: int
    mu: Any                              # np.ndarray [D] float64
    sigma: Any                           # np.ndarray [D, D] float64
    rows: Any = None                     # torch.Tensor [n, D] float32 (gathered in sample order), or None


class Metric:
    """One registered metric (see the module docstring)."""

    name: ClassVar[str]
    quantities: ClassVar[tuple[Quantity, ...]]
    extractor: ClassVar[str] = DATASET_EXTRACTOR
    needs_rows: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any] | None = None):
        self.options = dict(options or {})

    @classmethod
    def check(cls, cfg) -> None:
        """Config checks before any work (weights present, options in range)."""

    def compute(self, generated: FeatureSet, reference: FeatureSet) -> dict[str, float]:
        raise NotImplementedError


METRICS: dict[str, type[Metric]] = {}


def register_metric(cls: type[Metric]) -> type[Metric]:
    """Register a `Metric` subclass under its `name` (its quantity names must be new)."""
    taken = {q.name for m in METRICS.values() if m.name != cls.name for q in m.quantities}
    clash = sorted(taken & {q.name for q in cls.quantities})
    if clash:
        raise ValueError(f"metric {cls.name!r}: quantities {clash} are already logged by another metric")
    METRICS[cls.name] = cls
    return cls


# ---- the metrics ----------------------------------------------------------------------------

@register_metric
class FID(Metric):
    """Fréchet distance of the extractor's features (Heusel et al. 2017), by torch-fidelity."""

    name = "fid"
    quantities = (Quantity("fid", MIN, "FID"),)

    def compute(self, generated: FeatureSet, reference: FeatureSet) -> dict[str, float]:
        return {"fid": frechet_distance(generated, reference)}


@register_metric
class KID(Metric):
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD² with a cubic polynomial
    kernel, averaged over random subsets; better behaved than FID at a CPU study's sample counts."""

    name = "kid"
    quantities = (Quantity("kid", MIN, "KID"),)
    needs_rows = True

    @classmethod
    def check(cls, cfg) -> None:
        _positive_int(cfg, "eval.kid.subsets")
        _positive_int(cfg, "eval.kid.subset_size", low=2)

    def compute(self, generated: FeatureSet, reference: FeatureSet) -> dict[str, float]:
        from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric
        size = min(int(self.options.get("subset_size", 1000)), generated.n, reference.n)
        out = kid_features_to_metric(generated.rows, reference.rows, kid_subsets=int(self.options.get("subsets", 100)),
                                     kid_subset_size=size, verbose=False)
        return {"kid": float(out[KEY_METRIC_KID_MEAN])}


@register_metric
class PrecisionRecall(Metric):
    """Improved precision and recall (Kynkäänniemi et al. 2019): the share of samples inside the
    real data's k-NN manifold (quality) and of real images inside the samples' (coverage)."""

    name = "prc"
    quantities = (Quantity("precision", MAX, "precision"), Quantity("recall", MAX, "recall"))
    needs_rows = True

    @classmethod
    def check(cls, cfg) -> None:
        _positive_int(cfg, "eval.prc.neighborhood")

    def compute(self, generated: FeatureSet, reference: FeatureSet) -> dict[str, float]:
        from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
        k = int(self.options.get("neighborhood", 3))
        if min(generated.n, reference.n) <= k:
            return {"precision": math.nan, "recall": math.nan}
        out = prc_features_to_metric(generated.rows, reference.rows, prc_neighborhood=k,
                                     prc_batch_size=int(self.options.get("batch_size", 10000)),
                                     save_cpu_ram=True, verbose=False)
        return {"precision": float(out[KEY_METRIC_PRECISION]), "recall": float(out[KEY_METRIC_RECALL])}


@register_metric
class FDDinoV2(Metric):
    """Fréchet distance of DINOv2 ViT features (Stein et al. 2023; edm2's FD_DINOv2), from the
    local weights `eval.dinov2_weights` (nothing is downloaded)."""

    name = "fd_dinov2"
    quantities = (Quantity("fd_dinov2", MIN, "FD_DINOv2"),)
    extractor = "dinov2"

    @classmethod
    def check(cls, cfg) -> None:
        from pathlib import Path
        path = cfg.eval.get("dinov2_weights")
        if not path:
            raise ConfigError("eval.dinov2_weights", "fd_dinov2 needs local DINOv2 weights (e.g. "
                              "dinov2_vits14_pretrain.pth); nothing is downloaded at run time")
        if not Path(str(path)).is_file():
            raise ConfigError("eval.dinov2_weights", f"no such file: {path}")

    def compute(self, generated: FeatureSet, reference: FeatureSet) -> dict[str, float]:
        return {"fd_dinov2": frechet_distance(generated, reference)}


def frechet_distance(generated: FeatureSet, reference: FeatureSet) -> float:
    """torch-fidelity's Fréchet distance of the two sets' statistics, both in float64."""
    import numpy as np
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    stats = [{"mu": np.asarray(s.mu, dtype=np.float64), "sigma": np.asarray(s.sigma, dtype=np.float64)}
             for s in (generated, reference)]
    return float(fid_statistics_to_metric(stats[0], stats[1], verbose=False)[KEY_METRIC_FID])


def _positive_int(cfg, key: str, low: int = 1) -> None:
    from omegaconf import OmegaConf
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(key, f"must be an integer >= {low}, got {value!r}")


# ---- names, keys and directions -------------------------------------------------------------

def quantities() -> dict[str, Quantity]:
    """Every registered quantity by name (`fid`, `kid`, `precision`, ...)."""
    return {q.name: q for m in METRICS.values() for q in m.quantities}


def metric_key(quantity: str, steps: int) -> str:
    """`eval/<quantity>_<steps>step`, how a probe logs it."""
    return f"eval/{quantity}_{steps}step"


def parse_key(key: str) -> tuple[Quantity, int] | None:
    """(quantity, sampler steps) of a logged key (`eval/kid_2step` or `kid_2step`); None if the
    key is no registered quantity's."""
    match = _KEY.match(key)
    found = quantities().get(match["quantity"]) if match else None
    return (found, int(match["steps"])) if found else None


def quantity_of(name: str) -> Quantity:
    """The quantity a name means: a quantity (`fid`), a logged key (`eval/fid_1step`) or its
    short form (`fid_1step`). Raises KeyError naming the known ones."""
    known = quantities()
    if name in known:
        return known[name]
    parsed = parse_key(name)
    if parsed is None:
        raise KeyError(f"{name!r} is no registered metric quantity; known: {', '.join(known)}")
    return parsed[0]


def is_metric_key(key: str) -> bool:
    """Whether `key` is a registered metric's logged key (`eval/fid_1step`: yes;
    `eval/tangent/cos_all`: no)."""
    return key.startswith("eval/") and parse_key(key) is not None


def direction(name: str) -> str:
    """'min' (lower is better) or 'max' (higher is better) of a quantity, logged key or short key."""
    return quantity_of(name).direction


def mode(name: str) -> str:
    """Ray Tune's `mode` for the metric (`min` | `max`)."""
    return direction(name)


def optuna_direction(name: str) -> str:
    """Optuna's study direction for the metric (`minimize` | `maximize`)."""
    return "minimize" if direction(name) == MIN else "maximize"


def sign(name: str) -> float:
    """+1 where lower is better, −1 where higher is: `sign * value` is always lower-is-better."""
    return 1.0 if direction(name) == MIN else -1.0


def better(a: float, b: float, name: str) -> bool:
    """Whether `a` is strictly better than `b` for the metric (a NaN is never better)."""
    if not (isinstance(a, (int, float)) and math.isfinite(a)):
        return False
    if not (isinstance(b, (int, float)) and math.isfinite(b)):
        return True
    return a < b if direction(name) == MIN else a > b


def at_least_as_good(value: float, target: float, name: str) -> bool:
    """Whether `value` reaches `target` (≤ for lower-is-better, ≥ for higher-is-better)."""
    if not math.isfinite(value):
        return False
    return value <= target if direction(name) == MIN else value >= target


def best(values: Iterable[float], name: str, default: float = math.nan) -> float:
    """The best finite value (min or max by the metric's direction), `default` if none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return default
    return min(finite) if direction(name) == MIN else max(finite)


def best_index(values: Sequence[float], name: str) -> int | None:
    """Index of the best finite value (the first on ties), None if none is finite."""
    finite = [i for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if not finite:
        return None
    s = sign(name)
    return min(finite, key=lambda i: s * values[i])


def ranked(items: Iterable[Any], value, name: str) -> list[Any]:
    """`items` best first by `value(item)` (a stable sort; non-finite values last)."""
    s = sign(name)

    def key(item):
        v = value(item)
        return (0, s * v) if v is not None and math.isfinite(v) else (1, 0.0)
    return sorted(items, key=key)


def words(name: str) -> tuple[str, str]:
    """("lower", "higher") or ("higher", "lower"): how the better and the worse side read."""
    return ("lower", "higher") if direction(name) == MIN else ("higher", "lower")


def label(key: str) -> str:
    """`eval/fid_1step` -> `FID 1-step` (tables and plots); an unregistered key as it is."""
    parsed = parse_key(key)
    return f"{parsed[0].label} {parsed[1]}-step" if parsed else key.split("/", 1)[-1]


def logged_keys(names: Iterable[str], steps: Sequence[int] = STEPS) -> list[str]:
    """Every key the metrics `names` log, metric by metric, each quantity at each sampler."""
    return [metric_key(q.name, k) for n in names for q in METRICS[str(n)].quantities for k in steps]


def study_metrics() -> tuple[str, ...]:
    """Every short key a study may rank by (`study.metric`): each quantity at each sampler."""
    return tuple(metric_key(q.name, k).split("/", 1)[1] for q in quantities().values() for k in STEPS)


def metric_keys_in(keys: Iterable[str]) -> list[str]:
    """The registered metric keys among `keys`, in registry order then by sampler."""
    present = set(keys)
    order = [metric_key(q.name, k) for q in quantities().values() for k in STEPS]
    return [k for k in order if k in present] + sorted(k for k in present if is_metric_key(k) and k not in order)


def configured(cfg) -> list[Metric]:
    """The metrics `eval.metrics` names, each with its options (`eval.<name>`)."""
    from omegaconf import OmegaConf
    out = []
    for name in cfg.eval.metrics:
        block = cfg.eval.get(str(name))
        options = OmegaConf.to_container(block, resolve=True) if block is not None else {}
        out.append(METRICS[str(name)](options))
    return out


def validate(cfg) -> None:
    """`eval.metrics`: a non-empty list of registered names without repeats, each metric's own
    checks; raises ConfigError naming the field."""
    names = cfg.eval.get("metrics")
    allowed = ", ".join(METRICS)
    if names is None or isinstance(names, str) or not len(names):
        raise ConfigError("eval.metrics", f"must be a non-empty list of metric names ({allowed}), got {names!r}")
    for name in names:
        if str(name) not in METRICS:
            raise ConfigError("eval.metrics", f"unknown metric {name!r}; allowed: {allowed}")
    if len(set(map(str, names))) != len(names):
        raise ConfigError("eval.metrics", f"lists a metric twice: {list(names)}")
    _positive_int(cfg, "eval.feature_batch_size")
    for name in names:
        METRICS[str(name)].check(cfg)
