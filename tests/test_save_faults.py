"""Faults during saves: a full disk mid-checkpoint, a damaged latest checkpoint, a damaged manifest."""

from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import pytest

from pipeline.config import load_recipe
from pipeline.run import runner
from pipeline.run.manifest import Manifest
from pipeline.train.checkpoints import checkpoint_problem, checkpoints, last_good_checkpoint
from pipeline.util.errors import DiskFull, PipelineError

from conftest import run_cli


def fake_checkpoint(path: Path, step: int, weights: bytes | None = None) -> Path:
    """A checkpoint directory with the files the Trainer writes: weights, optimizer state, trainer state."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(path / "model.safetensors"))
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights)
    torch.save({"state": {}, "step": step}, path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_checkpoint_checks_find_each_kind_of_damage(tmp_path):
    good = fake_checkpoint(tmp_path / "checkpoint-10", 10)
    assert checkpoint_problem(good) is None

    full = (good / "model.safetensors").read_bytes()
    cut = fake_checkpoint(tmp_path / "checkpoint-20", 20, weights=full[: len(full) - 100])
    assert "model.safetensors: truncated" in checkpoint_problem(cut)

    header_cut = fake_checkpoint(tmp_path / "checkpoint-30", 30, weights=struct.pack("<Q", 10_000) + b"{")
    assert "truncated in its header" in checkpoint_problem(header_cut)

    optimizer_cut = fake_checkpoint(tmp_path / "checkpoint-40", 40)
    data = (optimizer_cut / "optimizer.pt").read_bytes()
    (optimizer_cut / "optimizer.pt").write_bytes(data[: len(data) // 2])
    assert "optimizer.pt: truncated" in checkpoint_problem(optimizer_cut)

    unfinished = fake_checkpoint(tmp_path / "checkpoint-50", 50)
    (unfinished / "trainer_state.json").unlink()
    assert "no trainer_state.json" in checkpoint_problem(unfinished)

    bad_state = fake_checkpoint(tmp_path / "checkpoint-60", 60)
    (bad_state / "trainer_state.json").write_text('{"global_step": 6')
    assert "trainer_state.json is not valid JSON" in checkpoint_problem(bad_state)


def test_resume_point_skips_damaged_checkpoints_sets_them_aside_and_warns(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint-10", 10)
    fake_checkpoint(tmp_path / "checkpoint-20", 20)
    newest = fake_checkpoint(tmp_path / "checkpoint-30", 30)
    (newest / "trainer_state.json").unlink()
    warnings: list[str] = []
    assert last_good_checkpoint(tmp_path, warnings.append) == str(tmp_path / "checkpoint-20")
    assert len(warnings) == 1 and "checkpoint-30 is damaged (no trainer_state.json" in warnings[0]
    assert "resuming from the checkpoint before it" in warnings[0]
    assert (tmp_path / "corrupt-checkpoint-30" / "model.safetensors").is_file()  # kept for inspection
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-10"]  # out of the Trainer's sight


def _fill_disk_at_save(monkeypatch, at_step: int) -> None:
    """torch.save of checkpoint-<at_step>'s optimizer state writes half its bytes, then the disk is full."""
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)) and f"checkpoint-{at_step}" in str(f):
            real_save(obj, f, *args, **kwargs)
            data = Path(f).read_bytes()
            Path(f).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_disk_full_during_a_checkpoint_fails_clearly_then_the_rerun_resumes_from_the_one_before(
    make_recipe, tmp_path, monkeypatch, capsys
):
    recipe = load_recipe(make_recipe({"stages": {"sft": {"train": {"max_steps": 18, "save_steps": 6}}}}))
    run_dir = tmp_path / "run"
    _fill_disk_at_save(monkeypatch, at_step=12)
    with pytest.raises(DiskFull) as failure:
        runner.run_stage(recipe, "sft", run_dir)
    message = str(failure.value)
    assert "stage 'sft': the disk is full while writing" in message and "checkpoint-12" in message
    assert "resumes from its last complete checkpoint" in message
    entry = Manifest(run_dir).stage("sft")
    assert entry["status"] == "failed" and "the disk is full" in entry["error"]
    assert not (run_dir / "sft" / "model").exists()  # nothing half-written marked complete
    ckpt_dir = next((run_dir / "sft").glob("checkpoints-*"))
    assert checkpoint_problem(ckpt_dir / "checkpoint-6") is None  # the earlier checkpoint is intact

    monkeypatch.undo()  # space freed
    capsys.readouterr()
    entry = runner.run_stage(recipe, "sft", run_dir)
    assert entry["status"] == "done" and entry["metrics"]["steps"] == 18
    assert entry["metrics"]["resumed_from"] == "checkpoint-6"
    out = capsys.readouterr().out
    assert "[sft] warning: checkpoint-12 is damaged" in out
    assert (ckpt_dir / "corrupt-checkpoint-12").is_dir()


def test_a_damaged_manifest_falls_back_to_its_previous_version(make_recipe, tmp_path, capsys):
    recipe = load_recipe(make_recipe())
    run_dir = tmp_path / "run"
    runner.run_stage(recipe, "sft", run_dir)
    manifest = run_dir / "manifest.json"
    assert json.loads((run_dir / "manifest.json.bak").read_text())["stages"]["sft"]["status"] == "running"
    manifest.write_text(manifest.read_text()[:200])  # truncated from outside
    capsys.readouterr()
    stages = Manifest(run_dir).read()["stages"]
    assert stages["sft"]["status"] == "running"  # one update behind: sft reruns and resumes
    err = capsys.readouterr().err
    assert "manifest.json is damaged (not valid JSON" in err and "using the previous version" in err
    again = runner.run_stage(recipe, "sft", run_dir)
    assert again["status"] == "done" and again["metrics"]["resumed_from"] == "checkpoint-12"
    assert json.loads(manifest.read_text())["stages"]["sft"]["status"] == "done"  # repaired


def test_a_damaged_manifest_without_backup_is_one_clear_error_with_the_recovery_step(make_recipe, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text('{"stages": {"sft": {"status": "do')
    with pytest.raises(PipelineError, match="no usable manifest.json.bak. To recover: move it aside"):
        Manifest(run_dir).read()
    out = run_cli("run", str(make_recipe()), "--output-dir", str(run_dir))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"error: {run_dir / 'manifest.json'} is damaged (not valid JSON" in out.stderr
    assert f"mv {run_dir / 'manifest.json'}" in out.stderr


@pytest.mark.parametrize("batching", ["grouped", "padded"])
def test_a_run_interrupted_mid_epoch_resumes_to_the_same_model_as_an_uninterrupted_one(
    make_recipe, tmp_path, monkeypatch, batching
):
    recipe = load_recipe(
        make_recipe({"stages": {"sft": {"train": {"max_steps": 30, "save_steps": 6, "batching": batching}}}})
    )
    straight = runner.run_stage(recipe, "sft", tmp_path / "straight")

    from transformers.trainer_callback import CallbackHandler

    real_step_end = CallbackHandler.on_step_end

    def die_at_step_15(self, args, state, control):  # mid-epoch (20 batches of 8 a epoch), after checkpoint-12
        if state.global_step == 15:
            raise KeyboardInterrupt
        return real_step_end(self, args, state, control)

    monkeypatch.setattr(CallbackHandler, "on_step_end", die_at_step_15)
    with pytest.raises(KeyboardInterrupt):
        runner.run_stage(recipe, "sft", tmp_path / "resumed")
    monkeypatch.undo()
    resumed = runner.run_stage(recipe, "sft", tmp_path / "resumed")
    assert resumed["metrics"]["resumed_from"] == "checkpoint-12"
    assert resumed["metrics"]["eval_loss"] == pytest.approx(straight["metrics"]["eval_loss"], rel=1e-6, abs=1e-7)
