"""GRPO from a trained policy, rewarded by checkers: the policy moves towards what they reward; a reward function
that raises or returns a non-number stops the stage with one clear error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import load_recipe
from pipeline.run import runner
from pipeline.run.manifest import Manifest
from pipeline.util.errors import PipelineError

from conftest import GRPO_STAGE

pytestmark = pytest.mark.slow


def grpo_stage(**extra) -> dict:
    train = {"learning_rate": 1e-4, "max_steps": 6, "batch_size": 2, "logging_steps": 1, "save_steps": 3}
    return {**GRPO_STAGE, "train": train, **extra}


def with_grpo(policy_copy, **extra):
    recipe_path, run_dir = policy_copy
    raw = yaml.safe_load(Path(recipe_path).read_text())
    del raw["stages"]["label"]
    raw["stages"]["grpo"] = grpo_stage(**extra)
    path = run_dir.parent / "grpo.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_recipe(path), run_dir


def test_grpo_trains_the_policy_on_checker_rewards_and_reports_them(policy_copy):
    recipe, run_dir = with_grpo(policy_copy)
    entry = runner.run_stage(recipe, "grpo", run_dir)
    metrics = entry["metrics"]
    assert entry["status"] == "done" and metrics["steps"] == 6
    assert 0.0 <= metrics["reward_preferred_first"] <= 1.0 and "reward_preferred_last" in metrics
    assert (
        "kl" in metrics and metrics["completion_length_mean"] > 0 and 50 < metrics["train_prompts"] <= 64
    )  # duplicates are sampled once
    out = entry["outputs"]["model"]
    assert out["kind"] == "full" and (Path(out["path"]) / "model.safetensors").is_file()

    # the trained policy differs from the SFT policy it started from
    from safetensors.torch import load_file

    sft_weights = load_file(str(run_dir / "sft" / "model" / "model.safetensors"))
    grpo_weights = load_file(str(Path(out["path"]) / "model.safetensors"))
    assert any(not (sft_weights[k] == grpo_weights[k]).all() for k in sft_weights)


def raising(row, response):
    raise ValueError("no gold answer in this row")


def not_a_number(row, response):
    return "yes"


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("raising", "stages.grpo: reward 'bad' raised ValueError: no gold answer in this row"),
        ("not_a_number", "stages.grpo: reward 'bad': checker bad returned str ('yes'); it must return a number"),
    ],
)
def test_a_reward_that_raises_or_returns_a_non_number_is_one_clear_error(policy_copy, fn, message, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    recipe, run_dir = with_grpo(policy_copy, rewards={"bad": {"checker": f"test_grpo:{fn}"}})
    with pytest.raises(PipelineError) as err:
        runner.run_stage(recipe, "grpo", run_dir)
    assert message in str(err.value)


def test_grpo_trains_a_new_lora_on_a_4bit_base_with_the_starting_policy_as_reference(policy_copy):
    recipe_path, run_dir = policy_copy
    raw = yaml.safe_load(Path(recipe_path).read_text())
    del raw["stages"]["label"]
    raw["model"]["quantization"] = "4bit"
    raw["lora"] = {"r": 8, "alpha": 16}
    raw["stages"]["grpo"] = grpo_stage(train={**grpo_stage()["train"], "learning_rate": 3e-3})
    path = run_dir.parent / "grpo-qlora.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    entry = runner.run_stage(load_recipe(path), "grpo", run_dir)
    out, metrics = entry["outputs"]["model"], entry["metrics"]
    assert entry["status"] == "done" and metrics["steps"] == 6
    sft_model = Manifest(run_dir).stage("sft")["outputs"]["model"]["path"]
    assert out["kind"] == "adapter" and out["base"] == sft_model  # a new adapter on the SFT model
    assert metrics["trainable_parameters"] < metrics["parameters"] / 2 and "kl" in metrics


def test_grpo_rewards_from_a_reward_stage_and_a_checker_together(policy_copy):
    recipe_path, run_dir = policy_copy
    raw = yaml.safe_load(Path(recipe_path).read_text())
    raw["stages"]["label"]["prompts"]["limit"] = 120
    raw["stages"]["reward"] = {
        "kind": "reward",
        "base_from": "sft",
        "pairs_from": "label",
        "train": {"learning_rate": 1e-4, "max_steps": 10, "batch_size": 8, "save_steps": 100},
    }
    raw["stages"]["grpo"] = grpo_stage(reward_from="reward", reward_weight=0.5)
    path = run_dir.parent / "grpo-rm.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    recipe = load_recipe(path)
    for name in ("label", "reward", "grpo"):
        entry = runner.run_stage(recipe, name, run_dir)
    metrics = entry["metrics"]
    assert entry["status"] == "done"
    assert "reward_reward_model_first" in metrics and "reward_preferred_first" in metrics
