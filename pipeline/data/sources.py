"""Read rows from local files (json, jsonl, csv, tsv, parquet; also compressed) or a Hub dataset, remembering where each came from;
plus what every data format shares: per-row problems, leftover columns, the held-out split."""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config.data import file_type
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


# Compressed files are recognised by their first bytes as well as by their name (a gzip file saved as .jsonl).
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def read_file(path: Path) -> Rows:
    """Rows of a local file: json, jsonl (.ndjson), csv, tsv or parquet, each also gzip / bz2 / xz / zstd
    compressed; UTF-8 with or without a byte-order mark, UTF-16 with one; CRLF or LF line ends; blank lines
    skipped. Every error names the file and the row (or line)."""
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a data file; name the file itself")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        kind, compression = file_type(path)
    except ValueError as exc:
        raise DataError(f"{path}: {str(exc).split(': ', 1)[1]}") from None
    try:
        with path.open("rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc}); check its permissions") from None
    if head.startswith(_LFS_POINTER):
        raise DataError(
            f"{path} is a Git LFS pointer, not the data (the repository was cloned without git-lfs); "
            "run 'git lfs install && git lfs pull' in its repository, or download the file itself"
        )
    compression = next((name for magic, name in _MAGIC if head.startswith(magic)), None) or compression
    readers = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "tsv": _read_csv, "parquet": _read_parquet}
    try:
        return readers[kind](path, compression)
    except UnicodeDecodeError as exc:
        decompressed = " of the decompressed data" if compression else ""
        raise DataError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}{decompressed}); save the file as UTF-8"
        ) from None
    except DataError:
        raise
    except (OSError, EOFError, ValueError, *_decompression_errors()) as exc:
        if compression is not None:  # gzip, bz2, lzma, zlib and pyarrow each raise their own
            raise DataError(
                f"{path}: cannot decompress it as {compression} ({type(exc).__name__}: {exc}); the file is damaged "
                "or cut short: download or compress it again"
            ) from None
        if isinstance(exc, OSError):
            raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
        raise


def _decompression_errors() -> tuple[type[BaseException], ...]:
    import lzma
    import zlib

    return (lzma.LZMAError, zlib.error)


def _open_binary(path: Path, compression: str | None) -> io.BufferedIOBase:
    """The file's bytes, decompressed."""
    if compression is None:
        return path.open("rb")
    if compression == "gzip":
        import gzip

        return gzip.open(path, "rb")
    if compression == "bz2":
        import bz2

        return bz2.open(path, "rb")
    if compression == "xz":
        import lzma

        return lzma.open(path, "rb")
    try:  # zstd: the zstandard package when installed, else pyarrow's codec (a dependency)
        import zstandard

        return zstandard.open(path, "rb")
    except ImportError:
        import pyarrow as pa

        return io.BufferedReader(pa.CompressedInputStream(pa.OSFile(str(path)), "zstd"))


def _open_text(path: Path, compression: str | None) -> io.TextIOWrapper:
    """The file as text: UTF-8 (a byte-order mark dropped) or UTF-16 with its byte-order mark; universal
    newlines are left to the caller (csv wants newline='')."""
    raw = _open_binary(path, compression)
    buffered = raw if hasattr(raw, "peek") else io.BufferedReader(raw)
    bom = buffered.peek(4)[:4]
    encoding = "utf-16" if bom[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    return io.TextIOWrapper(buffered, encoding=encoding, newline="")


def _read_jsonl(path: Path, compression: str | None = None) -> Rows:
    with _open_text(path, compression) as fh:
        lines = iter(fh)  # split at LF, CRLF or CR; a line keeps its end, which JSON reads as whitespace
        skipped = []
        for line in lines:
            if line.strip():
                if line.lstrip().startswith("["):  # a JSON list saved as .jsonl: read it as the JSON it is
                    return _json_rows(path, "".join(skipped) + line + fh.read())
                return _jsonl_rows(path, itertools.chain(skipped, [line], lines))
            skipped.append(line)
    return _non_empty(Rows(str(path), [], []))


def _jsonl_rows(path: Path, lines: Iterable[str]) -> Rows:
    rows, where, bad = [], [], []
    for lineno, line in enumerate(lines, start=1):
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


def _read_json(path: Path, compression: str | None = None) -> Rows:
    with _open_text(path, compression) as fh:
        text = fh.read()
    return _json_rows(path, text)


def _json_rows(path: Path, text: str) -> Rows:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            # JSON Lines in a .json file: what datasets' Dataset.to_json and pandas' to_json(lines=True) write
            return _jsonl_rows(path, text.splitlines())
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        raise DataError(
            f"{path}: a JSON object of columns (what pandas' DataFrame.to_json() writes by default), not a list of "
            "rows; write it with to_json(orient='records') or to_json(orient='records', lines=True)"
        )
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (one per row), got {type(data).__name__}")
    bad = [
        f"{path} row {i}: expected an object, got {type(obj).__name__}"
        for i, obj in enumerate(data, 1)
        if not isinstance(obj, dict)
    ]
    raise_collected(bad, "bad data rows (every row must be a JSON object):", DataError)
    return _non_empty(Rows(str(path), data, [f"row {i}" for i in range(1, len(data) + 1)]))


def _read_csv(path: Path, compression: str | None = None) -> Rows:
    tab = file_type(path)[0] == "tsv"
    with _open_text(path, compression) as fh:
        header = fh.readline()
        # Excel in many locales writes ';'-separated .csv files; a header with no comma but a ';' or a tab is one
        delimiter = "\t" if tab else next((d for d in (",", ";", "\t") if d in header), ",")
        reader = csv.DictReader(itertools.chain([header], fh), delimiter=delimiter)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty {'TSV' if tab else 'CSV'} file (no header row)")
        rows, where = [], []
        for row in reader:
            if None in row:
                raise DataError(
                    f"{path} line {reader.line_num}: more fields than the header has columns; quote values that "
                    f"contain {'tabs' if delimiter == chr(9) else 'commas' if delimiter == ',' else repr(delimiter)}"
                )
            rows.append(row)
            where.append(f"row {len(rows)} (line {reader.line_num})")
    return _non_empty(Rows(str(path), rows, where))


def _read_parquet(path: Path, compression: str | None = None) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if compression is None:
            table = pq.read_table(path)
        else:
            with _open_binary(path, compression) as fh:
                table = pq.read_table(pa.BufferReader(fh.read()))
        rows = table.to_pylist()
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
