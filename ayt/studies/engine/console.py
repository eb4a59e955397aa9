"""What a person running a study sees: one line when a trial starts (its axis values), one
when it ends (final FID, iterations, wall time, status), an overall progress bar, and the
final summary. Ray's and Tune's own logs go to a file (`ayt.logs.route_logs`). `progress=false`
drops the bar only: a study run into a log file still says what each trial did."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from ray.tune import Callback
from tqdm.auto import tqdm

from ayt.metrics import short

def axis_text(config: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('__', '.')}={_fmt(v)}" for k, v in sorted(config.items()))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class StudyConsole(Callback):
    """The study's terminal output, as a Tune callback on the driver."""

    def __init__(self, total: int, metric: str, enabled: bool = True, label: Callable[[Any], str] | None = None):
        self.total, self.metric, self.enabled = total, metric, enabled     # enabled: the progress bar
        self.label = label or (lambda trial: trial.trial_id)               # the trial's name in MLflow and the report
        self.started: dict[str, float] = {}
        self.done = 0
        self.bar = None

    def __getstate__(self):
        return {**self.__dict__, "bar": None, "started": {}}

    def _bar(self):
        if self.bar is None and self.enabled:
            self.bar = tqdm(total=self.total, initial=self.done, desc="trials", unit="trial", mininterval=1.0,
                            dynamic_ncols=True)
        return self.bar

    def say(self, line: str) -> None:
        bar = self._bar()
        bar.write(line) if bar is not None else print(line, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.monotonic()
        self.say(f"trial {self.label(trial)} started: {axis_text(trial.config)}")

    def _ended(self, trial, status: str, detail: str) -> None:
        self.done += 1
        seconds = time.monotonic() - self.started.pop(trial.trial_id, time.monotonic())
        self.say(f"trial {self.label(trial)} {status}: {axis_text(trial.config)} — {detail}, {seconds:.0f} s")
        bar = self._bar()
        if bar is not None:
            bar.update(1)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        value = result.get(self.metric)
        fid = f"{short(self.metric)} {value:.4g}" if isinstance(value, (int, float)) and math.isfinite(value) \
            else f"no {short(self.metric)}"
        self._ended(trial, "finished", f"{fid} at iteration {result.get('iteration', '?')} "
                    f"({result.get('images_seen', '?')} images)")

    def on_trial_error(self, iteration, trials, trial, **info):
        from ayt.studies.engine.tracker import error_line
        self._ended(trial, "FAILED", error_line(trial))

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
