"""Preference benchmarks in RewardBench's layout, scored by a reward stage after training.

A benchmark is a file (json, jsonl, parquet, ...) or Hub dataset of rows with ``prompt`` (the user's text, or a
message list), ``chosen`` and ``rejected`` (response strings), ``subset`` (a name) and an optional ``id``; other
columns (RewardBench's ``chosen_model``, ``rejected_model``) are ignored. A file with no ``subset`` column is one
subset, ``all``; a file that has the column needs it in every row (a half-labelled file is a mistake, not a
default). Rows are read with the explicit preference format's checks and rendered as the stage renders its
training prompts, so a benchmark pair is scored exactly as a held-out pair. Accuracy is the share of pairs whose
chosen response scores strictly above the rejected one (a tie counts as wrong), per subset and over all pairs.
No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.data.preference.formats import PreferencePair, _suggest_mapping, explicit_pair
from pipeline.data.preference.prepare import pair_to_record, render_pair
from pipeline.data.sources import RowProblem, Rows, read_source
from pipeline.util.errors import DataError
from pipeline.util.text import raise_collected

DEFAULT_SUBSET = "all"  # the one subset of a file without a subset column
REQUIRED = ("prompt", "chosen", "rejected")
LAYOUT = (
    "prompt (text or a message list), chosen and rejected (response strings), subset (a name, in every row or "
    "in none) and optionally id"
)


@dataclass
class Benchmark:
    """A benchmark's pairs as TRL records (prompt / chosen / rejected, rendered) and the subset of each."""

    name: str
    source: str
    records: list[dict[str, Any]]
    subsets: list[str]


def load_benchmark(name: str, source, template: str, key: str) -> Benchmark:
    """Read and check benchmark ``name`` (a resolved DataSource); ``template`` renders plain-text prompts as the
    stage's training prompts were (none: as written). Every problem is one DataError naming ``key`` (the recipe
    key, e.g. ``benchmarks.my_bench``), the file and each bad row."""
    try:
        rows = read_source(source)
    except DataError as exc:
        empty = f"; a benchmark needs at least one row of {LAYOUT}" if str(exc).endswith(": no rows") else ""
        raise DataError(f"{key}: {exc}{empty}") from None
    _check_columns(rows, key)
    pairs, subsets = _read_rows(rows, key)
    records = [pair_to_record(render_pair(pair, template)) for pair in pairs]
    return Benchmark(name, rows.source, records, subsets)


def _check_columns(rows: Rows, key: str) -> None:
    """A required column that no row has: one message with the mapping that fixes it, not one per row."""
    columns = set().union(*(row.keys() for row in rows.rows))
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise DataError(
            f"{key}: {rows.source} has no {', '.join(map(repr, missing))} column; a benchmark row needs {LAYOUT}. "
            f"Columns found: {', '.join(sorted(columns)) or '(none)'}. Map yours in the recipe: "
            f"{key}: {{path: ..., {_suggest_mapping(columns, missing)}}}"
        )


def _read_rows(rows: Rows, key: str) -> tuple[list[PreferencePair], list[str]]:
    """Each row as a pair and its subset; every bad row is collected into one error."""
    labelled = any("subset" in row for row in rows.rows)
    pairs, subsets, problems = [], [], []
    seen_ids: dict[Any, str] = {}
    for i, row in enumerate(rows.rows):
        where = rows.at(i) if i < len(rows.where) else f"{rows.source} row {i + 1}"
        try:
            pair = explicit_pair(row, where)
            if pair.chosen == pair.rejected:
                raise RowProblem("'chosen' and 'rejected' are the same text; no reward model can rank them")
            subset = _subset(row) if labelled else DEFAULT_SUBSET
            _check_id(row, where, seen_ids)
        except RowProblem as exc:
            problems.append(f"{where}: {exc}")
            continue
        pairs.append(pair)
        subsets.append(subset)
    raise_collected(
        problems,
        f"{key}: {len(problems)} bad row(s) in {rows.source}; fix or remove them (a benchmark row needs {LAYOUT}):",
        DataError,
    )
    return pairs, subsets


def _subset(row: dict) -> str:
    value = row.get("subset")
    if value is None:
        raise RowProblem(
            "'subset' is missing while other rows have one; give every row a subset, or drop the column to score "
            f"the file as one subset {DEFAULT_SUBSET!r}"
        )
    if not isinstance(value, str) or not value.strip():
        raise RowProblem(f"'subset' must be a non-empty name, got {value!r}")
    return value


def _check_id(row: dict, where: str, seen: dict[Any, str]) -> None:
    """Ids are optional; when given, unique (a repeated id is usually a file concatenated twice)."""
    value = row.get("id")
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowProblem(f"'id' must be a string or an integer, got {type(value).__name__} ({value!r})")
    if value in seen:
        raise RowProblem(f"'id' {value!r} repeats the id of {seen[value]}; ids must be unique")
    seen[value] = where


def accuracy_by_subset(subsets: list[str], wins: list[bool]) -> dict[str, Any]:
    """``{"pairs", "accuracy", "subsets": {subset: {"pairs", "accuracy"}}}``: accuracy over all pairs and per
    subset (in the order subsets first appear), rounded to 4 places. ``wins[i]``: chosen scored above rejected."""
    if len(subsets) != len(wins) or not wins:
        raise ValueError(f"{len(subsets)} subsets for {len(wins)} results; need one per pair, at least one")
    by_subset: dict[str, list[bool]] = {}
    for subset, won in zip(subsets, wins):
        by_subset.setdefault(subset, []).append(won)
    return {
        "pairs": len(wins),
        "accuracy": _share(wins),
        "subsets": {name: {"pairs": len(won), "accuracy": _share(won)} for name, won in by_subset.items()},
    }


def _share(wins: list[bool]) -> float:
    return round(sum(wins) / len(wins), 4)
