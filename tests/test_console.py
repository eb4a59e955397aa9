"""What a person sees while a study runs (`ayt.studies.engine.console`), without Ray: one line per
trial event, with or without the progress bar."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ayt.studies.engine.console import StudyConsole


@pytest.mark.parametrize("bar", [True, False])
def test_every_trial_event_is_one_line_with_or_without_the_bar(capsys, bar):
    """progress=false (a study run into a log file) drops the bar, not the event lines.
    Mutations caught: `say` silenced without the bar, a bar drawn when it is off."""
    console = StudyConsole(2, "fid_1step", enabled=bar)
    trial = SimpleNamespace(trial_id="t1", config={"loss": "mfd", "batch_size": 16},
                            last_result={"fid_1step": 123.456, "iteration": 300, "images_seen": 4800})
    console.on_trial_start(0, [], trial)
    console.on_trial_complete(0, [], trial)
    console.on_experiment_end([])
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("trial ")]
    assert lines[0] == "trial t1 started: batch_size=16, loss=mfd"
    assert lines[1].startswith("trial t1 finished: batch_size=16, loss=mfd — fid_1step 123.5 at iteration 300 "
                               "(4800 images)")
    assert len(lines) == 2
    assert ("trials:" in captured.err) == bar            # tqdm draws on stderr
