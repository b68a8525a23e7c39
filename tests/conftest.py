"""Shared fixtures: an isolated cache for the built tiny model, and a factory for small test recipes."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
TINY = REPO / "data" / "tiny"


def pytest_configure(config):
    # One model cache per test session, so tests never depend on (or pollute) ~/.cache.
    if "PIPELINE_CACHE" not in os.environ:
        cache = Path(os.environ.get("PYTEST_PIPELINE_CACHE", "/tmp/pipeline-test-cache"))
        os.environ["PIPELINE_CACHE"] = str(cache)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.pop("WANDB_API_KEY", None)
    os.environ.pop("WANDB_MODE", None)


BASE_RECIPE = {
    "name": "test",
    "seed": 0,
    "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
    "tracking": {"report_to": "none"},
    "stages": {
        "sft": {
            "kind": "sft",
            "data": {
                "train": {"path": str(TINY / "sft_train.jsonl"), "limit": 160},
                "eval": {"path": str(TINY / "sft_eval.jsonl"), "limit": 40},
                "max_length": 128,
            },
            "train": {
                "learning_rate": 3e-3,
                "max_steps": 12,
                "batch_size": 8,
                "logging_steps": 2,
                "save_steps": 6,
                "precision": "fp32",
            },
        }
    },
}


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture
def make_recipe(tmp_path):
    """Write a small recipe (BASE_RECIPE deep-merged with ``extra``) and return its path."""

    def make(extra: dict | None = None, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(merge(BASE_RECIPE, extra or {}), sort_keys=False))
        return path

    return make


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m pipeline ...`` as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=full_env,
        timeout=timeout,
    )


@dataclass
class DemoRun:
    run_dir: Path
    result: subprocess.CompletedProcess
    seconds: float


@pytest.fixture(scope="session")
def shared_demo_run(tmp_path_factory) -> DemoRun:
    """The README's demo (``python -m pipeline run``), run once per session: test_demo checks it and then reruns
    into it, the model-card tests export copies of it."""
    run_dir = tmp_path_factory.mktemp("demo") / "demo"
    started = time.time()
    result = run_cli("run", "--output-dir", str(run_dir), timeout=1200)
    return DemoRun(run_dir, result, time.time() - started)


@pytest.fixture(scope="session")
def tiny_model_dir():
    from pipeline.builtin.tiny_model import tiny_model_path

    return tiny_model_path()


# A short SFT of the tiny model, trained once per test session and shared by the tests of later stages
# (which copy its run directory). 300 steps: the policy writes the preferred style sometimes (best-of-8
# finds it for ~20% of prompts), which is what best-of-n, reward and DPO tests need to move.
POLICY_RECIPE = {
    "name": "policy",
    "seed": 0,
    "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
    "stages": {
        "sft": {
            "kind": "sft",
            "data": {
                "train": {"path": str(TINY / "sft_train.jsonl")},
                "eval": {"path": str(TINY / "sft_eval.jsonl"), "limit": 40},
                "max_length": 128,
            },
            "train": {
                "learning_rate": 3e-3,
                "max_steps": 300,
                "batch_size": 32,
                "warmup": 0.05,
                "logging_steps": 50,
                "save_steps": 300,
                "precision": "fp32",
                "batching": "padded",  # the behaviour the later-stage tests were calibrated on
            },
        },
        "label": {
            "kind": "bon",
            "policy_from": "sft",
            "prompts": {"path": str(TINY / "prompts_label.jsonl"), "limit": 240},
            "n": 8,
            "max_new_tokens": 24,
            "shard_size": 60,
            "scorer": {"checker": "pipeline.builtin.tasks:preferred"},
            "report": {
                "preferred": "pipeline.builtin.tasks:preferred",
                "correct": "pipeline.builtin.tasks:answer_correct",
            },
        },
    },
}


# A small GRPO stage on the policy above (its train settings are each test's own).
GRPO_STAGE = {
    "kind": "grpo",
    "policy_from": "sft",
    "prompts": {"path": str(TINY / "prompts_label.jsonl"), "limit": 64},
    "rewards": {"preferred": {"checker": "pipeline.builtin.tasks:preferred"}},
    "num_generations": 4,
    "max_new_tokens": 16,
}


@pytest.fixture(scope="session")
def policy_run(tmp_path_factory):
    """(recipe path, run dir) with the sft stage of POLICY_RECIPE done. Copy the run dir before writing."""
    from pipeline.config import load_recipe
    from pipeline.run import runner

    root = tmp_path_factory.mktemp("policy")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(POLICY_RECIPE, sort_keys=False))
    run_dir = root / "run"
    entry = runner.run_stage(load_recipe(path), "sft", run_dir)
    assert entry["status"] == "done"
    return path, run_dir


@pytest.fixture
def policy_copy(policy_run, tmp_path):
    """A private copy of the trained policy's run directory: (recipe path, run dir)."""

    path, run_dir = policy_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return path, copy
