"""Errors a user can act on: each names the config field and what is allowed."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid. ``str(err)`` is one line: ``field: problem``."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):              # picklable across Ray processes (two-argument __init__)
        return type(self), (self.field, self.message)


class DatasetUnavailableError(ConfigError):
    """Dataset files are missing and cannot be downloaded (offline)."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; carries the iteration for the report."""

    def __init__(self, iteration: int, reason: str):
        self.iteration = iteration
        self.reason = reason
        super().__init__(f"non-finite loss at iteration {iteration}: {reason}")

    def __reduce__(self):              # picklable across Ray processes (a Tune trial's error)
        return type(self), (self.iteration, self.reason)
