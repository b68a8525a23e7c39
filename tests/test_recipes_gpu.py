"""Each real-model recipe in recipes/gpu runs end to end offline, through the CLI, with only ``--set``: the model
swapped for its family's replica, every Hub source for a small local file of the same schema, steps capped.
Nothing in the pipeline knows it is a test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from families import tiny_rows, user_text, write_jsonl

from conftest import REPO, run_cli

# recipe -> (replica, which local file stands in for each Hub source)
RECIPES = {
    "qwen2.5-0.5b-full.yaml": "builtin:replica-qwen2.5",
    "llama3.1-8b-qlora.yaml": "builtin:replica-llama3",
    "qwen2.5-0.5b-instruct-chat.yaml": "builtin:replica-qwen2.5-instruct",
}
CPU = {
    "max_steps": 2,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "precision": "fp32",
    "optim": "adamw_torch",
    "eval_steps": None,
    "save_steps": 100,
    "logging_steps": 1,
}


def hub_stand_ins(out: Path) -> dict[str, Path]:
    """Local files with the columns of tatsu-lab/alpaca, Anthropic/hh-rlhf, ultrachat_200k, ultrafeedback_binarized."""
    rows = tiny_rows(16)
    good = [f"The answer is {r['answer']}." for r in rows]
    bad = [f"The answer is {r['answer']}. Anyway, whatever." for r in rows]
    chat = [
        [{"role": "user", "content": user_text(r)}, {"role": "assistant", "content": g}] for r, g in zip(rows, good)
    ]
    return {
        "tatsu-lab/alpaca": write_jsonl(
            out / "alpaca.jsonl",
            [
                {"instruction": r["instruction"], "input": r["input"], "output": g, "text": "..."}
                for r, g in zip(rows, good)
            ],
        ),
        "Anthropic/hh-rlhf": write_jsonl(
            out / "hh.jsonl",
            [
                {
                    "chosen": f"\n\nHuman: {user_text(r)}\n\nAssistant: {g}",
                    "rejected": f"\n\nHuman: {user_text(r)}\n\nAssistant: {b}",
                }
                for r, g, b in zip(rows, good, bad)
            ],
        ),
        "HuggingFaceH4/ultrachat_200k": write_jsonl(
            out / "ultrachat.jsonl",
            [{"prompt": user_text(r), "prompt_id": str(i), "messages": c} for i, (r, c) in enumerate(zip(rows, chat))],
        ),
        "HuggingFaceH4/ultrafeedback_binarized": write_jsonl(
            out / "ultrafeedback.jsonl",
            [
                {
                    "prompt": user_text(r),
                    "prompt_id": str(i),
                    "chosen": c,
                    "rejected": [c[0], {"role": "assistant", "content": b}],
                    "messages": c,
                    "score_chosen": 8.0,
                    "score_rejected": 4.0,
                }
                for i, (r, c, b) in enumerate(zip(rows, chat, bad))
            ],
        ),
    }


def overrides(recipe: dict, replica: str, files: dict[str, Path]) -> list[str]:
    """--set items: replica model, local files for Hub sources (keeping format / columns), CPU-sized settings."""
    out = [
        f"model.name_or_path={replica}",
        "model.dtype=float32",
        "model.gradient_checkpointing=false",
        "model.attn_implementation=null",
        "tracking.report_to=none",
        "launch=null",
    ]
    if recipe["model"].get("quantization", "none") != "none":
        out.append("model.quant.compute_dtype=float32")
    for name, stage in recipe["stages"].items():
        for key, source in _hub_sources(stage):
            local = {k: v for k, v in source.items() if k in ("format", "columns")}
            out.append(f"stages.{name}.{key}=" + json.dumps({"path": str(files[source["hub"]]), **local}))
        if "train" in stage:
            # enough steps for the SFT policy to learn to end its replies (best-of-n keeps only finished ones);
            # random batches: 32 steps on 16 rows were calibrated with them (grouped orders differ per seed)
            steps = (
                {**CPU, "max_steps": 32, "learning_rate": 3e-3, "batching": "padded"} if stage["kind"] == "sft" else CPU
            )
            out += [f"stages.{name}.train.{k}={json.dumps(v)}" for k, v in steps.items()]
        if stage["kind"] == "reward":
            out.append(f"stages.{name}.min_accuracy=null")  # a 2-step reward model on 16 rows gates nothing
        if stage["kind"] in ("bon", "eval"):
            out += [f"stages.{name}.max_new_tokens=16", f"stages.{name}.batch_size=8"]
        if stage["kind"] == "bon":
            out.append(f"stages.{name}.n=2")
        if stage["kind"] == "eval":
            out.append(f"stages.{name}.kl_samples=1")
        if stage["kind"] in ("sft", "reward", "dpo") and "data" in stage:
            out.append(f"stages.{name}.data.max_length=128")
    return out


def _hub_sources(stage: dict):
    for key in ("prompts",):
        if isinstance(stage.get(key), dict) and "hub" in stage[key]:
            yield key, stage[key]
    for key in ("train", "eval"):
        source = (stage.get("data") or {}).get(key)
        if isinstance(source, dict) and "hub" in source:
            yield f"data.{key}", source


def pretrained_stand_in(path: Path, recipe: dict, replica: str, files: dict[str, Path], out: Path) -> str:
    """A LoRA recipe needs a base that already knows something: an adapter on a random-init base barely learns
    (measured on the 4-bit llama3 replica: SFT loss 6.9 -> 5.7 in 48 steps at lr 2e-2, r=64, while full
    fine-tuning reached 0.4), so its replies never end. The stand-in for the pretrained checkpoint is the
    replica after a short full fine-tune of the recipe's own sft stage -- through the CLI, by --set only."""
    sets = overrides(recipe, replica, files) + ["model.quantization=none", "lora=null"]
    args = [arg for item in sets for arg in ("--set", item)]
    proc = run_cli("run", str(path), "--stages", "sft", "--output-dir", str(out), *args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out / "sft" / "model")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_gpu_recipe_runs_offline_on_its_family_replica(name, tmp_path):
    path = REPO / "recipes" / "gpu" / name
    recipe = yaml.safe_load(path.read_text())
    assert list(recipe["stages"]) == ["sft", "reward", "bon", "dpo", "eval"]
    assert "GB GPU" in path.read_text().splitlines()[0] + path.read_text().splitlines()[1]  # says what it is sized for
    files = hub_stand_ins(tmp_path)
    model = RECIPES[name]
    if recipe.get("lora"):
        model = pretrained_stand_in(path, recipe, model, files, tmp_path / "pretrain")
    sets = [arg for item in overrides(recipe, model, files) for arg in ("--set", item)]
    proc = run_cli("run", str(path), "--output-dir", str(tmp_path / "run"), *sets, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"].values()] == ["done"] * 5
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    for policy in ("sft", "dpo", "bon"):
        assert metrics["policies"][policy]["no_markup"] == 1.0, (policy, metrics["policies"][policy])


def test_gpu_recipes_validate_and_use_only_hub_data(tmp_path):
    for name in RECIPES:
        path = REPO / "recipes" / "gpu" / name
        proc = run_cli("validate", str(path))
        assert proc.returncode == 0, proc.stderr
        recipe = yaml.safe_load(path.read_text())
        assert all("hub" in source for stage in recipe["stages"].values() for _, source in _hub_sources(stage))
