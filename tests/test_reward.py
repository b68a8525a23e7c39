"""Reward model stage: training (full / 4-bit LoRA), held-out evaluation, the quality gate, and the
reward model as a best-of-n scorer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import modeling
from pipeline.builtin.prompt_templates import alpaca_prompt
from pipeline.config import load_recipe
from pipeline.run import runner

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def style_pairs(path: Path, n: int, noisy: bool = False, seed: int = 0) -> Path:
    """Explicit pairs from the tiny tasks: preferred style vs trailing chatter (labels shuffled if noisy)."""
    rows = [json.loads(line) for line in (REPO / "data/tiny/prompts_label.jsonl").read_text().splitlines()][:n]
    rng = random.Random(seed)
    out = []
    for r in rows:
        good, bad = f"The answer is {r['answer']}.", f"The answer is {r['answer']}. Anyway, whatever."
        if noisy and rng.random() < 0.5:
            good, bad = bad, good
        out.append({"prompt": alpaca_prompt(r["instruction"], r["input"]), "chosen": good, "rejected": bad})
    path.write_text("".join(json.dumps(x) + "\n" for x in out))
    return path


def reward_recipe(make_recipe, pairs: Path, extra: dict | None = None) -> Path:
    stage = {
        "kind": "reward",
        "data": {"train": {"path": str(pairs)}, "eval_fraction": 0.25, "max_length": 128},
        "train": {
            "learning_rate": 1e-3,
            "max_steps": 30,
            "batch_size": 8,
            "logging_steps": 10,
            "save_steps": 30,
            "precision": "fp32",
        },
    }
    raw = {"stages": {"reward": stage}}
    recipe = make_recipe(raw)
    data = yaml.safe_load(recipe.read_text())
    del data["stages"]["sft"]
    for key, value in (extra or {}).items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    return recipe


def test_reward_model_learns_style_pairs_and_reports_length_bias(make_recipe, tmp_path):
    recipe = load_recipe(reward_recipe(make_recipe, style_pairs(tmp_path / "pairs.jsonl", 160)))
    entry = runner.run_stage(recipe, "reward", tmp_path / "run")
    m = entry["metrics"]
    assert entry["status"] == "done" and m["heldout_pairs"] == 40
    assert m["heldout_accuracy"] >= 0.9 and m["heldout_margin_mean"] > 0
    assert m["eval_loss"] < m["eval_loss_before"]
    # every chosen response is the shorter one here: the split accuracy and the bias signals say so
    assert m["chosen_longer_fraction"] == 0.0 and m.get("accuracy_chosen_longer") is None
    assert m["accuracy_chosen_shorter"] == m["heldout_accuracy"]
    assert m["reward_length_correlation"] < 0
    assert Path(entry["outputs"]["reward_histogram"]).stat().st_size > 1000
    summary = json.loads((tmp_path / "run/reward/data_summary.json").read_text())
    assert summary["train_source"]["format"] == "explicit" and summary["train"]["pairs"] == 120


def test_4bit_lora_reward_model_trains_head_and_adapter_only(make_recipe, tmp_path, monkeypatch):
    recipe = load_recipe(
        reward_recipe(
            make_recipe,
            style_pairs(tmp_path / "pairs.jsonl", 64),
            {"model.quantization": "4bit", "lora": {"r": 8, "alpha": 16}},
        )
    )
    captured = {}
    original = modeling.load_reward_model

    def spy(*args, **kwargs):
        model, base = original(*args, **kwargs)
        captured["model"] = model
        captured["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model, base

    monkeypatch.setattr(modeling, "load_reward_model", spy)
    entry = runner.run_stage(recipe, "reward", tmp_path / "run")
    assert entry["status"] == "done" and entry["outputs"]["model"]["kind"] == "adapter"
    after = dict(captured["model"].named_parameters())
    raw = lambda t: t.contiguous().view(torch.uint8).numpy().tobytes()  # noqa: E731 (packed 4-bit bytes)
    changed = {n: raw(b) != raw(after[n].detach()) for n, b in captured["before"].items()}
    assert any(c for n, c in changed.items() if "lora_" in n)
    assert any(c for n, c in changed.items() if "score" in n and "modules_to_save" in n), "the new head must train"
    frozen = {n: c for n, c in changed.items() if "lora_" not in n and "modules_to_save" not in n}
    assert frozen and not any(frozen.values()), [n for n, c in frozen.items() if c]
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in captured["model"].modules())
    # the saved adapter (+ head) reloads as a scorer and ranks held-out pairs as the stage measured
    ctx = runner.make_context(recipe, "reward", tmp_path / "run")
    from pipeline.rollout.scoring import reward_scorer

    scorer = reward_scorer(ctx, "reward")
    prompt = alpaca_prompt("What is the capital of the given country?", "France")
    good, bad = scorer.score(
        [
            {"prompt": prompt, "response": "The answer is Paris."},
            {"prompt": prompt, "response": "The answer is Paris. Anyway, whatever."},
        ]
    )
    assert good > bad


def test_quality_gate_fails_the_stage_and_stops_the_run(make_recipe, tmp_path):
    pairs = style_pairs(tmp_path / "noisy.jsonl", 80, noisy=True)
    recipe = reward_recipe(make_recipe, pairs, {"stages.reward.min_accuracy": 0.99})
    data = yaml.safe_load(recipe.read_text())
    data["stages"]["after"] = {
        "kind": "sft",
        "data": {"train": {"path": str(REPO / "data/tiny/sft_eval.jsonl")}},
        "train": {"max_steps": 1, "precision": "fp32"},
    }
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    run_dir = tmp_path / "run"
    out = run_cli("run", str(recipe), "--output-dir", str(run_dir))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "quality gate: held-out pairwise accuracy" in out.stderr and "below min_accuracy 0.99" in out.stderr
    assert "Traceback" not in out.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert manifest["reward"]["status"] == "failed" and "below min_accuracy 0.99" in manifest["reward"]["error"]
    assert manifest["reward"]["metrics"]["heldout_accuracy"] < 0.99  # what was measured is kept
    assert "after" not in manifest  # no downstream stage started


def test_reward_scorer_matches_how_the_trainer_tokenized_pairs(make_recipe, tmp_path):
    """The best-of-n scorer must score exactly the token sequence the reward model was trained on."""
    import datasets
    from trl import RewardConfig, RewardTrainer

    from pipeline.rollout.scoring import RewardModelScorer

    tok = modeling.load_tokenizer(load_recipe(make_recipe()).model)
    model = modeling.load_base(load_recipe(make_recipe()).model, head="reward")
    pair = {"prompt": alpaca_prompt("Add.", "2 and 3"), "chosen": "The answer is 5.", "rejected": "5"}
    trainer = RewardTrainer(
        model=model,
        processing_class=tok,
        train_dataset=datasets.Dataset.from_list([pair]),
        args=RewardConfig(output_dir=str(tmp_path / "o"), use_cpu=True, bf16=False, report_to="none"),
    )
    trained_ids = trainer.train_dataset[0]["chosen_ids"]
    scorer = RewardModelScorer(model, tok, "rm")
    assert scorer.encode(pair["prompt"], pair["chosen"]) == list(trained_ids)


def test_reward_from_scores_best_of_n(policy_copy):
    recipe_path, run_dir = policy_copy
    raw = yaml.safe_load(Path(recipe_path).read_text())
    raw["stages"]["reward"] = {
        "kind": "reward",
        "base_from": "sft",
        "pairs_from": "label",
        "data": {"eval_fraction": 0.2, "max_length": 128},
        "train": {"learning_rate": 1e-4, "max_steps": 20, "batch_size": 8, "save_steps": 20, "precision": "fp32"},
    }
    raw["stages"]["bon"] = {**raw["stages"]["label"], "scorer": {"reward_from": "reward", "batch_size": 32}}
    path = run_dir.parent / "with_rm.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    recipe = load_recipe(path)
    for stage in ("label", "reward", "bon"):
        assert runner.run_stage(recipe, stage, run_dir)["status"] == "done"
    candidates = [json.loads(x) for x in (run_dir / "bon/candidates.jsonl").read_text().splitlines()]
    scores = [c["score"] for c in candidates]
    assert len(set(scores)) > len(scores) // 2  # real-valued rewards, not checker 0/1
    best = {r["prompt_id"]: r for r in map(json.loads, (run_dir / "bon/best.jsonl").read_text().splitlines())}
    by_prompt: dict[str, list[dict]] = {}
    for c in candidates:
        by_prompt.setdefault(c["prompt_id"], []).append(c)
    for pid, row in best.items():  # the reward model's argmax among the valid samples
        valid = [c for c in by_prompt[pid] if c["response"].strip() and c["finish_reason"] == "eos"]
        assert row["score"] == max(c["score"] for c in valid)
