"""`python -m ayt.bench [which ...] [--out FILE]`: timing benchmarks of the trainer.

Each benchmark prints one JSON record (one line): the git commit, the machine (CPU count,
1-, 5- and 15-minute load averages before and after), torch (version, the threads the
benchmark actually ran with), the options, the configuration it measured, and for every
timed quantity the median and spread (IQR, min, max) over the repeats. `which` is any of

  step        the real `ConsistencyStep` (built by `ayt.training.loop.build_training`) for
              each loss, at the CPU preset and at a CIFAR-sized preset; ratios to pseudo-Huber
              measured in the same process; a scan of the step for host-device syncs
  switches    channels_last, precision=bf16 (and torch.compile with --compile) on the CPU preset
  mfd         the optimised MFD of `ayt.method.losses` against a naive form: equal gradients
              w.r.t. the prediction, and the speed ratio
  ray         the same small trial through Ray Train (1 worker) and through the plain loop;
              a Tune study of small trials against the same trials in a Python loop
  fid         one evaluation (1- and 2-step samples, every configured metric) and its cost split
              (generation, extraction, statistics), on 1 and on 2 Ray Train workers (ratio, same
              run), against the training time between two evaluations
  roofline    the step's achieved FLOP/s against a matmul peak measured in the same process
  front_door  the README's `python -m ayt.studies.batch_size_sweep` from an empty out_dir, in a
              subprocess: wall time and the share of core time spent in training + FID
  report_scale  the study report (every section) of a 1,000-trial search study from a sqlite
              MLflow store and its Optuna storage (synthetic trials; target <= 30 s on 2 cores)
  numerics    bf16 (and tf32) against strict fp32 on cifar10_paper's network at q = 256: per
              t-bin cosine of D(x_t,t) - D(x_r,r) and of the losses' gradients (ayt/bench/numerics.py)
  all         every one of the above
  gpu         (not in all) one CUDA GPU, <= 5 min: step time, TFLOP/s, MFU and peak memory for
              fp32/tf32/bf16 x compile at cifar10_paper's network and batch 128, one 10k-sample
              FID evaluation; exits 2 without CUDA; imports neither Ray, MLflow nor Optuna

Timing: warm-up calls first, then `--repeats` timed calls; when several variants are
compared they run interleaved (round-robin), so a change of machine load hits all of them
alike. Networks and the feature map are randomly initialised: a step costs the same
whatever the weights. Every benchmark runs with the process's global state (torch threads,
default dtype, RNG states, environment, working directory) restored afterwards, so one
cannot change what the next one measures. Records hold relative paths only (temporary
directories are `<tmp>`, a benchmark's out_dir `<out_dir>`). Results of a run are committed
under studies/benchmarks/; `python -m ayt.bench.table FILE` prints their table.

Layout: `registry` (the registry, options; re-exported here), `harness` (timing, machine,
records), one module per benchmark, `table` (the README table from the records), `__main__` (the CLI).
"""

from __future__ import annotations

from typing import Any

from ayt.bench.registry import ALL, BENCHMARKS, EXTRA, MODULES, Options, benchmark, get_benchmark

# The harness imports torch: imported on first call, so the CLI parses its flags without it.


def run_benchmark(name: str, opts: Options) -> dict[str, Any]:
    from ayt.bench.harness import run_benchmark as run
    return run(name, opts)


def write_records(records: list[dict[str, Any]], path) -> None:
    from ayt.bench.harness import write_records as write
    write(records, path)


__all__ = ["ALL", "BENCHMARKS", "EXTRA", "MODULES", "Options", "benchmark", "get_benchmark", "run_benchmark", "write_records"]
