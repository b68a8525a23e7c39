"""Instruction data for SFT: Alpaca, messages, ShareGPT and prompt/completion rows -> validated prompt/completion examples.

Validation runs before any model loads and names the file and row of every problem. The length policy
needs a token counter, which the stage passes in, so this module stays torch-free.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.builtin.prompt_templates import render_prompt
from pipeline.data.messages import clean_messages
from pipeline.data.sources import RowProblem, Rows, extra_columns, read_source, require_columns
from pipeline.util.errors import DataError
from pipeline.util.text import raise_collected

REQUIRED = {
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
}


@dataclass
class Example:
    """One training example: prompt and completion (strings, or message lists for chat templates)."""

    prompt: Any
    completion: Any
    where: str
    meta: dict[str, Any] = field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "completion": self.completion}


def detect_format(rows: Rows, declared: str) -> str:
    columns = set(rows.rows[0])
    if declared != "auto":
        require_columns(rows, declared, REQUIRED[declared])
        return declared
    for fmt in ("messages", "sharegpt", "alpaca", "prompt_completion"):
        if all(c in columns for c in REQUIRED[fmt]):
            return fmt
    wanted = "; ".join(f"{fmt}: {', '.join(cols)}" for fmt, cols in REQUIRED.items())
    raise DataError(
        f"{rows.source}: cannot tell the data format from its columns ({', '.join(sorted(columns)) or 'none'}). "
        f"Expected one of — {wanted}. If your columns are named differently, map them in the recipe, "
        "e.g. columns: {instruction: question, output: answer}"
    )


def load_sft_examples(source, template: str) -> tuple[list[Example], str]:
    """Read and validate one source. Returns the examples and the detected format."""
    rows = read_source(source)
    fmt = detect_format(rows, source.format)
    if fmt in ("messages", "sharegpt") and template != "chat":
        raise DataError(
            f"{rows.source}: conversational 'messages' data needs the tokenizer's chat template; "
            "set 'template: chat' in the stage's data settings"
        )
    convert = {
        "alpaca": _from_alpaca,
        "messages": _from_messages,
        "sharegpt": _from_sharegpt,
        "prompt_completion": _from_prompt_completion,
    }[fmt]
    examples, problems = [], []
    for i, row in enumerate(rows.rows):
        try:
            examples.append(convert(row, template, rows.at(i)))
        except RowProblem as exc:
            problems.append(f"{rows.at(i)}: {exc}")
    raise_collected(
        problems, f"{len(problems)} bad row(s) in {rows.source} (format {fmt}); fix or remove them:", DataError
    )
    return examples, fmt


def _text(row: dict, key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise RowProblem(f"{key!r} is missing")
        return ""
    if not isinstance(value, str):
        raise RowProblem(f"{key!r} must be a string, got {type(value).__name__} ({str(value)[:40]!r})")
    if required and not value.strip():
        raise RowProblem(f"{key!r} is empty")
    return value


def _from_alpaca(row: dict, template: str, where: str) -> Example:
    instruction, output = _text(row, "instruction"), _text(row, "output")
    input_ = _text(row, "input", required=False)
    clean = {"instruction": instruction, "input": input_, "output": output}
    prompt = render_prompt(clean, template)
    completion = [{"role": "assistant", "content": output}] if template == "chat" else output
    return Example(prompt, completion, where, extra_columns(row, ("instruction", "input", "output")))


def _from_prompt_completion(row: dict, template: str, where: str) -> Example:
    prompt, completion = _text(row, "prompt"), _text(row, "completion")
    if template == "chat":
        return Example(
            [{"role": "user", "content": prompt}],
            [{"role": "assistant", "content": completion}],
            where,
            extra_columns(row, ("prompt", "completion")),
        )
    return Example(prompt, completion, where, extra_columns(row, ("prompt", "completion")))


def _from_messages(row: dict, template: str, where: str) -> Example:
    clean = clean_messages(row.get("messages"), "messages", non_empty_content=True)
    if clean[-1]["role"] != "assistant":
        raise RowProblem("the last message must be the assistant's (it is what the model learns to write)")
    if not any(m["role"] == "user" for m in clean[:-1]):
        raise RowProblem("needs at least one user message before the assistant's")
    return Example(clean[:-1], clean[-1:], where, extra_columns(row, ("messages",)))


def _from_sharegpt(row: dict, template: str, where: str) -> Example:
    """ShareGPT rows: ``conversations`` holding {from, value} turns (human / gpt / system)."""
    return _from_messages(
        {**extra_columns(row, ("conversations",)), "messages": row.get("conversations")}, template, where
    )


# ----------------------------------------------------------------------------------------------
# Length policy and summary
# ----------------------------------------------------------------------------------------------


@dataclass
class LengthReport:
    rows: int
    kept: int
    dropped_overlength: int = 0
    dropped_prompt_too_long: int = 0
    truncated: int = 0
    duplicates: int = 0
    token_lengths: dict[str, float] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list, repr=False)  # every row's tokens, for merging reports

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "lengths"}

    def source_counts(self) -> dict[str, Any]:
        """read / kept / dropped (reason -> n) for a mixture's per-source summary."""
        dropped = {"overlength": self.dropped_overlength, "prompt_too_long": self.dropped_prompt_too_long}
        return {"read": self.rows, "kept": self.kept, "dropped": dropped, "truncated": self.truncated}


def merge_reports(reports: list[LengthReport], kept: list[Example]) -> LengthReport:
    """One report for a mixture's sources: their counts added, lengths and duplicates over ``kept`` (the mix)."""
    lengths = [n for r in reports for n in r.lengths]
    merged = LengthReport(rows=sum(r.rows for r in reports), kept=sum(r.kept for r in reports), lengths=lengths)
    for key in ("dropped_overlength", "dropped_prompt_too_long", "truncated"):
        setattr(merged, key, sum(getattr(r, key) for r in reports))
    merged.duplicates = _duplicates(kept)
    merged.token_lengths = percentiles(lengths)
    return merged


def _duplicates(examples: list[Example]) -> int:
    seen = Counter(repr(ex.as_record()) for ex in examples)
    return sum(c - 1 for c in seen.values())


def apply_length_policy(
    examples: list[Example],
    count_tokens: Callable[[Example], tuple[int, int]],
    max_length: int,
    policy: str,
    source: str,
) -> tuple[list[Example], LengthReport]:
    """Apply the recipe's over-length policy. ``count_tokens`` returns (prompt tokens, total tokens).

    truncate: TRL cuts the sequence at max_length (the end of the response is lost, counted here);
    a row whose prompt alone fills max_length has nothing left to learn from and is dropped.
    """
    kept, lengths = [], []
    report = LengthReport(rows=len(examples), kept=0)
    over = []
    for ex in examples:
        prompt_len, total = count_tokens(ex)
        lengths.append(total)
        if total <= max_length:
            kept.append(ex)
            continue
        over.append(f"{ex.where}: {total} tokens (prompt {prompt_len})")
        if policy == "drop":
            report.dropped_overlength += 1
        elif policy == "truncate":
            if prompt_len >= max_length:
                report.dropped_prompt_too_long += 1
            else:
                report.truncated += 1
                kept.append(ex)
    if policy == "error":
        headline = (
            f"{len(over)} row(s) of {source} are longer than max_length={max_length} tokens "
            "(set overlength: truncate or drop, or raise max_length):"
        )
        raise_collected(over, headline, DataError)
    if not kept:
        raise DataError(f"{source}: no rows left after applying max_length={max_length} ({policy}); raise max_length")
    report.duplicates = _duplicates(kept)
    report.kept = len(kept)
    report.lengths = lengths
    report.token_lengths = percentiles(lengths)
    return kept, report


def percentiles(values: list[int]) -> dict[str, float]:
    """min / p50 / p90 / p99 / max / mean (nearest-rank percentiles); {} for no values."""
    if not values:
        return {}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))])

    return {
        "min": float(ordered[0]),
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": float(ordered[-1]),
        "mean": round(statistics.fmean(ordered), 2),
    }
