"""The study engine: plan, Tune back-end, resume, MLflow tracker, console, command line."""
