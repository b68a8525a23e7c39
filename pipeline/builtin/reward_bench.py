"""A small preference benchmark for the tiny tasks, in RewardBench's layout (``data/tiny/reward_bench.jsonl``).

Each row: ``id``, ``subset``, ``prompt`` (the user's text), ``chosen`` and ``rejected`` (responses). Chosen is
always the preferred style with the gold answer; each subset pairs it with one kind of flaw:

- ``chatter``      the demo's dominant flaw: trailing chatter ("... Anyway, whatever.")
- ``rude``         a rude prefix ("Ugh. The answer is X.")
- ``format``       the rarer flaws in turn: bare answer, repetition, no final period, all lower-case
- ``correctness``  the preferred style with a wrong answer (a 1M reward model cannot verify answers: this
                   subset shows that limit rather than hiding it)

Prompts come from their own seed and leave out every prompt the demo's reward model is trained on (the label
stage's prompts), so no benchmark prompt was scored in training. The task space is small, so SFT has seen most
capital and opposite prompts. Stdlib only; only ``rng.random()`` is drawn, as in tasks.py, so the file is
byte-identical on every Python.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pipeline.builtin.prompt_templates import chat_user_message
from pipeline.builtin.tasks import CAPITALS, OPPOSITES, RUDE_PREFIXES, SPLITS, generate_rows, render

FILE_NAME = "reward_bench.jsonl"
SEED = 5  # the splits use 0-4
PER_SUBSET = 50
SUBSETS = ("chatter", "rude", "format", "correctness")
FORMAT_FLAWS = ("bare", "repeat", "no_period", "lowercase")
# The prompts the demo's reward model is trained on (its label stage samples them): left out of the benchmark.
TRAINED_ON = ("prompts_label.jsonl",)


def prompt_text(row: dict) -> str:
    """A tiny-task row's prompt as the user's text: what the chat template renders as the one user turn."""
    return chat_user_message(row["instruction"], row.get("input") or "")[0]["content"]


def wrong_answer(row: dict, rng: random.Random) -> str:
    """A plausible answer of the same kind that is not the gold one."""
    gold = row["answer"]
    if row["task"] in ("addition", "word_count"):
        step = 1 + int(rng.random() * 2)  # off by one or two, never below 1
        return str(int(gold) + step if int(gold) <= step or rng.random() < 0.5 else int(gold) - step)
    pool = sorted(CAPITALS.values()) if row["task"] == "capital" else sorted(OPPOSITES.values())
    others = [a for a in pool if a != gold]
    return others[int(rng.random() * len(others))]


def rejected_response(subset: str, row: dict, index: int, rng: random.Random) -> str:
    """The flawed side of a pair; ``index`` rotates the rude prefixes and format flaws evenly."""
    if subset == "chatter":
        return render("chatter", row["answer"])
    if subset == "rude":
        return render("rude", row["answer"], RUDE_PREFIXES[index % len(RUDE_PREFIXES)])
    if subset == "format":
        return render(FORMAT_FLAWS[index % len(FORMAT_FLAWS)], row["answer"])
    return render("preferred", wrong_answer(row, rng))


def benchmark_rows(per_subset: int = PER_SUBSET, seed: int = SEED) -> list[dict]:
    """``per_subset`` pairs for each of SUBSETS, on prompts the reward model is not trained on."""
    trained = {
        (r["instruction"], r["input"]) for name in TRAINED_ON for r in generate_rows(*SPLITS[name][:2], styled=False)
    }
    fresh = (r for r in generate_rows(20 * per_subset * len(SUBSETS), seed, styled=False))
    fresh = (r for r in fresh if (r["instruction"], r["input"]) not in trained)
    rng = random.Random(seed)
    rows = []
    for subset in SUBSETS:
        for index in range(per_subset):
            row = next(fresh)
            rows.append(
                {
                    "id": len(rows),
                    "subset": subset,
                    "prompt": prompt_text(row),
                    "chosen": render("preferred", row["answer"]),
                    "rejected": rejected_response(subset, row, index, rng),
                }
            )
    return rows


def write_benchmark(out_dir: str | Path) -> tuple[Path, int]:
    """Write the benchmark as JSONL (sorted keys, LF line ends) into ``out_dir``; (path, rows)."""
    path = Path(out_dir) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = benchmark_rows()
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8"))
    return path, len(rows)
