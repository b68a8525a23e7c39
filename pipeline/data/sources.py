"""Read rows from local files (json, jsonl, csv, parquet) or a Hub dataset, remembering where each came from;
plus what every data format shares: per-row problems, leftover columns, the held-out split."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.util.errors import DataError
from pipeline.util.text import raise_collected

T = TypeVar("T")


class RowProblem(Exception):
    """One bad row; the reader collects them and reports the file and row of each."""

    def __init__(self, message: str, reason: str = "bad_row"):
        super().__init__(message)
        self.reason = reason


def extra_columns(row: dict, used: tuple[str, ...]) -> dict[str, Any]:
    """The columns an adapter did not consume (kept as metadata, e.g. a gold answer)."""
    return {k: v for k, v in row.items() if k not in used}


def holdout_split(items: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held out): a seeded random ``fraction`` (at least one item) held out, order kept."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, int(len(items) * fraction))])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


@dataclass
class Rows:
    """Rows of one source with the location of each (for error messages)."""

    source: str
    rows: list[dict[str, Any]]
    # per row: "row 3 (line 4)" etc.
    where: list[str] = field(default_factory=list)

    def at(self, index: int) -> str:
        return f"{self.source} {self.where[index]}"

    def __len__(self) -> int:
        return len(self.rows)


def read_source(src) -> Rows:
    """Read a ``DataSource`` (see pipeline.config) and apply its column mapping and limit."""
    rows = _read_hub(src) if src.hub else read_file(Path(src.path))
    if src.limit is not None:
        rows.rows, rows.where = rows.rows[: src.limit], rows.where[: src.limit]
    if src.columns:
        rows = rename_columns(rows, src.columns)
    return rows


def read_file(path: Path) -> Rows:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".parquet":
            return _read_parquet(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8") from None
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl, .csv or .parquet")


def _read_jsonl(path: Path) -> Rows:
    rows, where, bad = [], [], []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append(f"{path} line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                bad.append(f"{path} line {lineno}: expected a JSON object per line, got {type(obj).__name__}")
                continue
            rows.append(obj)
            where.append(f"row {len(rows)} (line {lineno})")
    raise_collected(bad, "bad data rows (fix or remove these lines):", DataError)
    return _non_empty(Rows(str(path), rows, where))


def _read_json(path: Path) -> Rows:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (one per row), got {type(data).__name__}")
    bad = [
        f"{path} row {i}: expected an object, got {type(obj).__name__}"
        for i, obj in enumerate(data, 1)
        if not isinstance(obj, dict)
    ]
    raise_collected(bad, "bad data rows (every row must be a JSON object):", DataError)
    return _non_empty(Rows(str(path), data, [f"row {i}" for i in range(1, len(data) + 1)]))


def _read_csv(path: Path) -> Rows:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV file (no header row)")
        rows, where = [], []
        for row in reader:
            if None in row:
                raise DataError(
                    f"{path} line {reader.line_num}: more fields than the header has columns; quote values that contain commas"
                )
            rows.append(row)
            where.append(f"row {len(rows)} (line {reader.line_num})")
    return _non_empty(Rows(str(path), rows, where))


def _read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from None
    return _non_empty(Rows(str(path), rows, [f"row {i}" for i in range(1, len(rows) + 1)]))


def _read_hub(src) -> Rows:
    import datasets

    name = src.describe()
    files = {"data_dir": src.data_dir, "data_files": src.data_files}
    try:
        ds = datasets.load_dataset(
            src.hub, src.subset, split=src.split, **{k: v for k, v in files.items() if v is not None}
        )
    except Exception as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise DataError(
            f"{name}: could not load the Hub dataset: {type(exc).__name__}: {first} "
            "Check the id, subset, data_dir / data_files and split. To run offline: download the data and use 'path:' "
            "in the recipe, or load it once where there is a network and set HF_HUB_OFFLINE=1 to use the datasets cache."
        ) from None
    rows = ds.to_list()
    return _non_empty(Rows(name, rows, [f"row {i}" for i in range(1, len(rows) + 1)]))


def rename_columns(rows: Rows, mapping: dict[str, str]) -> Rows:
    """``mapping`` is canonical name -> column in the file."""
    columns = set().union(*(r.keys() for r in rows.rows[:100])) if rows.rows else set()
    missing = [f"{canon}: {col!r}" for canon, col in mapping.items() if col not in columns]
    if missing:
        raise DataError(
            f"{rows.source}: the column mapping names columns the data does not have ({', '.join(missing)}); "
            f"columns found: {', '.join(sorted(columns))}"
        )
    renamed = []
    for row in rows.rows:
        new = {k: v for k, v in row.items() if k not in mapping.values()}
        for canon, col in mapping.items():
            if col in row:
                new[canon] = row[col]
        renamed.append(new)
    return Rows(rows.source, renamed, rows.where)


def require_columns(rows: Rows, fmt: str, required, explain: str = "", suggest=None) -> None:
    """A declared format's columns must be in the first row; the error says how to map yours.
    ``suggest(columns, missing)`` may propose a better ``columns:`` mapping than the generic one."""
    columns = set(rows.rows[0]) if rows.rows else set()
    missing = [c for c in required if c not in columns]
    if missing:
        hint = suggest(columns, missing) if suggest else f"columns: {{{missing[0]}: <your column>}}"
        raise DataError(
            f"{rows.source}: format {fmt!r} needs column(s) {', '.join(map(repr, missing))}"
            + (f" ({explain})" if explain else "")
            + f", but the first row has: {', '.join(sorted(columns)) or '(none)'}. Map your column names in the recipe, e.g. {hint}"
        )


def _non_empty(rows: Rows) -> Rows:
    if not rows.rows:
        raise DataError(f"{rows.source}: no rows")
    return rows
