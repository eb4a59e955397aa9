"""Library logs to a file, our own lines to the console: Ray, Tune, Optuna and MLflow log
internals a person running a study or a Ray run does not need to read (`verbose=true`
shows them all, as the libraries would)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

# Loggers whose INFO lines are library internals, not news for the person at the terminal.
LIBRARY_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.data", "optuna", "py.warnings", "mlflow", "alembic",
                   "torch_fidelity", "filelock", "urllib3")


def route_logs(log_file: Path, verbose: bool) -> Path:
    """Every log record to `log_file`; on the console only ours at INFO and anyone's
    warnings that ask the user to act (unless `verbose`: then everything, as before)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._ayt_route = True                      # so a second call (another run in this process) replaces it
    root = logging.getLogger()
    for name in ("", *LIBRARY_LOGGERS):
        for old in [h for h in logging.getLogger(name).handlers if getattr(h, "_ayt_route", False)]:
            logging.getLogger(name).removeHandler(old)
            old.close()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    for h in root.handlers:                        # the console shows warnings, and our own INFO lines
        if h is not handler and isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.addFilter(_console_filter)
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        lib.propagate = verbose
        if not verbose:
            lib.addHandler(handler)
            for h in list(lib.handlers):           # Ray installs its own stderr handler
                if h is not handler and isinstance(h, logging.StreamHandler) and \
                        not isinstance(h, logging.FileHandler):
                    lib.removeHandler(h)
    if not verbose:
        warnings.filterwarnings("ignore", module="ray")
        try:
            import optuna
            optuna.logging.disable_default_handler()      # its records reach the file handler above
        except ImportError:
            pass
    return log_file


def _console_filter(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.startswith("ayt")
