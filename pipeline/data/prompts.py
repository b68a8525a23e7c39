"""Prompts for sampling: Alpaca rows (rendered with the SFT template) or plain prompt files.

Each prompt gets a stable ``prompt_id`` (a hash of the rendered prompt), so candidates, shards and
selections are joined by id, never by position. Duplicate prompts are sampled once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pipeline.builtin.prompt_templates import render_prompt
from pipeline.data.sources import read_source
from pipeline.util.errors import DataError
from pipeline.util.text import raise_collected

PROMPT_COLUMNS = ("prompt", "text", "question")  # plain prompt files, e.g. {"question_id", "text", "category"}


@dataclass(frozen=True)
class PromptRecord:
    prompt_id: str
    prompt: Any  # rendered: text, or chat messages
    row: dict[str, Any]  # the source row (instruction/input and metadata such as a gold answer)


def prompt_id(prompt: Any) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def load_prompts(sources, template: str, seed: int = 0) -> tuple[list[PromptRecord], dict[str, Any]]:
    """Prompts of one source or a mixture (pipeline.config Mixture), each prompt once. Returns the records and
    counts: rows, prompts, duplicates (and the mixture's per-source summary when there is one)."""
    from pipeline.config import as_mixture
    from pipeline.data.mixture import Part, is_mixed, mix

    mixture = as_mixture(sources)
    if len(mixture.sources) == 1 and not is_mixed(mixture.sources[0]):
        return _load_source(mixture.sources[0], template)
    parts = []
    for source in mixture.sources:
        records, counts = _load_source(source, template)
        parts.append(Part(source.describe(), records, {"read": counts["rows"], "kept": counts["prompts"]}))
    mixed, summary = mix(parts, mixture, seed)
    unique, seen = [], set()
    for record in mixed:  # a prompt in two sources, or repeated by a weight, is sampled once
        if record.prompt_id not in seen:
            seen.add(record.prompt_id)
            unique.append(record)
    rows = sum(part.counts["read"] for part in parts)
    stats = {"rows": rows, "prompts": len(unique), "duplicates": len(mixed) - len(unique), "mixture": summary}
    return unique, stats


def stage_prompts(ctx, policy_stage: str) -> tuple[list[PromptRecord], dict[str, Any]]:
    """A sampling stage's ``prompts`` (bon, grpo, eval), rendered with its ``template`` or else the one
    ``policy_stage`` was trained with; a mixture's per-source counts are printed."""
    from pipeline.data.mixture import say_mixture

    template = ctx.cfg.template or ctx.recipe.policy_template(policy_stage)
    prompts, stats = load_prompts(ctx.resolve_source(ctx.cfg.prompts), template, ctx.seed)
    say_mixture(ctx.say, ctx.name, stats.get("mixture"), "prompts")
    return prompts, stats


def _load_source(source, template: str) -> tuple[list[PromptRecord], dict[str, int]]:
    rows = read_source(source)
    columns = set(rows.rows[0])
    fmt = source.format
    if fmt == "auto":
        fmt = "alpaca" if "instruction" in columns else "messages" if "messages" in columns else "prompts"
    if fmt not in ("alpaca", "prompts", "messages"):
        raise DataError(f"{rows.source}: format {fmt!r} cannot be used as prompts; use alpaca, messages or prompts")
    text_column = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if fmt == "prompts" and text_column is None:
        raise DataError(
            f"{rows.source}: no prompt column; expected 'instruction' (Alpaca) or one of {', '.join(PROMPT_COLUMNS)}, "
            f"found: {', '.join(sorted(columns))}. Map yours with columns: {{prompt: <your column>}}"
        )
    records, seen, problems = [], set(), []
    for i, row in enumerate(rows.rows):
        try:
            prompt = _render(row, fmt, text_column, template)
        except ValueError as exc:
            problems.append(f"{rows.at(i)}: {exc}")
            continue
        pid = prompt_id(prompt)
        if pid not in seen:
            seen.add(pid)
            records.append(PromptRecord(pid, prompt, row))
    raise_collected(problems, f"{len(problems)} bad prompt row(s) in {rows.source}:", DataError)
    return records, {"rows": len(rows), "prompts": len(records), "duplicates": len(rows) - len(records)}


def _render(row: dict, fmt: str, text_column: str | None, template: str):
    if fmt == "alpaca":
        for key in ("instruction", "input"):
            value = row.get(key)
            if key == "instruction" and (not isinstance(value, str) or not value.strip()):
                raise ValueError("'instruction' must be a non-empty string")
            if key == "input" and value is not None and not isinstance(value, str):
                raise ValueError(f"'input' must be a string, got {type(value).__name__}")
        return render_prompt(row, template)
    if fmt == "messages":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "user":
            raise ValueError("'messages' must be a list of {role, content} ending with the user's turn")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    value = row.get(text_column)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{text_column!r} must be a non-empty string")
    # A plain prompt is an instruction: rendered with the policy's SFT template, as it was trained.
    return render_prompt({"instruction": value, "input": ""}, template)
