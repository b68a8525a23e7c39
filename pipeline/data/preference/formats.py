"""Preference data formats: each shape users give rows in, read into one canonical pair.

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

Every problem names the file and row; the linter (lint.py) and the split assembly (prepare.py) come after.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.messages import clean_messages
from pipeline.data.sources import RowProblem, Rows, extra_columns, require_columns
from pipeline.util.errors import DataError, RecipeError
from pipeline.util.text import raise_collected

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
    # HH's "Assistant:"). prepare.pair_to_record puts it back so that prompt + chosen is the original text.
    lead: tuple[str, str] = ("", "")

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


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
    if on_bad_row == "error":
        counts = ", ".join(f"{r}: {n}" for r, n in reasons.most_common())
        headline = (
            f"{len(problems)} bad row(s) in {rows.source} (format {fmt}; {counts}); fix or remove them, "
            "or set on_bad_row: drop to skip them:"
        )
        raise_collected(problems, headline, DataError)
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


def _check_prompt_messages(prompt: list[dict], what: str) -> None:
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise RowProblem(f"{what} needs a user message with content", "bad_message")


def _prompt_value(row: dict) -> str | list[dict]:
    """A prompt column: a non-empty string, or a message list."""
    value = _need(row, "prompt")
    if isinstance(value, list):
        prompt = clean_messages(value, "prompt")
        _check_prompt_messages(prompt, "'prompt'")
        return prompt
    if not isinstance(value, str):
        raise RowProblem(
            f"'prompt' must be a string or a message list, got {type(value).__name__} ({_short(value)})", "wrong_type"
        )
    if not value.strip():
        raise RowProblem("'prompt' is empty", "empty")
    return value


def assistant_turn(text: str) -> list[dict[str, str]]:
    """A text response as the one assistant message of a conversational pair."""
    return [{"role": "assistant", "content": text}]


# A string column that holds a message list is conversational data read with the wrong format.
_LIST_HINT = "; for message lists use format conversational (or auto)"


def _from_explicit(row: dict, where: str) -> PreferencePair:
    prompt = _prompt_value(row)
    chosen, rejected = _string(row, "chosen", _LIST_HINT), _string(row, "rejected", _LIST_HINT)
    meta = extra_columns(row, ("prompt", "chosen", "rejected"))
    if isinstance(prompt, list):
        return PreferencePair(prompt, assistant_turn(chosen), assistant_turn(rejected), where, meta)
    return PreferencePair(prompt, chosen, rejected, where, meta)


def explicit_pair(row: dict, where: str) -> PreferencePair:
    """One explicit row (prompt, chosen, rejected) as a pair; RowProblem when it is bad. For callers that read
    rows one by one with checks of their own (preference benchmarks)."""
    return _from_explicit(row, where)


def _from_conversational(row: dict, where: str) -> PreferencePair:
    chosen = clean_messages(_need(row, "chosen"), "chosen")
    rejected = clean_messages(_need(row, "rejected"), "rejected")
    prompt_col = row.get("prompt")
    if isinstance(prompt_col, list):
        return _with_prompt_messages(row, where, prompt_col, chosen, rejected)
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
    return _from_transcripts(row, where, chosen, rejected)


def _with_prompt_messages(row: dict, where: str, prompt_col: list, chosen: list, rejected: list) -> PreferencePair:
    """A separate ``prompt`` message list: chosen / rejected are the assistant turn(s)."""
    prompt = clean_messages(prompt_col, "prompt")
    _check_prompt_messages(prompt, "'prompt'")
    n = len(prompt)
    # Some files repeat the prompt in front of each response; take it off.
    if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
        chosen, rejected = chosen[n:], rejected[n:]
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if side[0]["role"] != "assistant":
            raise RowProblem(
                f"prompt mismatch: {key!r} starts with a {side[0]['role']} message that does not repeat the 'prompt' "
                "messages; give chosen/rejected as the assistant turn(s) only, or as full transcripts starting with the prompt",
                "prompt_mismatch",
            )
        _check_last_is_assistant(key, side)
    return PreferencePair(prompt, chosen, rejected, where, extra_columns(row, ("prompt", "chosen", "rejected")))


def _from_transcripts(row: dict, where: str, chosen: list, rejected: list) -> PreferencePair:
    """Full transcripts: the prompt is everything before the final assistant message of each."""
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        _check_last_is_assistant(key, side)
    p_chosen, p_rejected = chosen[:-1], rejected[:-1]
    if p_chosen != p_rejected:
        raise RowProblem(
            f"prompt mismatch: chosen and rejected differ at message {_first_difference(p_chosen, p_rejected)} before "
            f"their final assistant turn (chosen has {len(chosen)} messages, rejected {len(rejected)}); only the last "
            "assistant message may differ",
            "prompt_mismatch",
        )
    _check_prompt_messages(p_chosen, "the conversation before the final assistant message")
    # A text 'prompt' column beside full transcripts (e.g. UltraFeedback) is kept as metadata.
    meta = extra_columns(row, ("chosen", "rejected"))
    return PreferencePair(p_chosen, chosen[-1:], rejected[-1:], where, meta)


def _check_last_is_assistant(key: str, side: list[dict]) -> None:
    if side[-1]["role"] != "assistant":
        raise RowProblem(
            f"the last message of {key!r} must be the assistant's (role is {side[-1]['role']!r})", "bad_message"
        )


def _first_difference(a, b) -> int:
    """Index of the first item where sequences ``a`` and ``b`` differ (the shorter length when one is a prefix)."""
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


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
    chosen, rejected = _string(row, "chosen", _LIST_HINT), _string(row, "rejected", _LIST_HINT)
    p_c, r_c, lead_c = split_transcript(chosen, "chosen", (human, assistant))
    p_r, r_r, lead_r = split_transcript(rejected, "rejected", (human, assistant))
    if p_c != p_r:
        k = _first_difference(p_c, p_r)
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
    """The pairs ``strategy`` picks from one ranked row, and how many candidate pairs were ties."""
    prompt = _prompt_value(row)
    responses, scores = _ranking(row)
    order, ties = _ranked_order(scores, strategy)
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
            pairs.append(
                PreferencePair(prompt, assistant_turn(responses[c]), assistant_turn(responses[r]), where, pair_meta)
            )
        else:
            pairs.append(PreferencePair(prompt, responses[c], responses[r], where, pair_meta))
    return pairs, ties


def _ranking(row: dict) -> tuple[list[str], list[float]]:
    """A ranked row's responses and their scores: 2+ strings, one finite number each."""
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
    return responses, scores


def _ranked_order(scores: list[float], strategy: str) -> tuple[list[tuple[int, int]], int]:
    """(chosen index, rejected index) of each pair ``strategy`` makes, and the tied pairs it skipped."""
    n = len(scores)
    best = max(range(n), key=lambda j: scores[j])  # first of the best
    if strategy == "best_vs_worst":
        worst = min(range(n), key=lambda j: scores[j])
        return ([(best, worst)], 0) if scores[best] > scores[worst] else ([], 1)
    if strategy == "best_vs_each":
        others = [j for j in range(n) if j != best]
        order = [(best, j) for j in others if scores[best] > scores[j]]
        return order, len(others) - len(order)
    order, ties = [], 0  # all_pairs
    for a in range(n):
        for b in range(a + 1, n):
            if scores[a] == scores[b]:
                ties += 1
            else:
                order.append((a, b) if scores[a] > scores[b] else (b, a))
    return order, ties
