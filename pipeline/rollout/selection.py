"""Select training data from scored best-of-n candidates.

The best-of-n stage samples n responses per prompt, scores them and writes
candidates; everything here is a pure function over those candidates. A
candidate is a dict::

    {"prompt_id": str, "prompt": str | list[dict], "sample_idx": int,
     "response": str, "score": float | bool, "finish_reason": "eos" | "length",
     "row": dict}

Candidates are grouped by explicit ``prompt_id``, never by position, so
shuffled or interleaved input selects the same data. Stdlib only: this is
imported by stages and tests that must not pay for torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

# Row keys that sft_row/pair_row place themselves. "output" is the source
# row's reference answer: the selected response replaces it, and carrying
# it along would put a second, different target into the training row.
_ALPACA_KEYS = ("instruction", "input", "output")


def _where(c: dict) -> str:
    return f"prompt_id={c.get('prompt_id')!r} sample_idx={c.get('sample_idx')!r}"


def _score(c: dict) -> float:
    """The candidate's score as a float (bools from checkers become 1.0/0.0)."""
    s = c.get("score")
    # bool is an int subclass, so float() maps it; str/None are refused
    # rather than coerced so a scoring bug surfaces here, not as odd data.
    if not isinstance(s, (int, float)):
        raise ValueError(f"score must be a number or bool, got {s!r} at {_where(c)}")
    s = float(s)
    if math.isnan(s):
        raise ValueError(f"NaN score at {_where(c)}")
    return s


def group_candidates(candidates: Iterable[dict]) -> dict[str, list[dict]]:
    """prompt_id -> candidates sorted by sample_idx, in first-appearance order.

    Raises ValueError on a duplicate (prompt_id, sample_idx).
    """
    groups: dict[str, list[dict]] = {}
    seen: set[tuple[str, int]] = set()
    for c in candidates:
        for key in ("prompt_id", "sample_idx"):
            if key not in c:
                raise ValueError(f"candidate has no {key!r}: {_where(c)}")
        pid, idx = c["prompt_id"], c["sample_idx"]
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise ValueError(f"sample_idx must be an int at {_where(c)}")
        if (pid, idx) in seen:
            raise ValueError(f"duplicate candidate prompt_id={pid!r} sample_idx={idx}")
        seen.add((pid, idx))
        groups.setdefault(pid, []).append(c)
    for group in groups.values():
        group.sort(key=lambda c: c["sample_idx"])
    return groups


def degenerate_reason(candidate: dict, keep_truncated: bool = False) -> str | None:
    """ "empty" (blank response), "truncated" (hit the length limit) or None.

    ``keep_truncated``: length-capped responses count as usable (select.keep_truncated)."""
    response = candidate.get("response")
    if not isinstance(response, str) or not response.strip():
        return "empty"
    # A length-capped response is unfinished text; training on it teaches
    # the model to stop mid-sentence, whatever the scorer thought of it.
    if candidate.get("finish_reason") == "length" and not keep_truncated:
        return "truncated"
    return None


def _analyze(
    candidates: Iterable[dict], keep_truncated: bool = False
) -> tuple[dict[str, list[dict]], dict, dict[str, list[dict]]]:
    """Group, validate scores, and split off degenerates.

    Returns (groups, base stats, prompt_id -> valid candidates in sample order).
    """
    groups = group_candidates(candidates)
    degenerate: dict[str, int] = {}
    valid: dict[str, list[dict]] = {}
    # A prompt is incomplete if samples are missing from the middle/end
    # (non-contiguous indices) or it has fewer samples than the largest group,
    # i.e. the best-of-n run lost some of its generations.
    largest = max((len(g) for g in groups.values()), default=0)
    incomplete = 0
    without_valid = 0
    n_candidates = 0
    for pid, group in groups.items():
        n_candidates += len(group)
        idxs = [c["sample_idx"] for c in group]
        if idxs != list(range(len(group))) or len(group) < largest:
            incomplete += 1
        ok = []
        for c in group:
            _score(c)  # validate every score, degenerate or not
            reason = degenerate_reason(c, keep_truncated)
            if reason is None:
                ok.append(c)
            else:
                degenerate[reason] = degenerate.get(reason, 0) + 1
        if not ok:
            without_valid += 1
        valid[pid] = ok
    stats = {
        "prompts": len(groups),
        "candidates": n_candidates,
        "selected": 0,
        "degenerate": degenerate,
        "prompts_without_valid": without_valid,
        "incomplete_prompts": incomplete,
    }
    return groups, stats, valid


def _ranked(valid: list[dict]) -> list[dict]:
    """Highest score first; ties -> lowest sample_idx (deterministic)."""
    return sorted(valid, key=lambda c: (-_score(c), c["sample_idx"]))


def select_top_k_candidates(
    candidates: Iterable[dict], k: int, min_score: float | None = None, keep_truncated: bool = False
) -> tuple[list[dict], dict]:
    """Up to k best valid candidates per prompt, each scoring >= min_score.

    stats["below_min_score"] counts top-k slots dropped for scoring below
    min_score (for k=1: prompts whose best was too low).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if min_score is not None and math.isnan(float(min_score)):
        raise ValueError("min_score is NaN")
    _, stats, valid = _analyze(candidates, keep_truncated)
    below = 0
    selected: list[dict] = []
    for ok in valid.values():
        for c in _ranked(ok)[:k]:
            if min_score is not None and _score(c) < min_score:
                below += 1
            else:
                selected.append(c)
    stats.update(selected=len(selected), below_min_score=below, k=k, min_score=min_score)
    return selected, stats


def select_best_candidates(candidates: Iterable[dict], min_score: float | None = None) -> tuple[list[dict], dict]:
    """The best valid candidate per prompt (ties -> lowest sample_idx)."""
    selected, stats = select_top_k_candidates(candidates, 1, min_score)
    del stats["k"]
    return selected, stats


def select_pair_candidates(
    candidates: Iterable[dict], min_margin: float = 0.0, keep_truncated: bool = False
) -> tuple[list[tuple[dict, dict]], dict]:
    """One (chosen, rejected) per prompt: best vs worst valid candidate.

    Every prompt lands in exactly one of: selected, too_few_valid (< 2 valid,
    including none), equal_scores (margin 0), below_min_margin.
    """
    if math.isnan(float(min_margin)):
        raise ValueError("min_margin is NaN")
    _, stats, valid = _analyze(candidates, keep_truncated)
    pairs: list[tuple[dict, dict]] = []
    too_few = equal = below = 0
    margins: list[float] = []
    for ok in valid.values():
        if len(ok) < 2:
            too_few += 1
            continue
        chosen = _ranked(ok)[0]
        # Worst: min score, ties -> lowest sample_idx (not the reverse of
        # _ranked, which would pick the highest index among the minimum).
        rejected = min(ok, key=lambda c: (_score(c), c["sample_idx"]))
        margin = _score(chosen) - _score(rejected)
        if not margin > 0:
            equal += 1  # all valid scores equal: no preference signal
        elif margin < min_margin:
            below += 1
        else:
            pairs.append((chosen, rejected))
            margins.append(margin)
    stats.update(
        selected=len(pairs),
        too_few_valid=too_few,
        equal_scores=equal,
        below_min_margin=below,
        # fsum: exact sum, so the mean does not depend on input order.
        mean_margin=math.fsum(margins) / len(margins) if margins else None,
        min_margin=min_margin,
    )
    return pairs, stats


def _is_alpaca(row: object) -> bool:
    return isinstance(row, dict) and "instruction" in row


def _metadata(row: dict, reserved: Iterable[str]) -> dict:
    skip = set(_ALPACA_KEYS) | set(reserved)
    return {k: v for k, v in row.items() if k not in skip}


def sft_row(candidate: dict) -> dict:
    """A training row: Alpaca (instruction/input/output) when the source row
    is Alpaca, else {"prompt", "completion"}; plus prompt_id and score."""
    row = candidate.get("row") or {}
    tail = {"prompt_id": candidate["prompt_id"], "score": _score(candidate)}
    if _is_alpaca(row):
        return {
            "instruction": row["instruction"],
            "input": row.get("input", ""),
            "output": candidate["response"],
            **_metadata(row, tail),
            **tail,
        }
    return {"prompt": candidate["prompt"], "completion": candidate["response"], **tail}


def pair_row(chosen: dict, rejected: dict) -> dict:
    """A preference row; Alpaca sources also keep instruction, input and the
    row's metadata (e.g. answer, task) so later stages can re-render/check."""
    if chosen["prompt_id"] != rejected["prompt_id"]:
        raise ValueError(f"pair mixes prompts: {chosen['prompt_id']!r} vs {rejected['prompt_id']!r}")
    cs, rs = _score(chosen), _score(rejected)
    out = {
        "prompt_id": chosen["prompt_id"],
        "prompt": chosen["prompt"],
        "chosen": chosen["response"],
        "rejected": rejected["response"],
        "chosen_score": cs,
        "rejected_score": rs,
        "margin": cs - rs,
    }
    row = chosen.get("row") or {}
    if _is_alpaca(row):
        # Metadata never overrides the pair's own fields.
        out.update(instruction=row["instruction"], input=row.get("input", ""))
        out.update(_metadata(row, out))
    return out


def checker_rates(
    candidates: Iterable[dict],
    selected_best: Iterable[dict],
    check: Callable[[dict, str], bool],
    keep_truncated: bool = False,
) -> dict[str, float]:
    """Pass rates of check(row, response) over the prompts in candidates.

    first_sample: sample_idx 0 passes (missing or degenerate fails);
    best: the selected best candidate passes (no selection fails);
    pass_at_n: any valid sample passes. selected_best holds candidates from
    select_best_candidates, not sft rows.
    """
    groups = group_candidates(candidates)
    if not groups:
        raise ValueError("checker_rates needs at least one candidate")
    best_by_pid: dict[str, dict] = {}
    for c in selected_best:
        if "response" not in c or "row" not in c:
            raise ValueError("selected_best must be candidates (select_best_candidates), not sft rows")
        pid = c["prompt_id"]
        if pid not in groups:
            raise ValueError(f"selected best prompt_id={pid!r} is not among the candidates")
        if pid in best_by_pid:
            raise ValueError(f"two selected best for prompt_id={pid!r}")
        best_by_pid[pid] = c

    def passes(c: dict | None) -> bool:
        # Degenerate samples fail outright, matching selection, which never
        # picks them; otherwise pass_at_n could exceed what best can reach.
        return (
            c is not None
            and degenerate_reason(c, keep_truncated) is None
            and bool(check(c.get("row") or {}, c["response"]))
        )

    first = best = any_pass = 0
    for pid, group in groups.items():
        first += passes(next((c for c in group if c["sample_idx"] == 0), None))
        best += passes(best_by_pid.get(pid))
        any_pass += any(passes(c) for c in group)
    n = len(groups)
    return {
        "first_sample": round(first / n, 4),
        "best": round(best / n, 4),
        "pass_at_n": round(any_pass / n, 4),
    }
