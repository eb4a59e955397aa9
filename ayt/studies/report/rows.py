"""What the study report's parts share (`report`, `report_tangent`, ...): a group's label and
rows written as CSV. Its own module so that the parts import it, not each other."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ayt.studies.engine.group import Group


def group_label(group) -> str:
    """`loss=mfd, batch_size=16` for a group's (key, value) pairs; "all" for the one group of none."""
    return Group.of(group).label


def write_rows(rows: list[dict[str, Any]], path: Path) -> str:
    """`rows` (without their `comparisons`) as CSV at `path`, columns in first-seen order."""
    rows = [{k: v for k, v in row.items() if k != "comparisons"} for row in rows]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)
