"""Preference data for reward models and DPO: user shapes -> one canonical pair, plus a pair linter.

Formats (``format=``, or "auto" to detect from the first row's columns):

- explicit        prompt, chosen, rejected as strings. A ``prompt`` that is a message list makes the
                  pair conversational (the string responses become ``[{"role": "assistant", ...}]``).
                  The best-of-n stage's pairs (prompt_id, chosen_score, margin, answer, ...) are this
                  format; every other column goes to ``meta``.
- conversational  chosen / rejected as message lists. Full transcripts (they contain the user turn):
                  the shared messages before the final assistant message are the prompt. Or a
                  ``prompt`` message list with chosen / rejected holding the assistant turn(s).
- implicit        chosen / rejected as whole text transcripts (Anthropic HH). Split at the last
                  assistant turn marker, never at a character prefix (TRL's implicit-prompt split
                  turns "...A: 34" vs "...A: 35" into prompt "...A: 3").
- ranked          prompt, responses (list of strings) and scores (list of numbers) -> pairs.

Every problem names the file and row. No torch here: token counting is passed in by the caller.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.sources import MAX_REPORTED, RowProblem, Rows, extra_columns, holdout_split, require_columns
from pipeline.util.errors import DataError, RecipeError

ROLES = ("system", "user", "assistant")
HH_MARKERS = ("\n\nHuman:", "\n\nAssistant:")  # (human, assistant) turn markers of Anthropic HH

# Columns each format needs (what detection and the error messages go by).
REQUIRED = {
    "explicit": ("prompt", "chosen", "rejected"),
    "conversational": ("chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "ranked": ("prompt", "responses", "scores"),
}
NEEDS = {
    "explicit": "prompt, chosen, rejected (strings; prompt may be a message list)",
    "conversational": "chosen, rejected as lists of {role, content} messages (optional prompt message list)",
    "implicit": "chosen, rejected as whole text transcripts sharing their earlier turns (Anthropic HH style), no prompt column",
    "ranked": "prompt, responses (list of 2+ strings), scores (list of numbers, one per response)",
}
# Column names people use for the canonical ones: only for suggesting a `columns:` mapping.
_ALIASES = {
    "prompt": ("question", "instruction", "query", "input", "context", "history", "prompt_text"),
    "chosen": ("chosen_response", "response_chosen", "preferred", "winner", "accepted", "good", "better", "positive"),
    "rejected": ("rejected_response", "response_rejected", "dispreferred", "loser", "bad", "worse", "negative"),
    "responses": ("completions", "candidates", "outputs", "generations", "answers", "samples"),
    "scores": ("ratings", "rewards", "score", "rating", "reward", "labels"),
}


@dataclass
class PreferencePair:
    """One preference pair. Text pairs hold strings; conversational pairs hold message lists
    (prompt messages, and chosen / rejected as lists of assistant message(s))."""

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    where: str  # "data.jsonl row 3 (line 3)", for messages
    meta: dict = field(default_factory=dict)  # the other columns (scores, prompt_id, answer, ...)
    # Text removed from the start of chosen / rejected when splitting a transcript (the space after
    # HH's "Assistant:"). pair_to_record puts it back so that prompt + chosen is the original text.
    lead: tuple[str, str] = ("", "")

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


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


# ----------------------------------------------------------------------------------------------
# Format detection
# ----------------------------------------------------------------------------------------------


def detect_preference_format(rows: Rows, declared: str = "auto") -> str:
    """The format to read ``rows`` as: ``declared`` (after checking its columns) or detected from row 1.

    auto: responses + scores -> ranked; chosen + rejected with a list ``chosen`` -> conversational;
    chosen + rejected + prompt -> explicit; chosen + rejected (strings, no prompt) -> implicit.
    """
    if not rows.rows:
        raise DataError(f"{rows.source}: no rows")
    first = rows.rows[0]
    columns = set(first)
    found = ", ".join(sorted(columns)) or "(none)"
    if declared != "auto":
        require_columns(rows, declared, REQUIRED[declared], explain=NEEDS[declared], suggest=_suggest_mapping)
        return declared
    if "responses" in columns and "scores" in columns:
        if "prompt" not in columns:
            raise DataError(
                f"{rows.source}: looks like ranked data (responses, scores) but has no 'prompt' column; "
                f"columns found: {found}. Map it in the recipe, e.g. {_suggest_mapping(columns, ['prompt'])}"
            )
        return "ranked"
    if "chosen" in columns and "rejected" in columns:
        if isinstance(first["chosen"], list):
            return "conversational"
        if "prompt" in columns:
            return "explicit"
        return "implicit"
    wanted = "\n  ".join(f"{fmt}: {need}" for fmt, need in NEEDS.items())
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in columns]
    raise DataError(
        f"{rows.source}: cannot tell the preference data format from its columns ({found}). Expected one of:\n  "
        f"{wanted}\n"
        f"If your columns are named differently, map them in the recipe, e.g. {_suggest_mapping(columns, missing)}"
    )


def _suggest_mapping(columns: set[str], missing: list[str]) -> str:
    lowered = {c.lower(): c for c in columns}
    parts = []
    for canon in missing:
        guess = next((lowered[a] for a in _ALIASES.get(canon, ()) if a in lowered), None)
        parts.append(f"{canon}: {guess if guess else '<your column>'}")
    return "columns: {" + ", ".join(parts) + "}"


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_preference_pairs(
    rows: Rows,
    format: str = "auto",
    ranked_strategy: str = "best_vs_worst",
    on_bad_row: str = "error",
    turn_markers: tuple[str, str] = HH_MARKERS,
) -> tuple[list[PreferencePair], dict[str, Any]]:
    """Adapt ``rows`` to canonical pairs. Returns (pairs, stats).

    stats: source, format, rows, pairs, skipped_ties, split_failures, bad_rows, dropped {reason: n}
    (and ranked_strategy, rows_without_pairs for ranked data). Bad rows raise one DataError naming the
    file and row of each (on_bad_row="error"), or are dropped and counted by reason ("drop").
    All pairs must have one shape (all text or all conversational): TRL needs a uniform dataset.
    """
    human, assistant = turn_markers
    if not human or not assistant:
        raise RecipeError(f"turn_markers must be two non-empty strings (human, assistant), got {turn_markers!r}")
    fmt = detect_preference_format(rows, format)
    stats: dict[str, Any] = {
        "source": rows.source,
        "format": fmt,
        "rows": len(rows),
        "pairs": 0,
        "skipped_ties": 0,
        "split_failures": 0,
        "bad_rows": 0,
        "dropped": {},
    }
    if fmt == "ranked":
        stats.update(ranked_strategy=ranked_strategy, rows_without_pairs=0)

    pairs, problems, reasons = _adapt_rows(rows, fmt, stats, ranked_strategy, (human, assistant))
    stats["bad_rows"] = len(problems)
    if problems and on_bad_row == "error":
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        counts = ", ".join(f"{r}: {n}" for r, n in reasons.most_common())
        raise DataError(
            f"{len(problems)} bad row(s) in {rows.source} (format {fmt}; {counts}); fix or remove them, "
            "or set on_bad_row: drop to skip them:\n  " + "\n  ".join(problems[:MAX_REPORTED]) + more
        )
    stats["dropped"] = dict(reasons)
    stats["pairs"] = len(pairs)
    if not pairs:
        if problems:
            raise DataError(
                f"{rows.source}: no usable preference rows: all {len(rows)} row(s) were dropped "
                f"({', '.join(f'{r}: {n}' for r, n in reasons.most_common())}); first problem: {problems[0]}"
            )
        raise DataError(
            f"{rows.source}: no preference pairs: the scores of every row are tied "
            f"({stats['skipped_ties']} tied pair(s) skipped); a pair needs a strictly higher score for chosen"
        )
    return pairs, stats


def _adapt_rows(rows: Rows, fmt: str, stats: dict[str, Any], ranked_strategy: str, markers: tuple[str, str]):
    """Every row through its format's adapter: (pairs, problems as 'where: what', Counter of reasons)."""
    pairs: list[PreferencePair] = []
    problems: list[str] = []
    reasons: Counter = Counter()
    shape: tuple[str, str] | None = None  # (kind, where) of the first good pair
    for i, row in enumerate(rows.rows):
        where = _at(rows, i)
        try:
            got = _adapt_row(row, where, fmt, stats, ranked_strategy, markers)
            if got:
                kind = "conversational" if got[0].conversational else "text"
                if shape is None:
                    shape = (kind, where)
                elif kind != shape[0]:
                    raise RowProblem(
                        f"this row is {kind} but {shape[1]} is {shape[0]}; all rows must be the same shape "
                        "(all text prompts, or all message-list prompts)",
                        "mixed_shapes",
                    )
            pairs.extend(got)
        except RowProblem as exc:
            reasons[exc.reason] += 1
            if exc.reason == "unsplittable":
                stats["split_failures"] += 1
            problems.append(f"{where}: {exc}")
    return pairs, problems, reasons


def _adapt_row(row: dict, where: str, fmt: str, stats: dict[str, Any], ranked_strategy: str, markers: tuple[str, str]):
    if fmt == "explicit":
        return [_from_explicit(row, where)]
    if fmt == "conversational":
        return [_from_conversational(row, where)]
    if fmt == "implicit":
        return [_from_implicit(row, where, *markers)]
    got, ties = _from_ranked(row, where, ranked_strategy)
    stats["skipped_ties"] += ties
    if not got:
        stats["rows_without_pairs"] += 1
    return got


def _at(rows: Rows, i: int) -> str:
    return rows.at(i) if i < len(rows.where) else f"{rows.source} row {i + 1}"


def _short(value: Any, n: int = 40) -> str:
    return repr(str(value)[:n])


def _need(row: dict, key: str) -> Any:
    if key not in row or row[key] is None:
        raise RowProblem(f"{key!r} is missing", "missing")
    return row[key]


def _string(row: dict, key: str, hint: str = "") -> str:
    value = _need(row, key)
    if not isinstance(value, str):
        raise RowProblem(f"{key!r} must be a string, got {type(value).__name__} ({_short(value)}){hint}", "wrong_type")
    return value


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    """Validate a message list; keep role and content only."""
    if not isinstance(value, list):
        raise RowProblem(
            f"{key!r} must be a list of {{role, content}} messages, got {type(value).__name__} ({_short(value)})",
            "wrong_type",
        )
    if not value:
        raise RowProblem(f"{key!r} is an empty message list", "empty")
    from pipeline.data.sft import _sharegpt_message

    clean = []
    for j, msg in enumerate(value):
        msg = _sharegpt_message(msg)  # {"from": "human", "value": ...} turns are read as {"role": "user", ...}
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            hint = (
                " (from/value messages: rename them to role/content)" if isinstance(msg, dict) and "from" in msg else ""
            )
            raise RowProblem(f"{key}[{j}] must be an object with 'role' and 'content'{hint}", "bad_message")
        if msg["role"] not in ROLES:
            raise RowProblem(f"{key}[{j}].role is {msg['role']!r}; expected one of {', '.join(ROLES)}", "bad_role")
        if not isinstance(msg["content"], str):
            raise RowProblem(f"{key}[{j}].content must be a string, got {type(msg['content']).__name__}", "bad_message")
        clean.append({"role": msg["role"], "content": msg["content"]})
    return clean


def _check_prompt_messages(prompt: list[dict], what: str) -> None:
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise RowProblem(f"{what} needs a user message with content", "bad_message")


def _prompt_value(row: dict) -> str | list[dict]:
    """A prompt column: a non-empty string, or a message list."""
    value = _need(row, "prompt")
    if isinstance(value, list):
        prompt = _messages(value, "prompt")
        _check_prompt_messages(prompt, "'prompt'")
        return prompt
    if not isinstance(value, str):
        raise RowProblem(
            f"'prompt' must be a string or a message list, got {type(value).__name__} ({_short(value)})", "wrong_type"
        )
    if not value.strip():
        raise RowProblem("'prompt' is empty", "empty")
    return value


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _from_explicit(row: dict, where: str) -> PreferencePair:
    prompt = _prompt_value(row)
    hint = "; for message lists use format conversational (or auto)"
    chosen, rejected = _string(row, "chosen", hint), _string(row, "rejected", hint)
    meta = extra_columns(row, ("prompt", "chosen", "rejected"))
    if isinstance(prompt, list):
        return PreferencePair(prompt, _assistant(chosen), _assistant(rejected), where, meta)
    return PreferencePair(prompt, chosen, rejected, where, meta)


def _from_conversational(row: dict, where: str) -> PreferencePair:
    chosen = _messages(_need(row, "chosen"), "chosen")
    rejected = _messages(_need(row, "rejected"), "rejected")
    prompt_col = row.get("prompt")
    if isinstance(prompt_col, list):
        # Separate prompt: chosen / rejected are the assistant turn(s). Some files repeat the prompt in
        # front of each response; take it off.
        prompt = _messages(prompt_col, "prompt")
        _check_prompt_messages(prompt, "'prompt'")
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
            chosen, rejected = chosen[n:], rejected[n:]
        for key, side in (("chosen", chosen), ("rejected", rejected)):
            if side[0]["role"] != "assistant":
                raise RowProblem(
                    f"prompt mismatch: {key!r} starts with a {side[0]['role']} message that does not repeat the 'prompt' "
                    "messages; give chosen/rejected as the assistant turn(s) only, or as full transcripts starting with the prompt",
                    "prompt_mismatch",
                )
            if side[-1]["role"] != "assistant":
                raise RowProblem(
                    f"the last message of {key!r} must be the assistant's (role is {side[-1]['role']!r})", "bad_message"
                )
        return PreferencePair(prompt, chosen, rejected, where, extra_columns(row, ("prompt", "chosen", "rejected")))
    if prompt_col is not None and not isinstance(prompt_col, str):
        raise RowProblem(
            f"'prompt' must be a message list (or absent), got {type(prompt_col).__name__} ({_short(prompt_col)})",
            "wrong_type",
        )
    if all(m["role"] == "assistant" for m in chosen + rejected):
        raise RowProblem(
            "chosen and rejected hold only assistant messages, so the prompt must come from a 'prompt' column "
            "holding a message list" + (" (this row's 'prompt' is text)" if isinstance(prompt_col, str) else ""),
            "missing",
        )
    # Full transcripts: the prompt is everything before the final assistant message of each.
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if side[-1]["role"] != "assistant":
            raise RowProblem(
                f"the last message of {key!r} must be the assistant's (role is {side[-1]['role']!r})", "bad_message"
            )
    p_chosen, p_rejected = chosen[:-1], rejected[:-1]
    if p_chosen != p_rejected:
        k = next(
            (j for j, (a, b) in enumerate(zip(p_chosen, p_rejected)) if a != b), min(len(p_chosen), len(p_rejected))
        )
        raise RowProblem(
            f"prompt mismatch: chosen and rejected differ at message {k} before their final assistant turn "
            f"(chosen has {len(chosen)} messages, rejected {len(rejected)}); only the last assistant message may differ",
            "prompt_mismatch",
        )
    _check_prompt_messages(p_chosen, "the conversation before the final assistant message")
    # A text 'prompt' column beside full transcripts (e.g. UltraFeedback) is kept as metadata.
    meta = extra_columns(row, ("chosen", "rejected"))
    return PreferencePair(p_chosen, chosen[-1:], rejected[-1:], where, meta)


def split_transcript(text: str, key: str = "text", turn_markers: tuple[str, str] = HH_MARKERS) -> tuple[str, str, str]:
    """Split a transcript at its last assistant marker: (prompt ending with the marker, response, lead).

    ``lead`` is the one leading space taken off the response (HH writes "Assistant: reply").
    Raises RowProblem("unsplittable") when there is no assistant turn, no human turn before it, or a
    human turn after it.
    """
    human, assistant = turn_markers
    idx = text.rfind(assistant)
    if idx < 0:
        raise RowProblem(f"{key!r} has no {assistant!r} turn, so the prompt cannot be split off", "unsplittable")
    prompt, response = text[: idx + len(assistant)], text[idx + len(assistant) :]
    if human in response:
        raise RowProblem(
            f"{key!r} ends with a {human!r} turn after its last {assistant!r} turn; the transcript must end with the assistant's reply",
            "unsplittable",
        )
    if human not in prompt and not prompt.lstrip().startswith(human.strip()):
        raise RowProblem(f"{key!r} has no {human!r} turn before its final {assistant!r} turn", "unsplittable")
    lead = " " if response.startswith(" ") else ""
    return prompt, response[len(lead) :], lead


def _from_implicit(row: dict, where: str, human: str, assistant: str) -> PreferencePair:
    hint = "; for message lists use format conversational (or auto)"
    chosen, rejected = _string(row, "chosen", hint), _string(row, "rejected", hint)
    p_c, r_c, lead_c = split_transcript(chosen, "chosen", (human, assistant))
    p_r, r_r, lead_r = split_transcript(rejected, "rejected", (human, assistant))
    if p_c != p_r:
        k = next((j for j, (a, b) in enumerate(zip(p_c, p_r)) if a != b), min(len(p_c), len(p_r)))
        raise RowProblem(
            f"chosen and rejected differ before their final {assistant!r} turn (first at character {k}: "
            f"chosen {p_c[max(0, k - 15) : k + 15]!r} vs rejected {p_r[max(0, k - 15) : k + 15]!r}); "
            "only the last assistant reply may differ",
            "unsplittable",
        )
    return PreferencePair(p_c, r_c, r_r, where, extra_columns(row, ("chosen", "rejected")), (lead_c, lead_r))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _from_ranked(row: dict, where: str, strategy: str) -> tuple[list[PreferencePair], int]:
    prompt = _prompt_value(row)
    responses, scores = _need(row, "responses"), _need(row, "scores")
    if not isinstance(responses, list):
        raise RowProblem(
            f"'responses' must be a list of strings, got {type(responses).__name__} ({_short(responses)})", "wrong_type"
        )
    if not isinstance(scores, list):
        raise RowProblem(
            f"'scores' must be a list of numbers, got {type(scores).__name__} ({_short(scores)})", "wrong_type"
        )
    if len(responses) < 2:
        raise RowProblem(f"'responses' has {len(responses)} item(s); a ranking needs at least 2", "too_few_responses")
    if len(responses) != len(scores):
        raise RowProblem(
            f"'responses' has {len(responses)} items but 'scores' has {len(scores)}; give one score per response",
            "length_mismatch",
        )
    for j, r in enumerate(responses):
        if not isinstance(r, str):
            raise RowProblem(f"responses[{j}] must be a string, got {type(r).__name__} ({_short(r)})", "wrong_type")
    for j, s in enumerate(scores):
        if not _number(s):
            raise RowProblem(f"scores[{j}] must be a finite number, got {type(s).__name__} ({_short(s)})", "bad_score")

    n = len(scores)
    best = max(range(n), key=lambda j: scores[j])  # first of the best
    if strategy == "best_vs_worst":
        worst = min(range(n), key=lambda j: scores[j])
        order, ties = ([(best, worst)], 0) if scores[best] > scores[worst] else ([], 1)
    elif strategy == "best_vs_each":
        others = [j for j in range(n) if j != best]
        order = [(best, j) for j in others if scores[best] > scores[j]]
        ties = len(others) - len(order)
    else:  # all_pairs
        order, ties = [], 0
        for a in range(n):
            for b in range(a + 1, n):
                if scores[a] == scores[b]:
                    ties += 1
                else:
                    order.append((a, b) if scores[a] > scores[b] else (b, a))
    meta = extra_columns(row, ("prompt", "responses", "scores"))
    pairs = []
    for c, r in order:
        pair_meta = {
            **meta,
            "chosen_index": c,
            "rejected_index": r,
            "chosen_score": scores[c],
            "rejected_score": scores[r],
            "margin": scores[c] - scores[r],
        }
        if isinstance(prompt, list):
            pairs.append(PreferencePair(prompt, _assistant(responses[c]), _assistant(responses[r]), where, pair_meta))
        else:
            pairs.append(PreferencePair(prompt, responses[c], responses[r], where, pair_meta))
    return pairs, ties


# ----------------------------------------------------------------------------------------------
# Pair linter
# ----------------------------------------------------------------------------------------------

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

    if offending and action == "error":
        more = f"\n  ... and {len(offending) - MAX_REPORTED} more" if len(offending) > MAX_REPORTED else ""
        kinds = "; ".join(f"{k}: {n} — {_FIXES[k]}" for k, n in counts.items() if n)
        raise DataError(
            f"{len(offending)} of {len(pairs)} preference pair(s) fail the pair checks ({kinds}). "
            "Fix or remove these rows (give chosen and rejected different, non-empty responses; shorten the prompt "
            "or raise max_length), or set the lint action to drop:\n  " + "\n  ".join(offending[:MAX_REPORTED]) + more
        )
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
        "lengths": {"chosen": length_stats(chosen_len), "rejected": length_stats(rejected_len)},
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
        if type(exc).__name__ != "TemplateError":  # jinja2's, raised by the tokenizer's chat template
            raise
        raise DataError(
            f"{pair.where}: the model's chat template refuses this conversation ({exc}). Strict templates (Gemma, "
            "Mistral) take no system turn and need user/assistant turns alternating, starting with the user: merge a "
            "system message into the first user message and drop repeated roles"
        ) from None


def _key(prompt: Any, chosen: Any, rejected: Any) -> str:
    return json.dumps([prompt, chosen, rejected], sort_keys=True, ensure_ascii=False)


def _swap(key: str) -> str:
    prompt, chosen, rejected = json.loads(key)
    return _key(prompt, rejected, chosen)


def length_stats(values: list[int]) -> dict[str, float]:
    """min / p50 / p90 / p99 / max / mean (nearest-rank percentiles)."""
    from pipeline.data.sft import percentiles

    return percentiles(values)


# ----------------------------------------------------------------------------------------------
# One loader for the stages that train on pairs (reward model, DPO)
# ----------------------------------------------------------------------------------------------


def prepare_pairs(
    train_source, eval_source, cfg, count_tokens=None, seed: int = 0
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Read, adapt, render, mix, split and lint preference pairs.

    ``cfg`` is a PreferenceDataConfig; sources (``train_source`` may be a mixture) are already resolved to
    files or Hub ids. Returns TRL records (prompt/chosen/rejected) for train and held-out eval, and a summary
    for the stage output. The linter runs on the mix, so duplicates across sources are found too.
    """
    from pipeline.config.schema import as_mixture
    from pipeline.data.mixture import Part, is_mixed, mix

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
    from pipeline.data.sources import read_source

    pairs, stats = load_preference_pairs(read_source(source), source.format, cfg.ranked_strategy, cfg.on_bad_row)
    if cfg.template != "none":
        pairs = [_rendered(p, cfg.template) for p in pairs]
    return pairs, stats


def _source_counts(stats: dict[str, Any]) -> dict[str, Any]:
    """A source's read / kept / dropped for a mixture summary (kept: pairs, before the linter)."""
    return {"read": stats["rows"], "kept": stats["pairs"], "dropped": dict(stats.get("dropped") or {})}


def _rendered(pair: PreferencePair, template: str) -> PreferencePair:
    """A plain-text prompt is an instruction: render it as SFT prompts were rendered."""
    from dataclasses import replace

    from pipeline.data.templates import render_prompt

    if pair.conversational:
        return pair
    prompt = render_prompt({"instruction": pair.prompt, "input": ""}, template)
    if template == "chat":
        return replace(
            pair, prompt=prompt, chosen=_assistant(pair.chosen), rejected=_assistant(pair.rejected), lead=("", "")
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
    from pipeline.data.mixture import summary_lines

    line = f"[{name}] preference data: " + ", ".join(parts) + (f"; warnings: {'; '.join(warnings)}" if warnings else "")
    return "\n".join([line, *summary_lines(summary.get("mixture", []), "pairs")])
