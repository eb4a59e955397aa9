"""One evaluation of a model: every configured metric (`eval.metrics`, ayt/eval/metrics.py) from
one pass over the fixed noise set, split across the workers.

At each evaluation (`EvalProbe.__call__`), on every rank:

1. generate once per sampler: this rank's slice of the fixed noise set (`fid.noise_seed`,
   `fid.num_samples`; rank r holds samples [r N / W, (r + 1) N / W)), in batches of
   `fid.batch_size`; the 2-step sampler continues from the 1-step output it already has, so
   the network runs 2 N times per evaluation, not 3 N. The images are those of an unsharded
   run: the noise set is drawn whole and then sliced.
2. extract features once per extractor (`FeatureReference`, one per network the metrics
   name), in batches of `eval.feature_batch_size`.
3. reduce: the Fréchet sums (n, Σx, Σxxᵀ) all-reduced in float64 (edm2's way), and the
   features themselves gathered in sample order where a metric needs them (KID,
   precision/recall).
4. compute every metric on rank 0, which returns ``{eval/<quantity>_<k>step: value}``;
   the other ranks return {}. Rank 0 also keeps the first images of each sampler
   (`last`), which the run's final sample grids reuse.

With one worker the collectives are skipped: the same code serves a single process, a Tune
trial and N Ray Train workers (where torch.distributed is initialised). The probe never
imports training: the loop hands it the network to sample.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from ayt.data import ImageData
from ayt.eval.fid import FeatureReference, quantize
from ayt.eval.metrics import DATASET_EXTRACTOR, STEPS, FeatureSet, Metric, configured, metric_key
from ayt.method.sampling import sample_one_step, second_step

GRID = 64                         # images per sampler kept for the final sample grids


def shard(n: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous slice of n samples (sizes differ by at most one)."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def extractor_name(cfg: DictConfig, metric: Metric) -> str:
    """The `FeatureReference` extractor a metric reads: the dataset's own or the one it names."""
    return str(cfg.dataset.fid_extractor) if metric.extractor == DATASET_EXTRACTOR else metric.extractor


def references(cfg: DictConfig, fid_weights: str | None, cache_root: str, data: ImageData,
               device: torch.device | str) -> dict[str, tuple[FeatureReference, bool]]:
    """extractor -> (its reference, whether a metric needs the features themselves), for the
    metrics `eval.metrics` names."""
    out: dict[str, tuple[FeatureReference, bool]] = {}
    for metric in configured(cfg):
        name = extractor_name(cfg, metric)
        if name not in out:
            dataset_own = name == str(cfg.dataset.fid_extractor)
            weights = fid_weights if dataset_own else cfg.eval.get(f"{name}_weights")
            reference = FeatureReference(data, name, weights, cache_root, device,
                                         batch_size=int(cfg.eval.feature_batch_size),
                                         reference_stats=cfg.fid.get("reference_stats") if dataset_own else None)
            out[name] = (reference, False)
        out[name] = (out[name][0], out[name][1] or metric.needs_rows)
    return out


def ensure_references(cfg: DictConfig, fid_weights: str | None, cache_root: str, data: ImageData,
                      device: torch.device | str) -> list[str]:
    """Compute and cache every reference the configured metrics read (before training starts,
    so no worker waits on it); returns their statistics' paths."""
    return [ref.ensure_reference_stats(features=rows)
            for ref, rows in references(cfg, fid_weights, cache_root, data, device).values()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EvalProbe:
    """Every configured metric of 1- and 2-step samples on the fixed noise set (see the module
    docstring); built on every rank, called on every rank at each evaluation."""

    def __init__(self, cfg: DictConfig, fid_weights: str | None, cache_root: str, data: ImageData,
                 device: torch.device | str, rank: int = 0, world_size: int = 1):
        self.cfg, self.device = cfg, torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.metrics = configured(cfg)
        self.references = references(cfg, fid_weights, cache_root, data, self.device)
        self.networks = {name: ref.extractor_network(self.device) for name, (ref, _) in self.references.items()}
        self._reference_sets: dict[str, FeatureSet] = {}
        gen = torch.Generator().manual_seed(int(cfg.fid.noise_seed))
        shape = (int(cfg.fid.num_samples), data.channels, data.resolution, data.resolution)
        mine = shard(shape[0], rank, world_size)
        self.z = torch.randn(shape, generator=gen)[mine].to(self.device)    # drawn whole: the same
        self.z2 = torch.randn(shape, generator=gen)[mine].to(self.device)   # images at any worker count
        self.last: dict[int, Tensor] | None = None        # rank 0: the first GRID images per sampler
        self.timings: dict[str, float] = {}               # seconds of the last call, per phase

    def keys(self) -> list[str]:
        """Every key a call logs."""
        return [metric_key(q.name, k) for m in self.metrics for q in m.quantities for k in STEPS]

    @torch.no_grad()
    def generate(self, net: nn.Module) -> dict[int, Tensor]:
        """uint8 [n_local, 3, H, W] per sampler (1, 2 steps) on this rank's slice; 2 passes of
        the network per sample. Keeps the first GRID float images of each (rank 0)."""
        edm, batch = self.cfg.edm, int(self.cfg.fid.batch_size)
        images: dict[int, list[Tensor]] = {k: [] for k in STEPS}
        grid: dict[int, list[Tensor]] = {k: [] for k in STEPS}
        for start in range(0, self.z.shape[0], batch):
            x1 = sample_one_step(net, self.z[start:start + batch], edm.sigma_max)
            x2 = second_step(net, x1, self.z2[start:start + batch], self.cfg.sampling.t_mid, edm.sigma_min)
            for k, x in ((1, x1), (2, x2)):
                x = x.float().clamp(-1.0, 1.0)
                images[k].append(quantize(x))
                if start < GRID:
                    grid[k].append(x[:GRID - start].cpu())
        if self.rank == 0:
            self.last = {k: torch.cat(v) if v else torch.empty(0) for k, v in grid.items()}
        empty = torch.empty((0, 3, *self.z.shape[2:]), dtype=torch.uint8, device=self.device)
        return {k: torch.cat(v) if v else empty for k, v in images.items()}

    @torch.no_grad()
    def features(self, network: nn.Module, images: Tensor) -> Tensor:
        """float32 [n, D] features of uint8 images, in batches of eval.feature_batch_size."""
        batch = int(self.cfg.eval.feature_batch_size)
        parts = [network(images[i:i + batch])[0].float() for i in range(0, images.shape[0], batch)]
        if parts:
            return torch.cat(parts)
        dim = network(torch.zeros((1, *images.shape[1:]), dtype=torch.uint8, device=self.device))[0].shape[-1]
        return torch.empty((0, dim), device=self.device)

    def feature_set(self, rows: Tensor, gather: bool) -> FeatureSet:
        """The global `FeatureSet` of every rank's `rows`: float64 sums all-reduced, the rows
        gathered when `gather` (None elsewhere)."""
        x = rows.double()
        n = torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device)
        packed = self._all_reduce(torch.cat([n, x.sum(0), (x.T @ x).flatten()]))
        d = x.shape[1]
        count, total, outer = packed[0], packed[1:d + 1], packed[d + 1:].view(d, d)
        mu = total / count
        sigma = (outer - count * torch.outer(mu, mu)) / (count - 1)
        return FeatureSet(int(count.item()), mu.cpu().numpy(), sigma.cpu().numpy(),
                          self._all_gather(rows) if gather else None)

    def reference_set(self, name: str) -> FeatureSet:
        if name not in self._reference_sets:
            reference, rows = self.references[name]
            self._reference_sets[name] = reference.reference(features=rows, device=self.device)
        return self._reference_sets[name]

    def __call__(self, net: nn.Module) -> dict[str, float]:
        """One evaluation of `net` (every rank calls it): the metrics on rank 0, {} elsewhere."""
        t0 = time.perf_counter()
        images = self.generate(net)
        _sync(self.device)
        t1 = time.perf_counter()
        rows = {(name, k): self.features(network, images[k]) for name, network in self.networks.items() for k in STEPS}
        _sync(self.device)
        t2 = time.perf_counter()
        sets = {key: self.feature_set(r, self.references[key[0]][1]) for key, r in rows.items()}
        out: dict[str, float] = {}
        if self.rank == 0:
            for metric in self.metrics:
                name = extractor_name(self.cfg, metric)
                for k in STEPS:
                    values = metric.compute(sets[(name, k)], self.reference_set(name))
                    out.update({metric_key(q.name, k): float(values[q.name]) for q in metric.quantities})
        _sync(self.device)
        t3 = time.perf_counter()
        self.timings = {"generation": t1 - t0, "extraction": t2 - t1, "statistics": t3 - t2}
        return out

    # ---- collectives (no-ops on one worker) -----------------------------------------------

    def _all_reduce(self, value: Tensor) -> Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
        return value

    def _all_gather(self, rows: Tensor) -> Tensor:
        """Every rank's rows, concatenated in rank order (= sample order)."""
        if self.world_size == 1:
            return rows
        size = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        torch.distributed.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        padded[:rows.shape[0]] = rows
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])

    def describe(self) -> dict[str, Any]:
        """What an evaluation measures (for logs and benchmarks)."""
        return {"metrics": [m.name for m in self.metrics], "extractors": sorted(self.references),
                "num_samples": int(self.cfg.fid.num_samples), "world_size": self.world_size}
