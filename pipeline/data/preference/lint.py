"""The pair linter: drops (or rejects) identical, empty and over-long preference pairs, and reports length
statistics, length bias, duplicates and contradictions of the pairs it keeps.

No torch here: token counting is passed in by the caller.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from pipeline.data.chat_fit import is_template_error, refusal
from pipeline.data.preference.formats import PreferencePair
from pipeline.data.sft import percentiles
from pipeline.util.errors import DataError
from pipeline.util.text import MAX_REPORTED, raise_collected

_FIXES = {
    "identical": "chosen and rejected are identical (no preference signal)",
    "empty_side": "an empty response (the pair teaches 'say nothing' or 'never say nothing')",
    "prompt_too_long": "the prompt alone fills max_length (no response token would be trained)",
}


def _content(side: str | list[dict]) -> str:
    if isinstance(side, str):
        return side
    return "".join(m.get("content") or "" for m in side)


def _same(a: str | list[dict], b: str | list[dict]) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    if isinstance(a, list) and isinstance(b, list):
        return [(m.get("role"), (m.get("content") or "").strip()) for m in a] == [
            (m.get("role"), (m.get("content") or "").strip()) for m in b
        ]
    return _content(a).strip() == _content(b).strip()


def lint_pairs(
    pairs: list[PreferencePair],
    count_tokens: Callable[[Any], int] | None = None,
    max_length: int | None = None,
    action: str = "drop",
) -> tuple[list[PreferencePair], dict[str, Any]]:
    """Check pairs; drop (action="drop") or reject (action="error") the bad ones. Returns (kept, report).

    Problems: identical chosen and rejected (ignoring surrounding whitespace), an empty side, and a prompt
    that alone uses max_length tokens or more (checked only when count_tokens and max_length are given;
    count_tokens takes a string or a message list). The report (JSON-serialisable) has per-kind counts,
    the first offending rows, length statistics of each side of the kept pairs (tokens when count_tokens
    is given, else characters), the fraction of pairs where chosen is longer than rejected (a length-bias
    warning sign), duplicate and contradictory (same pair, both ways round) pair counts, and warnings.
    """
    check_prompt = count_tokens is not None and max_length is not None
    counts: Counter = Counter(dict.fromkeys(_FIXES, 0))
    examples: dict[str, list[str]] = {k: [] for k in _FIXES}
    offending: list[str] = []
    kept: list[PreferencePair] = []
    for pair in pairs:
        found = _pair_problems(pair, count_tokens if check_prompt else None, max_length)
        if not found:
            kept.append(pair)
            continue
        for kind, _ in found:
            counts[kind] += 1
            if len(examples[kind]) < MAX_REPORTED:
                examples[kind].append(pair.where)
        offending.append(f"{pair.where}: " + "; ".join(text for _, text in found))

    if action == "error":
        kinds = "; ".join(f"{k}: {n} — {_FIXES[k]}" for k, n in counts.items() if n)
        headline = (
            f"{len(offending)} of {len(pairs)} preference pair(s) fail the pair checks ({kinds}). "
            "Fix or remove these rows (give chosen and rejected different, non-empty responses; shorten the prompt "
            "or raise max_length), or set the lint action to drop:"
        )
        raise_collected(offending, headline, DataError)
    if not kept:
        raise DataError(
            f"no preference pairs left after the pair checks: all {len(pairs)} were dropped "
            f"({', '.join(f'{k}: {n}' for k, n in counts.items() if n)}); first: {offending[0] if offending else '-'}"
        )
    report = {
        "pairs": len(pairs),
        "kept": len(kept),
        "dropped": len(pairs) - len(kept),
        "action": action,
        "problems": dict(counts),
        "examples": {k: v for k, v in examples.items() if v},
        "prompt_length_checked": check_prompt,
        "max_length": max_length,
    }
    report.update(_length_report(kept, count_tokens))
    return kept, report


def _pair_problems(pair: PreferencePair, count_tokens, max_length) -> list[tuple[str, str]]:
    """(kind, description) of each problem of one pair; prompt length only when count_tokens is given."""
    found = []
    if _same(pair.chosen, pair.rejected):
        found.append(("identical", "chosen and rejected are identical"))
    empty = [k for k, side in (("chosen", pair.chosen), ("rejected", pair.rejected)) if not _content(side).strip()]
    if empty:
        found.append(("empty_side", f"{' and '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty"))
    if count_tokens is not None:
        n = count_pair_tokens(count_tokens, pair, pair.prompt)
        if n >= max_length:
            found.append(("prompt_too_long", f"the prompt alone is {n} tokens (max_length={max_length})"))
    return found


def _length_report(kept: list[PreferencePair], count_tokens) -> dict[str, Any]:
    """Length statistics of each side, the length-bias fractions, duplicates, contradictions, warnings."""

    def length(pair: PreferencePair, side: Any) -> int:
        return (
            count_pair_tokens(count_tokens, pair, side, response=True)
            if count_tokens is not None
            else len(_content(side))
        )

    chosen_len = [length(p, p.chosen) for p in kept]
    rejected_len = [length(p, p.rejected) for p in kept]
    n_kept = len(kept)
    longer = sum(c > r for c, r in zip(chosen_len, rejected_len))
    shorter = sum(c < r for c, r in zip(chosen_len, rejected_len))
    keys = Counter(_key(p.prompt, p.chosen, p.rejected) for p in kept)
    contradictions = sum(n for k, n in keys.items() if _swap(k) in keys)
    duplicates = sum(n - 1 for n in keys.values())
    warnings = []
    if n_kept >= 10:
        for side, frac in (("chosen", longer / n_kept), ("rejected", shorter / n_kept)):
            if frac >= 0.7:
                warnings.append(
                    f"{side} is longer than the other response in {frac:.0%} of pairs: a reward model or DPO can learn "
                    f"'{'longer' if side == 'chosen' else 'shorter'} is better' instead of the quality you label; "
                    "check the lengths, or balance them when building pairs"
                )
    if contradictions:
        warnings.append(f"{contradictions} pair(s) appear both ways round (A over B and B over A for the same prompt)")
    if duplicates:
        warnings.append(f"{duplicates} duplicate pair(s)")
    return {
        "length_unit": "tokens" if count_tokens is not None else "chars",
        "lengths": {"chosen": percentiles(chosen_len), "rejected": percentiles(rejected_len)},
        "chosen_longer_fraction": round(longer / n_kept, 4) if n_kept else None,
        "rejected_longer_fraction": round(shorter / n_kept, 4) if n_kept else None,
        "duplicates": duplicates,
        "contradictions": contradictions,
        "warnings": warnings,
    }


def count_pair_tokens(count_tokens: Callable, pair: PreferencePair, value: Any, response: bool = False) -> int:
    """Tokens of a pair's prompt or one response. A conversational response is counted after its prompt
    (``count_tokens(side, prompt=...)``): strict chat templates (Gemma, Mistral) refuse to render an
    assistant message alone. A template that refuses the conversation is a DataError naming the row."""
    try:
        if response and isinstance(value, list) and isinstance(pair.prompt, list):
            return int(count_tokens(value, prompt=pair.prompt))
        return int(count_tokens(value))
    except Exception as exc:
        if not is_template_error(exc):
            raise
        raise DataError(f"{pair.where}: {refusal(exc)}") from None


def _key(prompt: Any, chosen: Any, rejected: Any) -> str:
    return json.dumps([prompt, chosen, rejected], sort_keys=True, ensure_ascii=False)


def _swap(key: str) -> str:
    prompt, chosen, rejected = json.loads(key)
    return _key(prompt, rejected, chosen)
