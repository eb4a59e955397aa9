"""A group of a study's trials: one point of its axes without the seed, as (axis, value) pairs
in axis order, e.g. (("batch_size", "16"), ("loss", "mfd")).

The report averages over a group's seeds, the critical batch size fits a series (a group
without its batch size), the protocol tunes per group: all of them take the group apart with
`without` / `get` / `replace` instead of building a string and splitting it again.

A group is named by its label, `batch_size=16, loss=mfd` ("all" for the one group of a study
without axes): it hashes, compares and sorts as that label, so a table keyed by groups is read
with the label the report prints (`fits["loss=mfd"]`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping


@functools.total_ordering
@dataclass(frozen=True, eq=False)
class Group:
    pairs: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, items: Iterable[tuple[str, Any]] | Mapping[str, Any]) -> "Group":
        """From (axis, value) pairs or a mapping, in their order; values as text (as MLflow stores params)."""
        pairs = items.items() if isinstance(items, Mapping) else items
        return cls(tuple((str(k), str(v)) for k, v in pairs))

    @property
    def label(self) -> str:
        return self.joined(", ") or "all"

    def joined(self, sep: str) -> str:
        """`key=value` pairs joined by `sep` ("" for no pairs): `loss=mfd,batch_size=16` names a
        group in `study.tuned`."""
        return sep.join(f"{k}={v}" for k, v in self.pairs)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.pairs)

    def get(self, key: str, default: str | None = None) -> str | None:
        return next((v for k, v in self.pairs if k == key), default)

    def part(self, key: str) -> str:
        """`key=value` of one axis ("" when the group has no such axis)."""
        value = self.get(key)
        return "" if value is None else f"{key}={value}"

    def without(self, *keys: str) -> "Group":
        return Group(tuple((k, v) for k, v in self.pairs if k not in keys))

    def replace(self, values: Mapping[str, Any]) -> "Group":
        """The same axes, `values` substituted where the group has the key (a reference group)."""
        return Group(tuple((k, str(values[k]) if k in values else v) for k, v in self.pairs))

    def matches(self, values: Mapping[str, str]) -> bool:
        """Every axis `values` names has that value here (a label over some of the axes)."""
        return all(self.get(k) == str(v) for k, v in values.items())

    def sort_key(self) -> tuple:
        """Numeric values in numeric order (batch 8 before 16), others after them by text."""
        return tuple((k, float(v)) if is_number(v) else (k, math.inf, v) for k, v in self.pairs)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.pairs)

    def __str__(self) -> str:
        return self.label

    def __hash__(self) -> int:
        return hash(self.label)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Group):
            return self.pairs == other.pairs
        if isinstance(other, str):
            return self.label == other
        return NotImplemented

    def __lt__(self, other: "Group | str") -> bool:
        return self.label < str(other)


def is_number(text: str | None) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False
