"""The Optuna sampler a study's search runs on: built here for Tune's OptunaSearch
(ayt.studies.tune_backend) and read by the report's search section for its start-up trials,
so the report does not import the Tune back-end that writes it."""

from __future__ import annotations

from typing import Any


def optuna_sampler(plan: Any):
    """The Optuna sampler of the plan's search."""
    import optuna            # lazy: planning and the CLI's help answer without loading Optuna
    space, seed = plan.space, int(plan.study["sampler_seed"])
    if space.search == "grid":
        return optuna.samplers.GridSampler(space.grid_space(), seed=seed)
    if space.search == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)
