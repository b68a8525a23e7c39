"""How much of its input a stage kept, said loudly.

Two checks every stage can make, so a run never trains quietly on a sliver of its data:

- ``keep_warning``: a stage kept less than half of what it was given (best-of-n prompts, SFT rows,
  preference pairs). The warning names the dominant cause and the setting that fixes it; stages print it
  and record it in their metrics under ``warnings`` (the report and results table show them).
- ``check_upstream_output`` / ``check_training_rows``: a training stage whose input is empty, or smaller
  than one batch, fails at its start, before any model loads, naming the earlier stage that produced it.

No torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.util.errors import DataError

MIN_KEPT_SHARE = 0.5


def keep_warning(subject: str, kept: int, total: int, causes: list[tuple[int, str]]) -> str | None:
    """``subject: kept K of N (p%): <largest cause>`` when fewer than half were kept, else None.
    ``causes``: (how many were lost to it, what happened and the fix)."""
    if total <= 0 or kept >= MIN_KEPT_SHARE * total:
        return None
    count, why = max(causes, key=lambda cause: cause[0], default=(0, ""))
    return f"{subject}: kept {kept} of {total} ({kept / total:.0%})" + (f"; {why}" if count else "")


def sft_warnings(name: str, summary: dict[str, Any]) -> list[str]:
    """An SFT stage whose length policy dropped most rows."""
    limit = summary.get("max_length")

    def causes(split: str, rep: dict[str, Any]) -> list[tuple[int, str]]:
        over, prompt = rep["dropped_overlength"], rep["dropped_prompt_too_long"]
        return [
            (
                over,
                f"{over} rows were longer than data.max_length={limit} (overlength: drop): "
                "raise data.max_length or set overlength: truncate",
            ),
            (prompt, f"{prompt} prompts alone reached data.max_length={limit}: raise data.max_length"),
        ]

    return _split_warnings(name, summary, "rows", "rows", causes)


def pair_warnings(name: str, summary: dict[str, Any]) -> list[str]:
    """A reward / DPO stage whose pair checks dropped most pairs."""

    def causes(split: str, rep: dict[str, Any]) -> list[tuple[int, str]]:
        return [
            (n, f"{n} pairs dropped as {kind.replace('_', ' ')} (see data_summary.json {split}.examples)")
            for kind, n in rep.get("problems", {}).items()
        ]

    return _split_warnings(name, summary, "pairs", "pairs", causes)


def _split_warnings(name: str, summary: dict[str, Any], unit: str, total_key: str, causes) -> list[str]:
    """keep_warning for the train and eval splits of a data summary."""
    found = []
    for split in ("train", "eval"):
        rep = summary.get(split)
        if rep:
            found.append(keep_warning(f"[{name}] {split} {unit}", rep["kept"], rep[total_key], causes(split, rep)))
    return [w for w in found if w]


def _upstream_origin(ctx, source, default_output: str, unit: str, kept: int | None = None) -> str:
    """Where a training stage's input comes from, for its error message."""
    from pipeline.config import Mixture

    if isinstance(source, Mixture):
        return "; ".join(_upstream_origin(ctx, s, default_output, unit, kept) for s in source.sources)
    if source.from_stage is None:
        return f"its input is {source.describe()}"
    stage, output = source.from_stage, source.output or default_output
    if kept is None:
        kept = count_rows(Path(ctx.resolve_source(source, default_output).path))
    entry = ctx.manifest.stage(stage)
    selected = (entry.get("metrics") or {}).get("select") or {}  # a selecting stage's counts per output
    where = f"{stage}/metrics.json" + (f" select.{output}" if output in selected else "")
    said = (entry.get("metrics") or {}).get("warnings") or []
    return (
        f"its input is the {output!r} output of stage {stage!r}, which kept {kept} {unit.split()[-1]} (see {where})"
        + (f"; {stage} warned: {said[0]}" if said else "")
    )


def count_rows(path: Path) -> int:
    with path.open(encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def check_upstream_output(ctx, source, unit: str, default_output: str) -> None:
    """An earlier stage's output that holds no rows: say which stage and why, not just 'no rows'."""
    from pipeline.config import source_list

    if len(source_list(source)) > 1:  # a mixture may take nothing from an empty source; mix() says when it must
        return
    source = source_list(source)[0] if source is not None else None
    if source is None or source.from_stage is None:
        return
    path = Path(ctx.resolve_source(source, default_output).path)
    if path.is_file() and count_rows(path) == 0:
        raise DataError(
            f"stage {ctx.name!r} has 0 {unit} to train on: {_upstream_origin(ctx, source, default_output, unit, 0)}"
        )


def check_training_rows(ctx, source, rows: int, unit: str, default_output: str) -> None:
    """At least one batch to train on (``train.batch_size`` per device), checked before any model loads."""
    batch = ctx.cfg.train.batch_size
    if rows >= batch and rows > 0:
        return
    origin = _upstream_origin(ctx, source, default_output, unit)
    if rows == 0:
        raise DataError(f"stage {ctx.name!r} has 0 {unit} to train on: {origin}")
    raise DataError(
        f"stage {ctx.name!r} has {rows} {unit} to train on, fewer than one batch (stages.{ctx.name}.train.batch_size="
        f"{batch}): {origin}. Give it more data or lower the batch size"
    )


def record(metrics: dict[str, Any], warnings: list[str], say) -> dict[str, Any]:
    """Print each warning and keep them in the stage's metrics."""
    for warning in warnings:
        say(f"WARNING {warning}")
    if warnings:
        metrics["warnings"] = list(dict.fromkeys(metrics.get("warnings", []) + warnings))
    return metrics
