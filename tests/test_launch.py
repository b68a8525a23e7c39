"""accelerate launch with 2 CPU processes: DDP (gloo), DeepSpeed ZeRO-2 and ZeRO-3 run the SFT stage.

Each test asserts the world size and distributed type the stage really had (several
launch setups silently run one process, or silently drop DeepSpeed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


@pytest.mark.parametrize(
    "config,expected_type",
    [
        ("cpu_2proc", "MULTI_CPU"),
        ("cpu_zero2", "DEEPSPEED"),
        ("cpu_zero3", "DEEPSPEED"),
    ],
)
def test_two_process_launch_runs_sft(make_recipe, tmp_path, config, expected_type):
    recipe = make_recipe({"stages": {"sft": {"train": {"max_steps": 4, "batch_size": 4, "save_steps": 2}}}})
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # it would silently drop DeepSpeed
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "launch" / f"{config}.yaml"),
        "--main_process_port",
        "0",
        "-m",
        "pipeline",
        "stage",
        "sft",
        str(recipe),
        "--output-dir",
        str(run_dir),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["sft"]
    assert entry["status"] == "done"
    assert entry["world_size"] == 2
    assert entry["distributed_type"] == expected_type
    assert entry["metrics"]["steps"] == 4
    assert entry["metrics"]["eval_loss"] < entry["metrics"]["eval_loss_before"]
    # The saved model is whole (ZeRO-3 shards are gathered on save) and loads on its own.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(entry["outputs"]["model"]["path"])
    assert sum(p.numel() for p in model.parameters()) == entry["metrics"]["parameters"]


def test_world_size_mismatch_is_an_error_not_a_silent_solo_run(monkeypatch):
    """A rank told WORLD_SIZE=2 that ends up in a group of 1 must refuse to train alone."""
    import accelerate

    from pipeline.run import runner
    from pipeline.util.errors import PipelineError

    class Solo:
        num_processes = 1

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(accelerate, "PartialState", Solo)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipelineError, match="started 2 processes but this one joined a group of 1"):
        runner.distributed_state()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert runner.distributed_state().num_processes == 1
