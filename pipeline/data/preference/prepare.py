"""Preference pairs for the stages that train on them (reward model, DPO): read, render, mix, split and lint
the sources into TRL's prompt/chosen/rejected records, with a summary of what was kept."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pipeline.builtin.prompt_templates import render_prompt
from pipeline.config import as_mixture
from pipeline.data.mixture import Part, is_mixed, mix, summary_lines
from pipeline.data.preference.formats import PreferencePair, assistant_turn, load_preference_pairs
from pipeline.data.preference.lint import lint_pairs
from pipeline.data.sources import holdout_split, read_source


def prepare_pairs(
    train_source, eval_source, cfg, count_tokens=None, seed: int = 0
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Read, adapt, render, mix, split and lint preference pairs.

    ``cfg`` is a PreferenceDataConfig; sources (``train_source`` may be a mixture) are already resolved to
    files or Hub ids. Returns TRL records (prompt/chosen/rejected) for train and held-out eval, and a summary
    for the stage output. The linter runs on the mix, so duplicates across sources are found too.
    """
    train_mix = as_mixture(train_source)
    parts, loaded = [], []
    for source in train_mix.sources:
        pairs, stats = _load(source, cfg)
        parts.append(Part(source.describe(), pairs, _source_counts(stats)))
        loaded.append(stats)
    train, mixture = mix(parts, train_mix, seed)
    summary: dict[str, Any] = {"train_source": loaded[0] if len(loaded) == 1 else loaded}
    if len(parts) > 1 or is_mixed(train_mix.sources[0]):
        summary["mixture"] = mixture
    if eval_source is not None:
        held, summary["eval_source"] = _load(eval_source, cfg)
    else:
        train, held = holdout_split(train, cfg.eval_fraction, seed)
    lint_kwargs = {
        "count_tokens": count_tokens,
        "max_length": cfg.max_length if count_tokens else None,
        "action": cfg.lint,
    }
    train, summary["train"] = lint_pairs(train, **lint_kwargs)
    if held:
        held, summary["eval"] = lint_pairs(held, **lint_kwargs)
    return [pair_to_record(p) for p in train], [pair_to_record(p) for p in held], summary


def _load(source, cfg) -> tuple[list[PreferencePair], dict[str, Any]]:
    pairs, stats = load_preference_pairs(read_source(source), source.format, cfg.ranked_strategy, cfg.on_bad_row)
    if cfg.template != "none":
        pairs = [_rendered(p, cfg.template) for p in pairs]
    return pairs, stats


def _source_counts(stats: dict[str, Any]) -> dict[str, Any]:
    """A source's read / kept / dropped for a mixture summary (kept: pairs, before the linter)."""
    return {"read": stats["rows"], "kept": stats["pairs"], "dropped": dict(stats.get("dropped") or {})}


def render_pair(pair: PreferencePair, template: str) -> PreferencePair:
    """A pair as a stage with ``data.template`` = ``template`` renders its training pairs (none: as written)."""
    return pair if template == "none" else _rendered(pair, template)


def _rendered(pair: PreferencePair, template: str) -> PreferencePair:
    """A plain-text prompt is an instruction: render it as SFT prompts were rendered."""
    if pair.conversational:
        return pair
    prompt = render_prompt({"instruction": pair.prompt, "input": ""}, template)
    if template == "chat":
        return replace(
            pair,
            prompt=prompt,
            chosen=assistant_turn(pair.chosen),
            rejected=assistant_turn(pair.rejected),
            lead=("", ""),
        )
    return replace(pair, prompt=prompt)


def summary_line(name: str, summary: dict[str, Any]) -> str:
    """One console line: pairs kept and dropped per split, and the linter's warnings."""
    parts = []
    for split in ("train", "eval"):
        rep = summary.get(split)
        if rep:
            reasons = ", ".join(f"{kind} {n}" for kind, n in rep.get("problems", {}).items() if n)
            parts.append(f"{split} {rep['kept']} pairs ({rep['dropped']} dropped{': ' + reasons if reasons else ''})")
    warnings = list(
        dict.fromkeys(w for split in ("train", "eval") for w in (summary.get(split) or {}).get("warnings", []))
    )
    line = f"[{name}] preference data: " + ", ".join(parts) + (f"; warnings: {'; '.join(warnings)}" if warnings else "")
    return "\n".join([line, *summary_lines(summary.get("mixture", []), "pairs")])


def pair_to_record(pair: PreferencePair) -> dict[str, Any]:
    """TRL's preference-dataset shape: {"prompt", "chosen", "rejected"}.

    Text pairs: strings. TRL tokenizes ``prompt + chosen`` as one string, so the separator stripped when
    an HH transcript was split (``pair.lead``) is put back in front of each response: the record's
    prompt + chosen is exactly the original transcript ("...Assistant: fine", not "...Assistant:fine").
    Conversational pairs: prompt messages, chosen / rejected as assistant message lists (copies).
    """
    if pair.conversational:
        return {
            "prompt": [dict(m) for m in pair.prompt],
            "chosen": [dict(m) for m in pair.chosen],
            "rejected": [dict(m) for m in pair.rejected],
        }
    return {"prompt": pair.prompt, "chosen": pair.lead[0] + pair.chosen, "rejected": pair.lead[1] + pair.rejected}
