"""README "Results" states numbers from the committed study CSVs, not typed by hand: every
"mean ± half-width" in a row of the results table must be a mean/CI pair of that row's study
in `studies/<name>/groups.csv`, rounded as written."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIR = re.compile(r"(\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)")
STUDY_LINK = re.compile(r"\]\(studies/([\w-]+)/report\.md\)")


def _results_rows() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Results", 1)[1].split("\n## ", 1)[0]
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
    """Mutation caught: a hand-typed or stale figure (the README once said 529 ± 566 where
    the CSV holds 528.50 ± 566.4)."""
    rows = _results_rows()
    assert len(rows) >= 6, "the Results table lost its study rows"
    checked = 0
    for study, line in rows:
        available = _pairs_in_csv(study)
        for mean, half in PAIR.findall(line):
            digits = len(mean.split(".")[1]) if "." in mean else 0
            found = any(_written(m, digits) == mean and _written(h, digits) == half for m, h in available)
            assert found, f"README Results, {study}: '{mean} ± {half}' is not in studies/{study}/groups.csv"
            checked += 1
    assert checked >= 20
