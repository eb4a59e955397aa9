"""The Optuna sampler a study's search runs on: built here for Tune's OptunaSearch
(ayt.studies.engine.tune_backend) and read by the report's search section for its start-up trials,
so the report does not import the Tune back-end that writes it.

  grid    every point of the axes (GridSampler)
  random  independent uniform draws (RandomSampler)
  tpe     Tree-structured Parzen Estimator (TPESampler): many dimensions, categorical axes
  gp      Gaussian-process Bayesian optimisation (GPSampler, torch + scipy): few continuous
          dimensions, e.g. the Huber constant, where each trial is expensive

tpe and gp draw `study.startup_trials` trials at random first (Optuna's default, 10, when unset);
a search of no more trials than that is a random search, and says so (grid and random have
no start-up: they ignore it).
"""

from __future__ import annotations

from typing import Any

MODEL_SAMPLERS = ("tpe", "gp")       # the searches with random start-up trials before their model


def optuna_sampler(plan: Any):
    """The Optuna sampler of the plan's search."""
    import optuna            # lazy: planning and the CLI's help answer without loading Optuna
    space, seed = plan.space, int(plan.study["sampler_seed"])
    startup = plan.study.get("startup_trials")
    extra = {"n_startup_trials": int(startup)} if startup is not None else {}
    if space.search == "grid":
        return optuna.samplers.GridSampler(space.grid_space(), seed=seed)
    if space.search == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **extra)
    if space.search == "gp":
        return optuna.samplers.GPSampler(seed=seed, **extra)
    return optuna.samplers.RandomSampler(seed=seed)


def startup_trials(plan: Any) -> int | None:
    """The random start-up trials of the plan's sampler (None for grid and random)."""
    if plan.space.search not in MODEL_SAMPLERS:
        return None
    return getattr(optuna_sampler(plan), "_n_startup_trials", None)


def search_notes(plan: Any) -> list[str]:
    """What a person should know before a search starts, one line each: a budget that never
    leaves the random start-up is a random search."""
    startup, samples = startup_trials(plan), plan.space.num_samples
    if startup is not None and samples is not None and samples <= startup:
        return [f"num_samples={samples} does not exceed the {plan.space.search} sampler's {startup} random start-up "
                f"trials: this is a random search (raise study.num_samples or lower study.startup_trials)"]
    return []
