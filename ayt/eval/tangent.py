"""Tangent diagnostics: which way each loss pushes the network's output, measured on a fixed
probe set at every FID evaluation.

The probe set (`ProbeSet`, built once per run by `build_probe_set`):

- images: `probe_size` training images drawn without replacement by a generator seeded from
  (cfg.seed, PROBE_SALT), noise eps from the same generator. Nothing depends on the loss, so
  every loss with the same seed (and every trial of a study with that seed) probes the same
  pairs; another seed probes other ones. No global RNG is touched: the probe changes nothing
  in training.
- times: stratified quantiles of the training t-distribution. Probe i gets the standard
  normal n_i = Phi^-1((i + 1/2) / N), so t_i = schedule.sample_t(n_i) = exp(P_mean + P_std n_i)
  clamped to [sigma_min, sigma_max], exactly as training maps its normals to t. The t range
  is therefore covered in proportion to how often training visits it.
- bins: `t_bins` equal-probability bins of that distribution; bin b holds the probes with
  (i + 1/2) / N in [b / t_bins, (b + 1) / t_bins), so its t range is
  [t(b / t_bins), t((b + 1) / t_bins)] with t(0) = sigma_min and t(1) = sigma_max
  (`ProbeSet.edges`; the run logs them as the tag `ayt.tangent.t_bin_edges`).

At an evaluation (`TangentProbe.__call__`), the consistency pair is built exactly as the
step builds it at that iteration (`ConsistencySchedule.pair`: r(t) depends on the curriculum
stage), with the online network in eval mode (no dropout; its train mode is restored after):
pred = D(x_t, t), target = stopgrad D(x_r, r) (x itself where r = 0). With g = d loss / d pred
(the gradient the step sends into the network's output) and e = target − pred:

  eval/tangent/cos_t<b>   mean over the bin of cos(−g, e): 1 means the loss pulls straight
                          along the pixel error (pseudo-Huber, L2); less means part of the step
                          goes elsewhere
  eval/tangent/err_t<b>   mean |e|_2 (over all pixels of a sample)
  eval/tangent/dist_t<b>  mean of the loss's own distance: its `dist` term where it has one
                          (MFD, LPIPS; mixed: the MFD distance), else its per-sample loss
  eval/tangent/osc_t<b>   mean cos(−g now, −g at the previous evaluation) on the same probes:
                          oscillation; absent at the first evaluation of a process (also the
                          first after a resume)
  eval/tangent/cos_all, osc_all: the same means over every probe

A per-sample weight (the step's w = 1/(t − r)) scales g without turning it, so it does not
enter a cosine.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ayt.diagnostics import Diagnostic, register_diagnostic
from ayt.method.losses import PairLoss, gradient_wrt_prediction
from ayt.method.schedule import ConsistencySchedule
from ayt.networks.precond import unwrap

PREFIX = "eval/tangent/"
EDGES_TAG = "ayt.tangent.t_bin_edges"
PROBE_SALT = 0x7A4E_0001      # the probe set's stream differs from every other stream of a seed
NORM_FLOOR = 1e-12            # a zero error or gradient gives cosine 0, not NaN

COS, ERR, DIST, OSC = "cos", "err", "dist", "osc"
PER_BIN = (COS, ERR, DIST, OSC)


def metric_key(kind: str, bin_index: int | None = None) -> str:
    """`eval/tangent/cos_t2`, or `eval/tangent/cos_all` for bin_index None."""
    return f"{PREFIX}{kind}_" + ("all" if bin_index is None else f"t{bin_index}")


@dataclass(frozen=True)
class ProbeSet:
    """Fixed consistency-pair inputs: images, normals n (t = schedule.sample_t(n)), noise, bins."""

    x: Tensor           # [N, C, H, W] training images
    n: Tensor           # [N] standard normals at stratified quantiles (ascending)
    eps: Tensor         # [N, C, H, W]
    bins: Tensor        # [N] t-bin of each probe, 0..t_bins-1
    edges: tuple[float, ...]   # t_bins + 1 bin edges in t
    indices: Tensor     # [N] the images' indices in the training set

    @property
    def t_bins(self) -> int:
        return len(self.edges) - 1

    def to(self, device: torch.device) -> "ProbeSet":
        return ProbeSet(self.x.to(device), self.n.to(device), self.eps.to(device), self.bins.to(device),
                        self.edges, self.indices)


def probe_seed(seed: int) -> int:
    return (int(seed) * 1_000_003 + PROBE_SALT) % (2**63 - 1)


def build_probe_set(images: Tensor, seed: int, size: int, t_bins: int,
                    schedule: ConsistencySchedule) -> ProbeSet:
    """The probe set of a run with this seed (see the module docstring)."""
    size, t_bins = int(size), int(t_bins)
    if size < t_bins or t_bins < 1:
        raise ValueError(f"need probe_size >= t_bins >= 1, got {size} and {t_bins}")
    gen = torch.Generator().manual_seed(probe_seed(seed))
    count = images.shape[0]
    if size <= count:
        indices = torch.randperm(count, generator=gen)[:size]
    else:                                   # a tiny dataset: repeat images, every pair still has its own noise
        indices = torch.randint(count, (size,), generator=gen)
    x = images[indices].float().clone()
    eps = torch.randn(x.shape, generator=gen)
    u = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    n = torch.special.ndtri(u).float()
    bins = torch.div(torch.arange(size) * 2 * t_bins + t_bins, 2 * size, rounding_mode="floor")  # floor(u * t_bins)
    return ProbeSet(x=x, n=n, eps=eps, bins=bins, edges=bin_edges(schedule, t_bins), indices=indices)


def bin_edges(schedule: ConsistencySchedule, t_bins: int) -> tuple[float, ...]:
    """The t_bins + 1 edges in t of the equal-probability bins: sigma_min, the training
    t-distribution's quantiles b / t_bins, sigma_max."""
    inner = [float(schedule.sample_t(torch.special.ndtri(torch.tensor(b / t_bins, dtype=torch.float64)).float()))
             for b in range(1, int(t_bins))]
    return (float(schedule.sigma_min), *inner, float(schedule.sigma_max))


def tangent_terms(net: nn.Module, loss: PairLoss, schedule: ConsistencySchedule, probes: ProbeSet,
                  iteration: int, autocast: contextlib.AbstractContextManager | None = None,
                  batch_size: int | None = None) -> dict[str, Tensor]:
    """Per-probe cos(−g, e), |e|, the loss's distance and the unit direction −g/|g| (flattened).

    `net` is called as it is (the caller sets eval mode); the pair, the target and the loss
    follow the training step's `consistency_terms` at `iteration`.
    """
    size = probes.x.shape[0]
    batch_size = int(batch_size or size)
    out: dict[str, list[Tensor]] = {"cos": [], "err": [], "dist": [], "direction": []}
    for start in range(0, size, batch_size):
        part = slice(start, start + batch_size)
        pair = schedule.pair(probes.x[part], probes.n[part], probes.eps[part], iteration)
        view = (-1,) + (1,) * (pair.x.dim() - 1)
        with torch.no_grad(), (autocast or contextlib.nullcontext()):
            target = net(pair.x_r, pair.r.clamp_min(schedule.sigma_min)).float()
            pred = net(pair.x_t, pair.t).float()
        target = torch.where((pair.r > 0).view(view), target, pair.x)
        pred = pred.detach().requires_grad_(True)
        terms: dict[str, Tensor] = {}

        def loss_terms(p: Tensor) -> dict[str, Tensor]:
            terms.update(loss(p, target, iteration))
            return terms

        with torch.enable_grad():
            grad = gradient_wrt_prediction(loss_terms, pred)
        direction = -grad.flatten(1).double()
        error = (target - pred.detach()).flatten(1).double()
        g_norm, e_norm = direction.norm(dim=1), error.norm(dim=1)
        out["cos"].append((direction * error).sum(1) / (g_norm * e_norm).clamp_min(NORM_FLOOR))
        out["err"].append(e_norm)
        out["dist"].append(terms.get("dist", terms["loss"]).detach().double().reshape(-1))
        out["direction"].append(direction / g_norm.clamp_min(NORM_FLOOR).unsqueeze(1))
    return {key: torch.cat(values) for key, values in out.items()}


def bin_means(values: Tensor, bins: Tensor, t_bins: int) -> Tensor:
    """Mean of `values` [N] in each of the t_bins bins (NaN for an empty bin)."""
    sums = torch.zeros(t_bins, dtype=torch.float64, device=values.device).index_add_(0, bins, values.double())
    counts = torch.bincount(bins, minlength=t_bins).to(sums)
    return sums / counts


@register_diagnostic("tangent")
class TangentProbe(Diagnostic):
    """The tangent metrics of one run (rank 0). Keeps the last evaluation's directions for
    the oscillation; `__call__(step, iteration)` returns `{eval/tangent/...: float}`."""

    chief_only = True

    def __init__(self, probes: ProbeSet, device: torch.device, batch_size: int | None = None):
        self.probes = probes.to(device)
        self.batch_size = batch_size
        self.previous: Tensor | None = None

    @classmethod
    def from_config(cls, cfg, data, device: torch.device) -> "TangentProbe | None":
        """From `cfg.diagnostics.tangent` (None when switched off or absent)."""
        from omegaconf import OmegaConf
        spec = OmegaConf.select(cfg, "diagnostics.tangent")
        if not spec or not spec.enabled:
            return None
        schedule = ConsistencySchedule.from_config(cfg.schedule, cfg.edm)
        probes = build_probe_set(data.images, int(cfg.seed), int(spec.probe_size), int(spec.t_bins), schedule)
        return cls(probes, device, batch_size=int(cfg.fid.batch_size))

    @classmethod
    def validate(cls, cfg, key: str) -> None:
        """A probe set of >= 1 pair per t-bin."""
        from omegaconf import OmegaConf

        from ayt.config import _number
        from ayt.errors import ConfigError
        _number(cfg, f"{key}.t_bins", low=1, integer=True)
        _number(cfg, f"{key}.probe_size", low=1, integer=True)
        spec = OmegaConf.select(cfg, key)
        if spec.probe_size < spec.t_bins:
            raise ConfigError(f"{key}.probe_size", f"must be >= {key}.t_bins ({spec.t_bins}): every t-bin needs "
                              f"a probe, got {spec.probe_size}")

    @classmethod
    def create(cls, cfg, spec, data, device: torch.device) -> "TangentProbe":
        return cls.from_config(cfg, data, device)

    def evaluate(self, step, iteration: int, reduce) -> dict[str, float]:
        return self(step, iteration)

    def state_dict(self) -> dict:
        """The last evaluation's directions: a resumed run's first evaluation still has its oscillation."""
        return {"previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        previous = state.get("previous")
        self.previous = previous.to(self.probes.x.device) if previous is not None else None

    def tags(self) -> dict[str, Any]:
        return {EDGES_TAG: ",".join(f"{e:.4g}" for e in self.probes.edges)}

    def measure(self, net: nn.Module, loss: PairLoss, schedule: ConsistencySchedule, iteration: int,
                autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict[str, float]:
        """The metrics of `net` (put in eval mode for the passes, its mode restored after)."""
        was_training = net.training
        net.eval()
        try:
            terms = tangent_terms(net, loss, schedule, self.probes, iteration,
                                  autocast() if autocast else None, self.batch_size)
        finally:
            net.train(was_training)
        bins, count = self.probes.bins, self.probes.t_bins
        rows = {COS: terms["cos"], ERR: terms["err"], DIST: terms["dist"]}
        if self.previous is not None:
            rows[OSC] = (terms["direction"] * self.previous).sum(1)
        self.previous = terms["direction"]
        per_bin = torch.stack([bin_means(values, bins, count) for values in rows.values()])
        overall = torch.stack([rows[COS].mean()] + ([rows[OSC].mean()] if OSC in rows else []))
        per_bin, overall = per_bin.tolist(), overall.tolist()        # one host sync
        metrics = {metric_key(kind, b): value for kind, row in zip(rows, per_bin) for b, value in enumerate(row)
                   if math.isfinite(value)}
        metrics[metric_key(COS)] = overall[0]
        if OSC in rows:
            metrics[metric_key(OSC)] = overall[1]
        return metrics

    def __call__(self, step, iteration: int) -> dict[str, float]:
        """Metrics of a `ConsistencyStep`'s online network at `iteration`, as training builds pairs."""
        device = self.probes.x.device
        return self.measure(unwrap(step.net), step.loss, step.schedule, iteration,
                            lambda: step.autocast(device))
