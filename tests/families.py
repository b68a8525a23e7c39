"""Helpers for the model-family tests: small data files in the shapes real recipes use, and small recipes
that run every stage on a ``builtin:replica-<family>`` (tests/test_families.py, tests/test_recipes_gpu.py)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY

FAMILIES = (
    "llama3",
    "qwen2.5",
    "qwen2.5-instruct",
    "mistral",
    "gemma2",
    "phi3",
    "qwen3",
    "gemma3",
    "llama3.2",
    "r1-distill-qwen",
    "smollm3",
    "phi4-mini",
    "olmo2",
)
FAST_TRAIN = {
    "max_steps": 2,
    "batch_size": 4,
    "logging_steps": 1,
    "save_steps": 100,
    "precision": "fp32",
    "learning_rate": 1e-3,
}
# Enough for a ~1M-parameter replica to memorise 16 short replies and their end of turn: best-of-n needs
# responses that end (a truncated one is never selected), and trap (a) is about exactly that.
# Random batches: what these step counts were calibrated on (grouped batches change what 24 steps teach).
LEARN_TRAIN = {**FAST_TRAIN, "max_steps": 24, "batch_size": 4, "learning_rate": 3e-3, "batching": "padded"}


def tiny_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in (TINY / "sft_train.jsonl").read_text().splitlines()[:n]]


def user_text(row: dict) -> str:
    return row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_family_data(out: Path, n: int = 8) -> dict[str, Path]:
    """alpaca rows, messages rows, conversational and text pairs, plain prompts."""
    rows = tiny_rows(n)
    good = [f"The answer is {r['answer']}." for r in rows]
    bad = [f"The answer is {r['answer']}. Anyway, whatever." for r in rows]
    return {
        "alpaca": write_jsonl(
            out / "alpaca.jsonl", [{k: r[k] for k in ("instruction", "input", "output", "answer")} for r in rows]
        ),
        "messages": write_jsonl(
            out / "messages.jsonl",
            [
                {"messages": [{"role": "user", "content": user_text(r)}, {"role": "assistant", "content": g}]}
                for r, g in zip(rows, good)
            ],
        ),
        "pairs_chat": write_jsonl(
            out / "pairs_chat.jsonl",
            [
                {
                    "prompt": [{"role": "user", "content": user_text(r)}],
                    "chosen": [{"role": "assistant", "content": g}],
                    "rejected": [{"role": "assistant", "content": b}],
                }
                for r, g, b in zip(rows, good, bad)
            ],
        ),
        "pairs_text": write_jsonl(
            out / "pairs_text.jsonl",
            [{"prompt": r["instruction"], "chosen": g, "rejected": b} for r, g, b in zip(rows, good, bad)],
        ),
        "prompts": write_jsonl(
            out / "prompts.jsonl", [{k: r[k] for k in ("instruction", "input", "answer")} for r in rows[:6]]
        ),
    }


# SmolLM3's template writes a system block (metadata and a default persona: 748 tokens with thinking on) first:
# 96 tokens leave no room for the conversation. Thinking replies open with a think block: more tokens to end.
MAX_LENGTH = {"smollm3": 1024}
NEW_TOKENS = {"qwen3": 24, "smollm3": 24}


def max_length(family: str) -> int:
    return MAX_LENGTH.get(family, 96)


def full_pipeline(family: str, data: dict[str, Path]) -> dict:
    """Every stage once, full fine-tuning: sft (alpaca), sft (chat), reward, bon, dpo, eval."""
    pairs = {"train": {"path": str(data["pairs_chat"])}, "eval_fraction": 0.25, "max_length": max_length(family)}
    prompts = {"path": str(data["prompts"])}
    return {
        "name": f"family-{family}",
        "seed": 0,
        "model": {"name_or_path": f"builtin:replica-{family}", "dtype": "float32"},
        "tracking": {"report_to": "none"},
        "stages": {
            "sft_alpaca": {
                "kind": "sft",
                "data": {
                    "train": {"path": str(data["alpaca"])},
                    "template": "alpaca",
                    "max_length": max_length(family),
                },
                "train": FAST_TRAIN,
            },
            "sft": {
                "kind": "sft",
                "data": {
                    "train": {"path": str(data["messages"])},
                    "template": "chat",
                    "max_length": max_length(family),
                },
                "train": LEARN_TRAIN,
            },
            "reward": {"kind": "reward", "base_from": "sft", "data": pairs, "train": FAST_TRAIN},
            "bon": {
                "kind": "bon",
                "policy_from": "sft",
                "prompts": prompts,
                "n": 2,
                "max_new_tokens": NEW_TOKENS.get(family, 12),
                "scorer": {"reward_from": "reward"},
            },
            "dpo": {"kind": "dpo", "policy_from": "sft", "data": pairs, "beta": 0.1, "train": FAST_TRAIN},
            "eval": {
                "kind": "eval",
                "prompts": prompts,
                "policies": ["sft", "dpo"],
                "reference": "sft",
                "bon_from": "bon",
                "reward_from": "reward",
                "max_new_tokens": NEW_TOKENS.get(family, 12),
                "kl_samples": 1,
            },
        },
    }


def adapter_pipeline(family: str, data: dict[str, Path], quantization: str = "none") -> dict:
    """LoRA (optionally on a 4-bit base): sft (chat) -> dpo."""
    pairs = {"train": {"path": str(data["pairs_chat"])}, "eval_fraction": 0, "max_length": max_length(family)}
    return {
        "name": f"family-{family}-lora",
        "seed": 0,
        "model": {"name_or_path": f"builtin:replica-{family}", "dtype": "float32", "quantization": quantization},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "tracking": {"report_to": "none"},
        "stages": {
            "sft": {
                "kind": "sft",
                "data": {
                    "train": {"path": str(data["messages"])},
                    "template": "chat",
                    "max_length": max_length(family),
                },
                "train": FAST_TRAIN,
            },
            "dpo": {"kind": "dpo", "policy_from": "sft", "data": pairs, "beta": 0.1, "train": FAST_TRAIN},
        },
    }
