"""Studies: Ray Tune + Optuna sweeps on a shared runner, tracked in MLflow."""
