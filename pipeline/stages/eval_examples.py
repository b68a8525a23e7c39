"""Example responses side by side (``eval.examples``): a few held-out prompts with every policy's response, its
checker results and reward, so a person sees what changed at a glance.

The prompts shown: first those where the policies disagree most (checker results that differ, then the largest
reward spread, then the most distinct responses), then a seeded random choice among the rest. They go into the
eval stage's metrics as ``examples`` (a list; the report renders it, trackers take only numbers):

    [{"prompt_id", "prompt", "why", "responses": [{"policy", "response", "checks": {name: bool}, "reward"?}]}]
"""

from __future__ import annotations

import random
from typing import Any

from pipeline.data.prompts import PROMPT_COLUMNS, PromptRecord


def pick(prompts: list[PromptRecord], rows: list[dict[str, Any]], count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` prompts (half, rounded up, by disagreement; the rest drawn with ``seed``) with every policy's row
    of ``rows`` (responses.jsonl rows: policy, prompt_id, response, checks, reward)."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    records = [p for p in prompts if p.prompt_id in by_prompt]
    if count <= 0 or not records:
        return []
    ranked = sorted(records, key=lambda p: _disagreement(by_prompt[p.prompt_id]), reverse=True)
    chosen = [p for p in ranked[: (count + 1) // 2] if _disagreement(by_prompt[p.prompt_id]) > (0, 0.0, 1)]
    taken = {p.prompt_id for p in chosen}
    rest = [p for p in records if p.prompt_id not in taken]
    drawn = random.Random(seed).sample(rest, min(count - len(chosen), len(rest)))
    return [_example(p, by_prompt[p.prompt_id], _why(by_prompt[p.prompt_id])) for p in chosen] + [
        _example(p, by_prompt[p.prompt_id], f"random pick (seed {seed})") for p in drawn
    ]


def _disagreement(rows: list[dict[str, Any]]) -> tuple[int, float, int]:
    """(checkers whose results differ between policies, reward spread, distinct responses): larger is more."""
    names = {name for row in rows for name in row.get("checks") or {}}
    differ = sum(len({bool((row.get("checks") or {}).get(name)) for row in rows}) > 1 for name in names)
    rewards = [row["reward"] for row in rows if isinstance(row.get("reward"), (int, float))]
    spread = max(rewards) - min(rewards) if len(rewards) > 1 else 0.0
    return differ, round(spread, 6), len({row["response"] for row in rows})


def _why(rows: list[dict[str, Any]]) -> str:
    names = sorted({name for row in rows for name in row.get("checks") or {}})
    differ = [n for n in names if len({bool((row.get("checks") or {}).get(n)) for row in rows}) > 1]
    _, spread, distinct = _disagreement(rows)
    reasons = [f"checkers differ: {', '.join(differ)}"] if differ else []
    if spread > 0:
        reasons.append(f"reward spread {spread:.2f}")
    return "; ".join(reasons) or f"{distinct} different responses"


def _example(record: PromptRecord, rows: list[dict[str, Any]], why: str) -> dict[str, Any]:
    responses = [
        {"policy": row["policy"], "response": row["response"], "checks": dict(row.get("checks") or {})}
        | ({"reward": round(row["reward"], 4)} if isinstance(row.get("reward"), (int, float)) else {})
        for row in rows
    ]
    return {"prompt_id": record.prompt_id, "prompt": shown_prompt(record), "why": why, "responses": responses}


def shown_prompt(record: PromptRecord) -> str:
    """The prompt as a person wrote it: the row's instruction (and input), its prompt column, or the chat turns --
    not the template's preamble."""
    row = record.row
    if isinstance(row.get("instruction"), str):
        extra = row.get("input")
        return row["instruction"] + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
    column = next((c for c in PROMPT_COLUMNS if isinstance(row.get(c), str)), None)
    if column:
        return row[column]
    if isinstance(record.prompt, list):
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in record.prompt)
    return str(record.prompt)
