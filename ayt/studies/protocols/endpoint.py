"""A study's endpoint: how one trial's metric curve becomes the one number the study decides on.

`study.endpoint` is fixed in the study config before it runs, since a verdict that depends on an
endpoint chosen after seeing the curves is not a verdict:

  final    the last evaluation;
  last_k   the mean of the last `study.endpoint_k` evaluations: the question `final` asks (where
           the run ends) with the jitter between consecutive evaluations averaged;
  auc      the mean of the metric over the curve on images seen (trapezoid rule over images
           seen, divided by the span from the first evaluation to the last): speed and quality
           in one number.

Each is a weighted sum of the curve's values (`Endpoint.weights`). Under jitter that is
independent between evaluations with SD σ, its variance is therefore σ²·Σw² (`jitter_variance`):
σ² for final, σ²/k for last_k, σ²·(n − 1.5)/(n − 1)² for auc on n evenly spaced evaluations.
docs/statistics.md says which is the default for new studies and why.

It scores a trial everywhere a study ranks or compares: verdicts, seed rounds, the tuning winner,
the confirmation's candidates, the reference's target, and what Tune's scheduler and Optuna's
sampler see, each report carrying the endpoint of the curve so far under `tune_key` (a curve so
far is scored by the same rule on what it has: fewer than k evaluations are all averaged, an auc
of one evaluation is that value). Which way is better is the metric's business, not this module's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ayt.errors import ConfigError
from ayt.metrics import short

SCORE = "score/"          # the reported endpoint of the curve so far: `score/fid_1step` (Tune only, not MLflow)
DEFAULT_K = 3             # last_k's k unless `study.endpoint_k` says otherwise (fewer if the budget has fewer)


def _final(xs: np.ndarray, k: int) -> np.ndarray:
    w = np.zeros(len(xs))
    w[-1] = 1.0
    return w


def _last_k(xs: np.ndarray, k: int) -> np.ndarray:
    w = np.zeros(len(xs))
    used = min(k, len(xs))
    w[-used:] = 1.0 / used
    return w


def _auc(xs: np.ndarray, k: int) -> np.ndarray:
    """Trapezoid weights over images seen, divided by the span (one evaluation: itself)."""
    if len(xs) == 1 or xs[-1] == xs[0]:
        return _final(xs, k)
    gaps = np.diff(xs)
    w = np.zeros(len(xs))
    w[:-1] += gaps / 2
    w[1:] += gaps / 2
    return w / (xs[-1] - xs[0])


# name -> (weights(xs, k), what it is in words): the one list of endpoints (the schema's choices)
ENDPOINTS: dict[str, tuple[Callable[[np.ndarray, int], np.ndarray], str]] = {
    "final": (_final, "the last evaluation"),
    "last_k": (_last_k, "the mean of the last {k} evaluations"),
    "auc": (_auc, "the mean over the curve on images seen (trapezoid, divided by the span)"),
}


@dataclass(frozen=True)
class Endpoint:
    name: str = "final"
    k: int = DEFAULT_K            # last_k only

    def weights(self, xs: Sequence[float]) -> np.ndarray:
        """The weight of each evaluation (at images seen `xs`, ascending) in the score."""
        xs = np.asarray(xs, dtype=float)
        if len(xs) == 0:
            return np.zeros(0)
        return ENDPOINTS[self.name][0](xs, int(self.k))

    def score(self, curve: Sequence[tuple[float, float]]) -> float:
        """The endpoint of `curve` ([(images seen or iteration, value)]; within one trial the two
        are proportional, so every endpoint reads the same on either); nan for an empty curve."""
        if not curve:
            return math.nan
        points = sorted(curve, key=lambda p: p[0])
        values = np.asarray([v for _, v in points], dtype=float)
        w = self.weights([x for x, _ in points])
        used = w != 0
        return float(np.dot(w[used], values[used]))

    @property
    def label(self) -> str:
        """`final`, `last_3`, `auc`: how a report header, a column and a verdict name it."""
        return f"last_{self.k}" if self.name == "last_k" else self.name

    @property
    def words(self) -> str:
        """What it is, for a reader: "the mean of the last 3 evaluations"."""
        return ENDPOINTS[self.name][1].format(k=self.k)

    def tune_key(self, metric_key: str) -> str:
        """The result key Tune ranks by: the metric itself at `final` (the curve so far ends at
        its latest value: earlier studies' searchers keep their key), else `score/<metric>`."""
        return metric_key if self.name == "final" else SCORE + short(metric_key)

    def reporter(self, metric_keys: Sequence[str]) -> "EndpointReporter":
        return EndpointReporter(self, tuple(metric_keys))


@dataclass(frozen=True)
class EndpointReporter:
    """What a trial adds to each report: the endpoint of each metric's curve so far, under its
    `tune_key`. Picklable; the training loop calls it with its curves (metric -> [[iteration,
    value]]) and knows nothing of studies."""

    endpoint: Endpoint
    metric_keys: tuple[str, ...]

    def __call__(self, curves: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, float]:
        out = {}
        for key in self.metric_keys:
            curve = curves.get(key) or []
            if curve and self.endpoint.tune_key(key) != key:
                out[self.endpoint.tune_key(key)] = self.endpoint.score([(p[0], p[1]) for p in curve])
        return out

    @property
    def keys(self) -> list[str]:
        """The keys it adds (a failed trial reports them as nan: a searcher reads every result)."""
        return [self.endpoint.tune_key(k) for k in self.metric_keys if self.endpoint.tune_key(k) != k]


def score(curve: Sequence[tuple[float, float]], endpoint: Endpoint | str = "final", k: int = DEFAULT_K) -> float:
    """The endpoint of one curve: `score(curve, Endpoint("last_k", 3))` or `score(curve, "auc")`."""
    return (endpoint if isinstance(endpoint, Endpoint) else Endpoint(endpoint, k)).score(curve)


def of(study: Mapping[str, Any]) -> Endpoint:
    """`study.endpoint` / `study.endpoint_k` (unset: DEFAULT_K, or every evaluation of a budget
    with fewer); a study block written before they existed (one a test builds by hand) scored
    its trials at the final evaluation."""
    k = study.get("endpoint_k")
    if k is None:
        evals = (study.get("budget") or {}).get("evals")
        k = min(DEFAULT_K, int(evals)) if evals else DEFAULT_K
    return Endpoint(str(study.get("endpoint") or "final"), int(k))


def jitter_variance(endpoint: Endpoint, xs: Sequence[float], sigma: float) -> float:
    """The endpoint's variance from evaluation jitter alone: independent, SD `sigma` at each of
    the evaluations at `xs` (σ²·Σw²; a seed's own level adds the same to every endpoint)."""
    w = endpoint.weights(xs)
    return float(sigma ** 2 * np.sum(w ** 2))


def check(study: Mapping[str, Any], evals: int) -> None:
    """The endpoint against the budget, before any work: one line naming the field (its name's
    allowed values are the schema's)."""
    endpoint = of(study)
    if endpoint.name not in ENDPOINTS:
        raise ConfigError("study.endpoint", f"unknown endpoint {endpoint.name!r}; allowed: " + ", ".join(ENDPOINTS))
    if endpoint.name == "last_k" and endpoint.k > evals:         # only a k set by hand can be
        raise ConfigError("study.endpoint_k", f"last_k averages the last {endpoint.k} evaluations, but the budget has "
                          f"{evals} (study.budget.evals); lower it or add evaluations")
    if endpoint.name == "auc" and evals < 2:
        raise ConfigError("study.endpoint", "auc is the mean over the curve and needs >= 2 evaluations, but the budget "
                          "has 1 (study.budget.evals); add evaluations or use final")
