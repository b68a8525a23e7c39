"""One command runs the pipeline: caching, resume after kill -9, stopping at a failure, the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import BASE_RECIPE, GRPO_STAGE, REPO, TINY, merge, run_cli

pytestmark = pytest.mark.slow


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


def start_run(recipe: Path, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(recipe), "--output-dir", str(run_dir)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "timed out waiting for the kill point"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_kill_during_sft_then_run_resumes_from_the_checkpoint(tmp_path):
    raw = merge(BASE_RECIPE, {"stages": {"sft": {"train": {"max_steps": 160, "save_steps": 20, "logging_steps": 20}}}})
    recipe, run_dir = write(tmp_path, raw), tmp_path / "run"
    proc = start_run(recipe, run_dir)
    kill_when(proc, lambda: any((run_dir / "sft").glob("checkpoints-*/checkpoint-40/trainer_state.json")))
    assert manifest(run_dir)["sft"]["status"] == "running"  # killed: never marked done
    assert not (run_dir / "sft" / "model").exists()
    out = run_cli("run", str(recipe), "--output-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    entry = manifest(run_dir)["sft"]
    assert entry["status"] == "done" and entry["metrics"]["steps"] == 160
    assert entry["metrics"]["resumed_from"].startswith("checkpoint-")
    assert int(entry["metrics"]["resumed_from"].split("-")[1]) >= 40  # resumed, not restarted
    assert entry["metrics"]["eval_loss_before"] > entry["metrics"]["eval_loss"]  # the original 'before' survived


def test_kill_during_bon_then_run_resumes_from_finished_shards(policy_copy):
    recipe_path, run_dir = policy_copy
    raw = yaml.safe_load(Path(recipe_path).read_text())
    raw["stages"]["label"].update(shard_size=20, prompts={"path": str(TINY / "prompts_label.jsonl"), "limit": 400})
    recipe = write(run_dir.parent, raw)
    proc = start_run(recipe, run_dir)
    kill_when(proc, lambda: len(list((run_dir / "label").glob("shards-*/shard-*.jsonl"))) >= 2)
    done_before = len(list((run_dir / "label").glob("shards-*/shard-*.jsonl")))
    assert manifest(run_dir)["label"]["status"] == "running"
    assert not (run_dir / "label" / "candidates.jsonl").exists()
    out = run_cli("run", str(recipe), "--output-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    stages = manifest(run_dir)
    assert stages["sft"]["status"] == "done" and "cached" in out.stdout  # sft was not redone
    entry = stages["label"]
    assert entry["status"] == "done" and entry["metrics"]["shards_resumed"] >= done_before
    candidates = (run_dir / "label" / "candidates.jsonl").read_text().splitlines()
    keys = [(c["prompt_id"], c["sample_idx"]) for c in map(json.loads, candidates)]
    assert len(keys) == len(set(keys)) == entry["metrics"]["prompts"] * 8


TRAINED_AFTER_LABEL = {  # training stages after the labelled-pairs stage, killed once checkpoint-8 exists
    "reward": {"kind": "reward", "base_from": "sft", "pairs_from": "label", "data": {"eval_fraction": 0.15}},
    "dpo": {"kind": "dpo", "policy_from": "sft", "pairs_from": "label", "beta": 0.3},
    "dpo_precomputed": {
        "kind": "dpo",
        "policy_from": "sft",
        "pairs_from": "label",
        "beta": 0.3,
        "precompute_ref_log_probs": True,
    },
    "grpo": GRPO_STAGE,
}
SHORT_TRAIN = {"learning_rate": 1e-4, "max_steps": 60, "batch_size": 8, "save_steps": 4, "logging_steps": 20}


@pytest.mark.parametrize("stage", list(TRAINED_AFTER_LABEL))
def test_kill_during_a_training_stage_then_run_resumes_from_the_checkpoint(policy_copy, stage):
    recipe_path, run_dir = policy_copy
    raw = yaml.safe_load(Path(recipe_path).read_text())
    raw["stages"]["label"]["prompts"]["limit"] = 120
    raw["stages"][stage] = {**TRAINED_AFTER_LABEL[stage], "train": SHORT_TRAIN}
    recipe = write(run_dir.parent, raw)
    proc = start_run(recipe, run_dir)
    kill_when(proc, lambda: any((run_dir / stage).glob("checkpoints-*/checkpoint-8/trainer_state.json")))
    assert manifest(run_dir)[stage]["status"] == "running" and not (run_dir / stage / "model").exists()
    out = run_cli("run", str(recipe), "--output-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[sft] cached" in out.stdout and "[label] cached" in out.stdout
    entry = manifest(run_dir)[stage]
    assert entry["status"] == "done" and entry["metrics"]["steps"] == 60
    assert int(entry["metrics"]["resumed_from"].split("-")[1]) >= 8  # resumed, not restarted
    if stage == "dpo_precomputed":  # the reference log-probs were computed before the kill and reused
        assert entry["metrics"]["ref_logp_batches_computed"] == 0


def test_kill_during_eval_then_run_finishes_it(policy_copy):
    recipe_path, run_dir = policy_copy
    raw = yaml.safe_load(Path(recipe_path).read_text())
    del raw["stages"]["label"]
    raw["stages"]["eval"] = {
        "kind": "eval",
        "prompts": {"path": str(TINY / "prompts_eval.jsonl")},
        "policies": ["sft"],
        "reference": "sft",
        "max_new_tokens": 24,
        "checkers": {"gold_accuracy": "pipeline.builtin.tasks:answer_correct"},
    }
    recipe = write(run_dir.parent, raw)
    proc = start_run(recipe, run_dir)
    # eval of one tiny policy takes about a second: kill it as soon as it is marked running
    kill_when(proc, lambda: manifest_or_empty(run_dir).get("eval", {}).get("status") == "running")
    assert manifest(run_dir)["eval"]["status"] == "running" and not (run_dir / "eval" / "metrics.json").exists()
    out = run_cli("run", str(recipe), "--output-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert manifest(run_dir)["eval"]["status"] == "done" and metrics["prompts"] == 346  # every unique prompt
    assert 0.0 < metrics["policies"]["sft"]["gold_accuracy"] <= 1.0


def manifest_or_empty(run_dir: Path) -> dict:
    try:
        return manifest(run_dir)
    except (OSError, ValueError):
        return {}


def test_failed_stage_stops_the_run_keeps_earlier_outputs_and_reports(make_recipe, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "Add.", "input": "1 and 2", "output": ""}) + "\n")
    raw = yaml.safe_load(make_recipe().read_text())
    raw["stages"]["second"] = {
        "kind": "sft",
        "init_from": "sft",
        "data": {"train": {"path": str(bad)}},
        "train": {"max_steps": 2, "precision": "fp32"},
    }
    raw["stages"]["third"] = {
        "kind": "sft",
        "init_from": "second",
        "data": {"train": {"path": str(TINY / "sft_eval.jsonl")}},
        "train": {"max_steps": 2, "precision": "fp32"},
    }
    recipe, run_dir = write(tmp_path, raw), tmp_path / "run"
    # a bad row in a later stage's file is found before the first stage trains
    out = run_cli("run", str(recipe), "--output-dir", str(run_dir))
    assert out.returncode == 2 and "bad.jsonl row 1 (line 1): 'output' is empty" in out.stderr
    assert "Traceback" not in out.stderr and not (run_dir / "manifest.json").exists()

    # what only the stage can find (token lengths need the tokenizer) stops the run there
    long_row = {"instruction": "Add.", "input": "1 and 2", "output": "three " * 40}
    bad.write_text(json.dumps(long_row) + "\n")
    raw["stages"]["second"]["data"].update(max_length=16, overlength="error")
    out = run_cli("run", str(write(tmp_path, raw)), "--output-dir", str(run_dir))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "1 row(s) of" in out.stderr and "longer than max_length=16" in out.stderr
    stages = manifest(run_dir)
    assert stages["sft"]["status"] == "done" and Path(stages["sft"]["outputs"]["model"]["path"]).is_dir()
    assert stages["second"]["status"] == "failed" and "third" not in stages
    report = (run_dir / "report.md").read_text()
    assert "| sft | sft | done |" in report and "| second | sft | failed |" in report and "max_length=16" in report
    assert "failed" in out.stdout  # the results table is printed even when the run stops


def test_a_moved_run_directory_finds_its_outputs_and_goes_on(make_recipe, tmp_path):
    """Runs are moved (scratch disk -> shared storage): the stages after the move read their upstream outputs
    from where the run is now, and the old place may be gone."""
    import shutil

    raw = yaml.safe_load(make_recipe().read_text())
    recipe, first_place = write(tmp_path, raw), tmp_path / "scratch" / "run"
    assert run_cli("run", str(recipe), "--output-dir", str(first_place)).returncode == 0
    now_at = tmp_path / "shared" / "run"
    now_at.parent.mkdir()
    shutil.move(first_place, now_at)
    raw["stages"]["more"] = {
        "kind": "sft",
        "init_from": "sft",
        "data": {"train": {"path": str(TINY / "sft_eval.jsonl"), "limit": 16}},
        "train": {"max_steps": 2, "batch_size": 8, "precision": "fp32"},
    }
    out = run_cli("run", str(write(tmp_path, raw)), "--output-dir", str(now_at))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[sft] cached" in out.stdout
    stages = manifest(now_at)
    assert stages["more"]["status"] == "done"
    assert stages["sft"]["outputs"]["model"]["path"] == str(now_at / "sft" / "model")
    assert str(first_place) not in (now_at / "manifest.json").read_text()
    export = run_cli("export", str(now_at), "sft", str(tmp_path / "exported"))
    assert export.returncode == 0, export.stderr[-2000:]


def test_launch_config_runs_each_stage_under_accelerate(make_recipe, tmp_path):
    recipe = make_recipe({"stages": {"sft": {"train": {"max_steps": 4, "batch_size": 4, "save_steps": 4}}}})
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    out = run_cli(
        "run",
        str(recipe),
        "--output-dir",
        str(run_dir),
        "--launch",
        str(REPO / "launch/cpu_2proc.yaml"),
        "--set",
        "stages.sft.train.learning_rate=0.002",
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    entry = manifest(run_dir)["sft"]
    assert entry["world_size"] == 2 and entry["status"] == "done"
    saved = yaml.safe_load((run_dir / "sft" / "recipe.yaml").read_text())
    assert saved["stages"]["sft"]["train"]["learning_rate"] == 0.002  # --set travelled to the launched stage


# Ctrl-C and SIGTERM (a scheduler ending the job) mid-training: one line, exit 130 / 143, recorded as interrupted,
# and the rerun resumes from the newest checkpoint to the result of an uninterrupted run.
INTERRUPTED_SFT = {"stages": {"sft": {"train": {"max_steps": 48, "save_steps": 8, "logging_steps": 8}}}}


@pytest.fixture(scope="module")
def uninterrupted_sft(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("straight")
    recipe = write(root, merge(BASE_RECIPE, INTERRUPTED_SFT))
    out = run_cli("run", str(recipe), "--output-dir", str(root / "run"))
    assert out.returncode == 0, out.stderr[-3000:]
    return manifest(root / "run")["sft"]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_mid_training_ends_cleanly_and_the_rerun_resumes(tmp_path, uninterrupted_sft, signum, code):
    from pipeline.train.checkpoints import checkpoint_problem, checkpoints

    recipe, run_dir = write(tmp_path, merge(BASE_RECIPE, INTERRUPTED_SFT)), tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(recipe), "--output-dir", str(run_dir)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not any((run_dir / "sft").glob("checkpoints-*/checkpoint-8/trainer_state.json")):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, "timed out waiting for checkpoint-8"
        time.sleep(0.2)
    proc.send_signal(signum)  # to the run's process alone, as `kill -TERM PID` or a scheduler would
    _, err = proc.communicate(timeout=180)

    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert last.startswith(f"{name}: stage 'sft' interrupted and recorded so"), last
    assert f"To resume, run the same command again: python -m pipeline run {recipe} --output-dir {run_dir}" in last
    entry = manifest(run_dir)["sft"]
    assert entry["status"] == "interrupted" and entry["error"].startswith(f"interrupted by {name}")
    assert not (run_dir / "sft" / "model").exists()
    ckpt_dir = next((run_dir / "sft").glob("checkpoints-*"))
    newest = next(p.name for p in checkpoints(ckpt_dir) if checkpoint_problem(p) is None)
    if signum == signal.SIGTERM:  # the trainer saved a checkpoint at the end of the step it was in
        assert f"({newest} saved)" in last and entry["error"] == f"interrupted by SIGTERM ({newest} saved)"
    assert "| sft | sft | interrupted |" in (run_dir / "report.md").read_text()

    out = run_cli("run", str(recipe), "--output-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    entry = manifest(run_dir)["sft"]
    assert entry["status"] == "done" and entry["metrics"]["steps"] == 48
    assert entry["metrics"]["resumed_from"] == newest  # the newest complete checkpoint, not a restart
    straight = uninterrupted_sft["metrics"]
    assert entry["metrics"]["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-6, abs=1e-7)
    assert entry["metrics"]["eval_loss_before"] == pytest.approx(straight["eval_loss_before"], rel=1e-6)
