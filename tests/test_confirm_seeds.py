"""Confirmation that separates selection from seed: the baseline also runs on the search's own
seeds, so the gap between the winner's search score and its confirmation mean splits into the
seed effect (the baseline's own change between the two sets of seeds) and the winner's own drop,
each worded from its numbers. The runner end to end is tests/test_confirm.py's real-Ray test."""

from __future__ import annotations

import pytest

from ayt.studies.protocols.search_then_confirm import BASELINE, Candidate, baseline_edit, confirmation_record, gap_words, parse_confirm
from ayt.studies.protocols.endpoint import Endpoint
from ayt.studies.engine.plan import plan_study
from ayt.studies.engine.space import CANDIDATE_AXIS
from ayt.studies.engine.trials import Trial

TINY = ["study.preset=smoke", "fid.num_samples=100", "progress=false", "study.budget.evals=2"]


def test_the_baseline_runs_on_the_search_seeds(tmp_path):
    """A new search's baseline stage: the baseline alone, on exactly the search's seeds, at the
    full budget (no ASHA), with no reference of its own; the confirmation keeps its fresh seeds."""
    args = [f"out_dir={tmp_path}", *TINY, "study.seeds=[0,1]", "study.endpoint=last_k",
            "study.protocol.confirm.baseline_on_search_seeds=true",
            "+study.protocol.confirm.baseline={loss.huber_c: 0.002}"]
    search = plan_study("huber_sweep", args)
    stage = parse_confirm(search.study, search.space)
    assert stage.baseline_on_search_seeds and not set(stage.seeds) & set(search.space.seeds)
    base = plan_study("huber_sweep", args, baseline_edit(search.space, stage))
    assert base.name == "huber_sweep-baseline" and base.space.seeds == [0, 1] and base.space.trial_count() == 2
    assert [a.key for a in base.space.axes] == [CANDIDATE_AXIS] and base.study["scheduler"] == "none"
    assert {float(c.loss.huber_c) for c in base.trial_configs} == {0.002} and not base.study["target"]["reference"]
    assert {int(c.seed) for c in base.trial_configs} == {0, 1}
    record = confirmation_record(search, stage, [Candidate("best1", {"loss.huber_c": 0.01}, "t", 50.0, 48.0)],
                                 tmp_path / "c", 12, {"0": 60.0, "1": 62.0}, base)
    assert record["baseline_search_seeds"] == {"0": 60.0, "1": 62.0} and record["endpoint"] == "last_2"
    assert record["candidates"][0]["search_score"] == 48.0
    assert record["baseline_search_report"] == "../huber_sweep-baseline/report.md"


def test_a_committed_search_did_not_run_it_and_says_the_gap_cannot_be_split():
    words = " ".join(gap_words(117.9, 330.0, [], (310.0, 20.0, 5), "eval/fid_1step"))
    assert "did not run on the search seed" in words and "cannot be told apart" in words


@pytest.mark.parametrize("base_search, base_confirm, reading", [
    (300.0, 310.0, "most of the gap is the winner's curse"),      # the baseline barely moves: selection
    (120.0, 320.0, "most of the gap is the seeds"),               # every configuration is worse on these seeds
    (100.0, 330.0, "no sign of the winner's curse"),               # best1 kept its lead of -17.9
])
def test_the_gap_splits_into_the_seed_effect_and_the_winners_own_drop(base_search, base_confirm, reading):
    """best1 scored 117.9 on the search seed, 330 on the confirmation seeds (+212.1)."""
    lines = gap_words(117.9, 330.0, [base_search], (base_confirm, 20.0, 5), "eval/fid_1step")
    seed_effect = base_confirm - base_search
    own = 212.1 - seed_effect
    assert f"a seed effect of {seed_effect:+.2f}" in lines[1] and f"the rest, {own:+.2f}" in lines[1]
    assert f"went from {117.9 - base_search:+.2f} on the search seed to {330.0 - base_confirm:+.2f}" in lines[1]
    assert reading in lines[1].lower()


def test_the_search_ranks_its_candidates_at_the_endpoint(tmp_path):
    """A trial whose last evaluation is lucky is not the best at last_2."""
    plan = plan_study("huber_sweep", [f"out_dir={tmp_path}", *TINY])

    def trial(name, c, curve):
        return Trial(run_id=name, name=name, axes={"loss.huber_c": repr(c), "seed": "0"}, batch_size=32,
                     status="FINISHED", stopped_early=False, curves={"eval/fid_1step": list(enumerate(curve))})
    trials = [trial("lucky", 0.01, [80.0, 40.0]), trial("steady", 0.02, [50.0, 50.0])]
    from ayt.studies.protocols.search_then_confirm import choose_candidates
    assert choose_candidates(trials, plan.space, plan.metric, 1)[0].trial == "lucky"
    best = choose_candidates(trials, plan.space, plan.metric, 1, Endpoint("last_k", 2))[0]
    assert (best.trial, best.search_score, best.search_final) == ("steady", 50.0, 50.0)
    assert BASELINE == "baseline"
