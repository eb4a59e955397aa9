"""The search section of the report (ayt/studies/report/search.py): a sampled study's
top trials, best so far, parameter importance from its own Optuna storage, responses and
interaction; its per-trial group table left to groups.csv/trials.csv; the random-search line.

The trials are synthetic (`ayt.bench.report_scale`: what the report_scale benchmark times):
`huber_sweep` (TPE over the log range loss.huber_c) with `lr` (log range), `lr_ref_batch`
(integer range) and `optimizer` (categorical) added; the final FID is a parabola in
log10(huber_c), +2 with radam, 3% noise; lr and lr_ref_batch do nothing. One store of 40 trials
in a real sqlite MLflow store with the Optuna study OptunaSearch would have left
(`plan.optuna_db`); the rest in memory. No Ray, no training.

Every test names in its docstring the change to the product code that it catches."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from ayt.bench.report_scale import search_plan, synthetic_search, synthetic_trials
from ayt.studies.report.search import (FANOVA_MIN, SearchSection, TOP_K, is_search, needed_trials, optuna_study,
                                       rounded, search_axes)
from ayt.studies.report.section import ReportContext
from ayt.studies.engine.space import Axis

STORE_TRIALS = 40          # > 20 groups (the group table becomes a note); < 50 (PED-ANOVA warns); = fANOVA's 40
DRIVER, NOISE = "loss__huber_c", "lr"


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return search_plan(tmp_path_factory.mktemp("search") / "out", STORE_TRIALS, skip_configs=True)


@pytest.fixture(scope="module")
def store(plan, tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('search-mlflow') / 'mlflow.db'}"
    return uri, synthetic_search(plan, uri)


def _variant(plan, name: str, **space):
    """The plan with another name (so another out_dir: no optuna.db there) and space fields."""
    return dataclasses.replace(plan, name=name, space=dataclasses.replace(plan.space, **space))


def _section(plan, trials):
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = ReportContext(plan, trials, out)
    return ctx, SearchSection().write(ctx)


def test_report_of_a_search_ranks_the_driving_parameter_first_from_the_optuna_storage(plan, store):
    """Mutations caught: importance read from anything but the study's Optuna storage when it
    exists, an evaluator not named or not run, the noise parameter ranked above the one that
    drives the metric, the too-few-trials warning missing (PED-ANOVA: 40 < 50) or given where
    the trials suffice (fANOVA: 40 = 10 x 4 parameters), the per-trial group table written into
    report.md, the top table not k rows of rounded values, the section not in SECTIONS."""
    from ayt.studies.report.write import write_report
    assert plan.optuna_db.is_file()
    summary = write_report(plan, *store)
    text = Path(summary["report"]).read_text()
    record = summary["search"]
    importance = record["importance"]
    for evaluator in ("ped_anova", "fanova"):
        ranked = list(importance[evaluator])
        assert ranked[0] == DRIVER and importance[evaluator][DRIVER] > importance[evaluator][NOISE], importance
    assert "the study's Optuna storage (`optuna.db`" in record["importance_source"]
    assert importance["complete_trials"] == STORE_TRIALS
    search = text.split("## Search (tpe, 40 trials)")[1].split("## Findings")[0]
    assert "`optuna.importance.PedAnovaImportanceEvaluator()`" in search
    assert "`optuna.importance.FanovaImportanceEvaluator(n_trees=32, max_depth=6, seed=0)`" in search
    warnings = [line for line in search.splitlines() if line.startswith("- **Warning**")]
    assert len(warnings) == 1 and "too few for PED-ANOVA (it needs about 50" in warnings[0]
    table = search.split("### Parameter importance")[1]
    assert table.index("| `loss.huber_c` |") < table.index("| `lr` |")
    top = [line for line in search.splitlines() if re.match(r"\| \d+ \| \d+ \| `", line)]
    assert len(top) == TOP_K and [r["final"] for r in record["top"]] == sorted(r["final"] for r in record["top"])
    best = record["top"][0]
    cells = top[0].rstrip(" |").split(" | ")          # rank, #, trial, final, huber_c, lr, lr_ref_batch, optimizer
    assert cells[4:] == [f"{best['loss.huber_c']:.3g}", f"{best['lr']:.3g}", str(best["lr_ref_batch"]),
                         best["optimizer"]]             # log ranges at 3 significant digits, an int, a category
    # the group table: one row per trial, left to groups.csv and trials.csv
    assert "| group |" not in text and "it is in `groups.csv`, every trial in `trials.csv`" in text
    assert len(Path(plan.out_dir, "trials.csv").read_text().splitlines()) == 1 + STORE_TRIALS
    names = {Path(f).name for f in summary["files"]}
    assert {"search_history.png", "search_response.png", "search_interaction.png", "groups.csv"} <= names
    assert "final_vs_axis.png" not in names            # replaced by search_response.png
    for figure in ("search_history.png", "search_response.png", "search_interaction.png"):
        assert f"![{figure}]({figure})" in search and text.count(f"![{figure}]") == 1
    assert "random search" not in text


def test_without_the_optuna_storage_the_study_is_rebuilt_from_the_trials(plan, store):
    """Mutations caught: no fallback when optuna.db is missing (the section failing), the
    rebuilt study built with other distributions or values than the trials' (another ranking),
    failed trials told as complete."""
    from ayt.studies.engine.trials import load_trials
    trials = load_trials(*store)
    missing = _variant(plan, "huber_sweep_no_db")
    assert not missing.optuna_db.exists()
    study, source = optuna_study(missing, trials, plan.metric)
    assert source.startswith("a study rebuilt from the MLflow trials")
    assert not missing.optuna_db.exists()              # nothing written where the search's storage would be
    _, output = _section(missing, trials)
    record = output.records["search"]
    assert record["importance_source"] == source
    assert list(record["importance"]["ped_anova"])[0] == DRIVER and list(record["importance"]["fanova"])[0] == DRIVER
    stored, _ = optuna_study(plan, trials, plan.metric)
    by_params = {tuple(sorted(t.params.items())): t.value for t in stored.trials}
    assert sorted(by_params.items()) == sorted((tuple(sorted(t.params.items())), t.value) for t in study.trials)


def test_a_search_within_the_samplers_start_up_is_reported_as_random(plan):
    """Mutations caught: the start-up trials hard-coded instead of read from the sampler
    tune_backend builds, `<=` turned into `<`, the line shown for a search past its start-up;
    one parameter given a computed importance instead of the trivial 1.0."""
    import optuna

    from ayt.studies.report.search import startup_trials
    from ayt.studies.engine.tune_backend import optuna_sampler
    startup = startup_trials(plan)
    assert startup == optuna_sampler(plan)._n_startup_trials == optuna.samplers.TPESampler()._n_startup_trials
    within = _variant(plan, "huber_sweep_random", num_samples=startup)
    _, output = _section(within, synthetic_trials(within))
    lines = [line for line in output.lines if "random search" in line]
    assert len(lines) == 1 and f"num_samples={startup} does not exceed the sampler's {startup}" in lines[0]
    assert output.records["search"]["random_search"] is True
    past = _variant(plan, "huber_sweep_past", num_samples=startup + 1)
    _, output = _section(past, synthetic_trials(past))
    assert not any("random search" in line for line in output.lines) and not output.records["search"]["random_search"]
    one = _variant(plan, "huber_sweep_one", axes=plan.space.axes[:1], num_samples=startup + 1)
    _, output = _section(one, synthetic_trials(one))
    assert "One parameter (`loss.huber_c`): its importance is trivially 1.0." in output.lines
    assert not any(Path(f).name == "search_interaction.png" for f in output.files)


def test_the_section_does_not_apply_to_a_grid(plan):
    """Mutations caught: the section (or the per-trial table note, or dropping final_vs_axis)
    applied to a grid study, or to a plan without a space (tests/test_report_golden.py pins the
    grid reports themselves)."""
    grid = dataclasses.replace(plan, space=dataclasses.replace(plan.space, search="grid"))
    trials = synthetic_trials(plan, 3)
    assert not is_search(grid) and not SearchSection().applies(ReportContext(grid, trials, Path(".")))
    assert not is_search(SimpleNamespace(name="demo"))
    assert SearchSection().applies(ReportContext(plan, trials, Path(".")))


def test_values_are_rounded_to_what_their_range_resolves():
    """Mutation caught: every value printed at full precision (the MLflow param string) or at
    one fixed number of decimals whatever the range."""
    assert rounded(Axis("c", low=1e-4, high=0.1, log=True), 0.0026911234) == "0.00269"
    assert rounded(Axis("p", low=0.05, high=0.5), 0.123456) == "0.123"
    assert rounded(Axis("beta", low=1.0, high=8.0), 3.14159) == "3.14"
    assert rounded(Axis("width", low=0, high=2000), 1234.56) == "1235"
    assert rounded(Axis("b", low=16, high=256, integer=True), 149.0) == "149"
    assert rounded(Axis("opt", values=("adam", "radam")), "radam") == "radam"
    assert needed_trials("ped_anova", 4) == 50 and needed_trials("fanova", 1) == FANOVA_MIN


def test_figures_of_a_thousand_trials_are_written_without_a_per_trial_legend(plan):
    """Mutations caught: a legend entry per trial (or per group) in any figure of a 1,000-trial
    search, the response panel of a log range on a linear axis, a categorical axis drawn as
    numbers, the interaction of other parameters than the two most important; enough trials
    still warned about."""
    import matplotlib.figure

    from ayt.studies.report.write import Figures
    big = _variant(plan, "huber_sweep_1000", num_samples=1000)
    trials = synthetic_trials(big)
    legends, scales = {}, {}
    save = matplotlib.figure.Figure.savefig

    def spy(fig, path, *args, **kwargs):
        name = Path(path).name
        legends[name] = [len(ax.get_legend().legend_handles) if ax.get_legend() else 0 for ax in fig.axes]
        scales[name] = [(ax.get_xlabel(), ax.get_xscale(), [t.get_text() for t in ax.get_xticklabels()])
                        for ax in fig.axes]
        return save(fig, path, *args, **kwargs)

    matplotlib.figure.Figure.savefig = spy
    try:
        ctx, output = _section(big, trials)
        ctx.outputs.append((SearchSection(), output))
        figures = Figures().write(ctx)
    finally:
        matplotlib.figure.Figure.savefig = save
    names = {Path(f).name for f in output.files + figures.files}
    assert names == {"search_history.png", "search_response.png", "search_interaction.png", "fid_1step.png",
                     "fid_2step.png"}
    for f in output.files + figures.files:
        assert Path(f).stat().st_size > 20_000, f
    assert all(n <= 3 for counts in legends.values() for n in counts), legends
    panels = {label: (scale, ticks) for label, scale, ticks in scales["search_response.png"] if label}
    assert panels["loss.huber_c (log)"][0] == "log" and panels["lr (log)"][0] == "log"
    assert panels["lr_ref_batch"][0] == "linear" and panels["optimizer"][1][:2] == ["adam", "radam"]
    assert scales["search_interaction.png"][0][0] == "loss.huber_c (log)"
    assert output.records["search"]["importance"]["complete_trials"] == 1000 - 1000 // 97
    assert not any(line.startswith("- **Warning**") for line in output.lines)
    assert [a.key for a in search_axes(big)] == ["loss.huber_c", "lr", "lr_ref_batch", "optimizer"]


def test_report_scale_is_a_registered_benchmark():
    """Mutation caught: the benchmark module not in the registry (`python -m ayt.bench
    report_scale` refused by the CLI, or not run by `all`)."""
    from ayt.bench import ALL, get_benchmark
    from ayt.bench.__main__ import parse_args
    from ayt.bench.report_scale import TARGET_S, bench_report_scale
    assert "report_scale" in ALL and get_benchmark("report_scale") is bench_report_scale and TARGET_S == 30.0
    which, opts, _ = parse_args(["report_scale", "--quick"])
    assert which == ["report_scale"] and opts.quick
