"""studies/README.md (Results and its Archive) states numbers from the committed study CSVs, not
typed by hand: every "mean ± half-width" in a row of a results table must be a mean/CI pair of
that row's study in `studies/<name>/groups.csv`, rounded as written; every bracketed comparison,
paired CI width and verdict word is recomputed from trials.csv and curves.csv."""

from __future__ import annotations

import csv
import functools
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIR = re.compile(r"(\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)")
STUDY_LINK = re.compile(r"\]\((?:studies/)?([\w-]+)/report\.md\)")
RESULTS = ROOT / "studies" / "README.md"


def _results_text() -> str:
    """The Results section and the Archive after it (the archived studies' figures are checked too)."""
    text = RESULTS.read_text()
    return text.split("## Results", 1)[1]


def _results_rows() -> list[tuple[str, str]]:
    section = _results_text()
    rows = []
    for line in section.splitlines():
        link = STUDY_LINK.search(line)
        if line.startswith("|") and link:
            rows.append((link.group(1), line))
    return rows


def _pairs_in_csv(study: str) -> list[tuple[float, float]]:
    with (ROOT / "studies" / study / "groups.csv").open() as f:
        rows = list(csv.DictReader(f))
    pairs = []
    for row in rows:
        for key, value in row.items():
            if key.endswith("_mean"):
                half = row.get(key[: -len("_mean")] + "_ci95")
                try:
                    pairs.append((float(value), float(half)))
                except (TypeError, ValueError):
                    continue
    return [(m, h) for m, h in pairs if math.isfinite(m) and math.isfinite(h)]


def _written(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def test_every_mean_and_interval_in_the_results_table_comes_from_its_study_csv():
    """Every "mean ± half-width" of a table row or paragraph that links a study is a mean/CI pair
    of that study's groups.csv. Mutation caught: a hand-typed or stale figure (the results once
    said 529 ± 566 where the CSV holds 528.50 ± 566.4)."""
    blocks = [(study, text) for study, text, _ in _blocks() if study and not _critical_batch(study)]
    assert len(blocks) >= 6, "the Results lost their study rows and paragraphs"
    checked = 0
    for study, line in blocks:
        available = _pairs_in_csv(study)
        for mean, half in PAIR.findall(line):
            digits = len(mean.split(".")[1]) if "." in mean else 0
            found = any(_written(m, digits) == mean and _written(h, digits) == half for m, h in available)
            assert found, f"studies/README.md, {study}: '{mean} ± {half}' is not in studies/{study}/groups.csv"
            checked += 1
    assert checked >= 8, checked


# --- Comparisons, critical batch figures and verdict words -------------------------
# Every "estimate [low, high]" (a paired difference, a fitted B_noise with its bootstrap CI),
# every "paired CI(s) ±x(–y)", the B_simple figures and the initialisation a row names are
# recomputed here from the committed CSVs (trials.csv, curves.csv) and configs, with the
# functions the reports use (ayt.studies.report.stats, ayt.studies.report.critical_batch).

NUMBER = r"[+−-]?\d+(?:\.\d+)?"
BRACKET = re.compile(rf"({NUMBER}) \[({NUMBER}), ({NUMBER})\]")
DASH_CI = re.compile(r"(\d+(?:\.\d+)?) \((?:[^()]*?CI )?(\d+(?:\.\d+)?)–(\d+(?:\.\d+)?)\)")   # 11.5 (CI 9.2–27)
PAIRED_HALF = re.compile(r"paired(?: 95%)? CIs? ±(\d+(?:\.\d+)?)(?:–(\d+(?:\.\d+)?))?")
VERDICT = re.compile(r"\b(?:equal(?!\s+\d)|ties|tied|tie)\b", re.IGNORECASE)
WITHIN = re.compile(r"within ±(\d+(?:\.\d+)?)")
RULE = re.compile(r"\b(?:(none|sqrt|square-root|linear) (?:rule|lr scaling)|under (none|sqrt|linear)\b)")
INITS = {"from scratch": "scratch", "from the pretrained": "pretrained", "from a converged": "converged"}
FID = ("final_fid_1step", "final_fid_2step")
LOSSES = ("loss=mfd", "loss=pseudo_huber")


def _blocks() -> list[tuple[str | None, str, str]]:
    """(study, text, kind) of README Results: each table row with its study link, and each prose
    paragraph with the first study its text links (None when it links none)."""
    section = _results_text()
    blocks = []
    for paragraph in re.split(r"\n\s*\n", section):
        lines = paragraph.strip().splitlines()
        if not lines or lines[0].startswith("#"):
            continue
        if lines[0].startswith("|"):
            for line in lines:
                link = STUDY_LINK.search(line)
                if link:
                    blocks.append((link.group(1), line, "row"))
            continue
        prose = " ".join(lines)
        link = STUDY_LINK.search(prose)
        blocks.append((link.group(1) if link else None, prose, "prose"))
    return blocks


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9(*])|\s\|\s", text) if s.strip()]


def _csv(study: str, name: str) -> list[dict[str, str]]:
    with (ROOT / "studies" / study / name).open() as f:
        return list(csv.DictReader(f))


def _axes(row: dict[str, str]) -> dict[str, str]:
    return {k[len("axis."):]: v for k, v in row.items() if k.startswith("axis.") and k != "axis.seed"}


def _label(axes: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in axes.items())


@functools.lru_cache(maxsize=None)
def _paired(study: str) -> dict:
    """(group, metric) -> Comparison: every group against its reference (groups.csv), paired by
    seed on trials.csv, as the report computes it. A group's reference is the reference group
    sharing most of its axis values (one reference, or one per batch size and lr rule)."""
    from ayt.studies.report.stats import paired
    trials = _csv(study, "trials.csv")
    groups = {_label(_axes(t)): _axes(t) for t in trials}
    references = [g["group"] for g in _csv(study, "groups.csv") if g.get("vs_reference") == "reference"]
    out = {}
    for label, axes in groups.items():
        if label in references or not references:
            continue
        ref = max(references, key=lambda r: sum(groups[r].get(k) == v for k, v in axes.items()))
        for metric in FID:
            values = [{t["axis.seed"]: float(t[metric]) for t in trials if _label(_axes(t)) == g} for g in (label, ref)]
            out[(label, metric)] = paired(*values)
        for (metric, endpoint), scores in _endpoint_scores(study).items():
            values = [{seed: v for (g, seed), v in scores.items() if g == name} for name in (label, ref)]
            if all(values):
                out[(label, f"{metric}@{endpoint.label}")] = paired(*values)
    return out


@functools.lru_cache(maxsize=None)
def _endpoint_scores(study: str) -> dict:
    """(metric, endpoint) -> {(group, seed): score} of every trial's curve in curves.csv, at the
    endpoints a study can name (last_3 and auc; final is trials.csv's own column)."""
    from ayt.studies.protocols.endpoint import Endpoint
    rows = _csv(study, "curves.csv")
    curves: dict[tuple[str, str], dict[str, list]] = {}
    for r in rows:
        key = (_label(_axes(r)), r["axis.seed"])
        for column in ("fid_1step", "fid_2step"):
            if r.get(column) not in ("", None):
                curves.setdefault(key, {}).setdefault(column, []).append((float(r["images_seen"]), float(r[column])))
    out: dict = {}
    for endpoint in (Endpoint("last_k", 3), Endpoint("auc")):
        for key, by_metric in curves.items():
            for column, curve in by_metric.items():
                out.setdefault((f"final_{column}", endpoint), {})[key] = endpoint.score(curve)
    return out


def _noise_trials(study: str) -> list:
    """The study's trials rebuilt from curves.csv (FID and noise-scale curves), as the report
    loads them from MLflow; [] when the study did not measure the noise scale."""
    from ayt.metrics import eval_key
    from ayt.studies.report.write import Trial
    rows = _csv(study, "curves.csv")
    if not rows or "noise_scale" not in rows[0]:
        return []
    trials: dict[str, Trial] = {}
    for r in rows:
        if r["run"] not in trials:
            axes = {k[len("axis."):]: v for k, v in r.items() if k.startswith("axis.")}
            trials[r["run"]] = Trial(run_id=r["run"], name=r["run"], axes=axes, batch_size=int(r["axis.batch_size"]),
                                     status="FINISHED", stopped_early=False)
        for column in ("fid_1step", "fid_2step", "noise_scale"):
            if r[column] not in ("", None):
                trials[r["run"]].curves.setdefault(eval_key(column), []).append((int(r["iteration"]), float(r[column])))
    return list(trials.values())


@functools.lru_cache(maxsize=None)
def _critical_batch(study: str) -> dict:
    """B_noise fits per series (at the study's target scope), and B_simple over the run per loss
    (each trial's mean after its first evaluation; mean ± 95% CI over trials) with the MFD −
    pseudo-Huber difference paired by seed (each seed's mean over batch sizes and rules)."""
    import yaml
    from ayt.metrics import FID_1STEP
    from ayt.studies.report import critical_batch as cb
    from ayt.studies.report.stats import mean_ci, paired
    trials = _noise_trials(study)
    if not trials:
        return {}
    config = yaml.safe_load((ROOT / "conf" / "study" / f"{study}.yaml").read_text())
    m = cb.measure(trials, FID_1STEP, scope=cb.target_scope(config))
    run: dict[str, dict[str, list[float]]] = {}          # loss -> seed -> per-trial B_simple
    for t in trials:
        curve = [v for _, v in t.curves.get("eval/noise_scale", [])[1:] if math.isfinite(v)]
        if curve:
            loss = f"loss={t.axes['loss']}"
            run.setdefault(loss, {}).setdefault(t.seed, []).append(sum(curve) / len(curve))
    pooled = {loss: mean_ci([v for vs in seeds.values() for v in vs]) for loss, seeds in run.items()}
    per_seed = {loss: {s: sum(v) / len(v) for s, v in seeds.items()} for loss, seeds in run.items()}
    return {"fits": m.fits, "pooled": pooled,
            "paired": paired(per_seed[LOSSES[0]], per_seed[LOSSES[1]])}


def _same(written: str, value: float) -> bool:
    """`written` (signed or not, Unicode minus) is `value` rounded to as many decimals."""
    written = written.replace("−", "-")
    digits = len(written.split(".")[1]) if "." in written else 0
    if not math.isfinite(value):
        return False
    shown = f"{value:.{digits}f}"
    return float(shown) == float(written) and (written[0] != "-" or value < 0 or float(shown) == 0)


def _triples(study: str) -> list[tuple[float, float, float]]:
    found = [(c.estimate, c.low, c.high) for c in _paired(study).values()]
    cb = _critical_batch(study)
    if cb:
        found += [(f.b_noise, *f.ci) for f in cb["fits"].values()]
        found.append((cb["paired"].estimate, cb["paired"].low, cb["paired"].high))
    return found


def _attributed(study: str | None, sentence: str, rows: dict[str, str]) -> str | None:
    """The study a sentence speaks of: its block's study link, else a named report (a/b/c of
    the fair-comparison table) or the fine-tuning regime."""
    if study:
        return study
    named = re.search(r"\breport ([a-z])\b", sentence)
    if named and named.group(1) in rows:
        return rows[named.group(1)]
    return "finetune" if "fine-tun" in sentence.lower() else None


def _row_letters() -> dict[str, str]:
    letters = {}
    for study, text, kind in _blocks():
        first = text.strip("| ").split("|", 1)[0]
        letter = re.match(r"([a-z])\. ", first)
        if kind == "row" and letter:
            letters[letter.group(1)] = study
    return letters


def test_every_bracketed_comparison_is_recomputed_from_its_study_csvs():
    """Paired differences `+0.7 [−45.5, +46.9]` (trials.csv, paired by seed), fitted B_noise
    `11.5 [9.2, 27.0]` and the paired B_simple difference (curves.csv), each rounded as written.
    Mutation caught: any digit of a bracket changed, e.g. the 2-step difference typed +0.8."""
    checked = 0
    for study, text, _ in _blocks():
        if study is None:
            continue
        triples = _triples(study)
        figures = BRACKET.findall(text) + DASH_CI.findall(text)
        for figure in figures:
            assert any(all(_same(w, v) for w, v in zip(figure, t)) for t in triples), \
                f"README Results, {study}: '{figure[0]} [{figure[1]}, {figure[2]}]' is not a comparison or fit of studies/{study}"
            checked += 1
    assert checked >= 12, checked


def test_b_simple_and_b_noise_figures_come_from_curves_csv():
    """The critical batch paragraph: B_simple per loss (mean ± CI over trials) from curves.csv,
    every fitted B_noise stated with its CI, and a loss comparison of B_noise only where the
    CIs do not overlap. Mutation caught: 'B_noise ... about twice' where the sqrt-rule CIs
    9.2–27.0 and 2.6–12.9 overlap (an earlier README)."""
    paragraphs = [(s, t) for s, t, kind in _blocks() if kind == "prose" and s and _critical_batch(s)]
    assert paragraphs, "README Results lost its critical batch paragraph"
    for study, text in paragraphs:
        cb = _critical_batch(study)
        pooled = list(cb["pooled"].values())
        for mean, half in PAIR.findall(text):
            assert any(_same(mean, m) and _same(half, h) for m, h, _ in pooled), \
                f"'{mean} ± {half}' is not a B_simple of studies/{study}/curves.csv"
        for sentence in _sentences(text):
            if "B_simple" in sentence and "twice" in sentence:
                (m_mfd, _, _), (m_ph, _, _) = cb["pooled"][LOSSES[0]], cb["pooled"][LOSSES[1]]
                assert 1.5 <= m_mfd / m_ph <= 2.5 and cb["paired"].low > 0, sentence
            if ("B_noise" in sentence or "fitted critical batch" in sentence) and re.search(
                    r"\b(?:twice|larger|smaller|higher|lower|bigger|greater)\b", sentence):
                rules = sorted({{"square-root": "sqrt"}.get(x or y, x or y) for x, y in RULE.findall(sentence)})
                for rule in rules or ["none", "sqrt", "linear"]:
                    a, b = (cb["fits"][f"{loss}, lr_scaling={rule}"].ci for loss in LOSSES)
                    assert a[1] < b[0] or b[1] < a[0], \
                        f"README compares B_noise across losses under lr_scaling={rule}, but the CIs {a} and {b} overlap: {sentence[:160]}"
        stated = BRACKET.findall(text) + DASH_CI.findall(text)
        for series, fit in cb["fits"].items():
            assert any(all(_same(w, v) for w, v in zip(figure, (fit.b_noise, *fit.ci))) for figure in stated), \
                f"README does not state {series}'s B_noise with its CI ({fit.b_noise:.1f} [{fit.ci[0]:.1f}, {fit.ci[1]:.1f}])"


def test_paired_ci_widths_come_from_trials_csv():
    """`paired CIs ±2.7–3.5` (the fine-tuning regime) is the narrowest–widest half-width of the
    study's paired comparisons on one FID; `paired CI ±46` is one of them."""
    rows = _row_letters()
    checked = 0
    for study, text, _ in _blocks():
        for sentence in _sentences(text):
            for low, high in PAIRED_HALF.findall(sentence):
                owner = _attributed(study, sentence, rows)
                assert owner, f"README Results: which study are the paired CIs of? {sentence[:160]}"
                comparisons = _paired(owner)
                halves = {m: [(c.high - c.low) / 2 for (g, mm), c in comparisons.items() if mm == m] for m in FID}
                if high:
                    assert any(_same(low, min(h)) and _same(high, max(h)) for h in halves.values() if h), \
                        f"'±{low}–{high}' is not the range of studies/{owner}'s paired half-widths {halves}"
                else:
                    assert any(_same(low, v) for h in halves.values() for v in h), \
                        f"'±{low}' is not a paired half-width of studies/{owner} {halves}"
                checked += 1
    assert checked >= 2, checked


def test_no_equal_or_tie_verdict_wider_than_its_paired_cis():
    """'equal', 'tie(s)' is a verdict only within a stated tolerance ('within ±x') at least as
    wide as every paired CI of the study it speaks of (the FID it names, else both). Mutation
    caught: '2-step FID: equal' beside +0.7 [−45.5, +46.9], and 'tie within ±1 FID' where the
    fine-tuning CIs are ±2.7–3.5 (an earlier README)."""
    rows = _row_letters()
    for study, text, _ in _blocks():
        for sentence in _sentences(text):
            for clause in re.split(r";\s", sentence):
                if not VERDICT.search(clause):
                    continue
                owner = _attributed(study, sentence, rows)
                assert owner, f"README Results: a tie verdict with no study to check it against: {clause[:160]}"
                metrics = [m for m, words in (("final_fid_2step", ("2-step", "2 steps")),
                                              ("final_fid_1step", ("1-step", "1 step"))) if any(w in clause for w in words)]
                widest = max((c.high - c.low) / 2 for (g, m), c in _paired(owner).items() if m in (metrics or FID))
                within = WITHIN.search(clause)
                tolerance = float(within.group(1)) if within else 0.0
                assert tolerance >= widest, \
                    (f"README Results, {owner}: '{VERDICT.search(clause).group(0)}' within ±{tolerance:g}, but the paired "
                     f"CIs are up to ±{widest:.1f}: say 'unresolved' and give the CI ({clause[:120]})")


@functools.lru_cache(maxsize=None)
def _init(study: str) -> str:
    """training.init of the study's trials: its preset and fixed overrides (conf/study/<name>.yaml)
    on the base trial config."""
    import yaml
    from ayt.config import compose_config, load_config
    block = yaml.safe_load((ROOT / "conf" / "study" / f"{study}.yaml").read_text())
    if "preset" not in block:                        # set by the study defaults, not the study
        block = compose_config([f"+study={study}"]).study
    assert "training.init" not in (block.get("axes") or {}), f"studies/{study} sweeps training.init"
    return str(load_config([f"experiment={block['preset']}", *map(str, block.get("fixed") or [])]).training.init)


def test_a_row_names_the_initialisation_its_study_starts_from():
    """'From scratch' only on a row whose study sets training.init=scratch (and 'from the
    pretrained denoiser' / 'from a converged' model likewise). Mutation caught: row a said
    'From scratch' while speed_tuned starts from the pretrained denoiser."""
    named = 0
    for study, text, kind in _blocks():
        if kind != "row":
            continue
        question = text.strip("| ").split("|", 1)[0].lower()
        for phrase, init in INITS.items():
            if phrase in question:
                assert _init(study) == init, f"README Results row '{question[:60]}': studies/{study} starts from training.init={_init(study)}"
                named += 1
    assert named >= 1, named          # row a (fine-tuning left the table)


def _committed_studies() -> list[str]:
    """studies/<name>/ with a report and a conf/study/<name>.yaml (tuning stages and benchmarks
    have none)."""
    return sorted(p.parent.name for p in (ROOT / "studies").glob("*/report.md")
                  if (ROOT / "conf" / "study" / f"{p.parent.name}.yaml").exists())


def test_run_all_reruns_every_committed_study_and_the_readme_says_which():
    """run_all.sh's default list is every committed study, and README Results names them.
    Mutation caught: the default list of the six oldest studies, four newer ones committed."""
    script = (ROOT / "studies" / "run_all.sh").read_text()
    default = re.search(r"\|\|\s*names=\(([^)]*)\)", script)
    assert default, "studies/run_all.sh lost its default list"
    names = default.group(1).split()
    assert sorted(names) == _committed_studies(), names
    section = _results_text()
    said = re.search(r"`studies/run_all\.sh` runs ([^.]*)", section)
    assert said and all(f"`{n}`" in said.group(1) for n in names), "README: say which studies run_all.sh runs"


def test_the_readme_cpu_time_is_the_sum_of_the_committed_reports():
    """'sum to N minutes' is the sum of the study wall-clocks the committed reports state
    (tuning stages included). Mutation caught: '81 minutes … for the six committed studies'
    with ten studies and two tuning stages committed."""
    walls = {p.parent.name: float(re.search(r"study wall-clock ([\d.]+) min", p.read_text()).group(1))
             for p in (ROOT / "studies").glob("*/report.md") if "study wall-clock" in p.read_text()}
    section = _results_text()
    stated = re.search(r"wall-clocks \(.*?\) sum to (\d+)\s+minutes", section, re.S)
    assert stated, "README Results: state the reports' summed wall-clock (or drop the figure and this test)"
    assert int(stated.group(1)) == round(sum(walls.values())), (stated.group(1), walls)
