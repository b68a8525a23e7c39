"""Shared fixtures: an isolated cache for the built tiny model, and a factory for small test recipes."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
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
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO, env=full_env, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_model_dir():
    from pipeline.tinymodel import tiny_model_path

    return tiny_model_path()
