"""The tracker never kills training: an unreachable W&B server means offline logging (mode auto) or one clear
error before anything loads (mode online). No real network: WANDB_BASE_URL points at a closed local port."""

from __future__ import annotations

import socket
import time

import pytest

from pipeline.config import load_recipe
from pipeline.observe.tracking import resolve_mode, tracked
from pipeline.util.errors import PipelineError
from pipeline.util.network import unreachable

from conftest import run_cli

KEY = "sekrit-key-0123456789abcdef0123456789abcdef01234567"


def closed_port_url() -> str:
    """http://127.0.0.1:<a port nobody listens on>: connection refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_BASE_URL", closed_port_url())
    monkeypatch.delenv("WANDB_MODE", raising=False)


def wandb_recipe(make_recipe, mode: str):
    return make_recipe({"tracking": {"report_to": ["wandb"], "wandb": {"project": "pipeline-tests", "mode": mode}}})


def test_probe_sees_a_closed_port_and_an_open_one():
    assert unreachable(closed_port_url(), timeout=1.0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert unreachable(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=1.0) is None


def test_auto_mode_with_a_key_and_no_wandb_server_logs_offline_within_seconds(offline_wandb, make_recipe, tmp_path):
    recipe = load_recipe(wandb_recipe(make_recipe, "auto"))
    said: list[str] = []
    started = time.time()
    with tracked(recipe, "sft", tmp_path / "sft", True, say=said.append) as info:
        elapsed = time.time() - started
    assert elapsed < 20, f"W&B fallback took {elapsed:.1f}s"
    assert info["wandb"]["mode"] == "offline"
    assert "cannot be reached" in info["wandb"]["offline_because"]
    notices = [m for m in said if "logging offline" in m]
    assert len(notices) == 1 and "wandb sync " in notices[0] and "127.0.0.1" in notices[0]
    for path in (tmp_path / "sft").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"API key leaked into {path}"


def test_forced_online_mode_fails_in_the_stage_before_any_wandb_run(offline_wandb, make_recipe, monkeypatch):
    recipe = load_recipe(wandb_recipe(make_recipe, "auto"))
    monkeypatch.setenv("WANDB_MODE", "online")  # the environment forcing it counts as forced
    with pytest.raises(PipelineError, match="mode is online but the W&B server .* cannot be reached"):
        resolve_mode(recipe)


def test_forced_online_run_exits_2_before_any_model_loads(offline_wandb, make_recipe, tmp_path):
    run_dir = tmp_path / "run"
    started = time.time()
    out = run_cli("run", str(wandb_recipe(make_recipe, "online")), "--output-dir", str(run_dir))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "W&B: tracking.wandb.mode is online but the W&B server http://127.0.0.1:" in out.stderr
    assert "mode: auto" in out.stderr
    assert time.time() - started < 30
    assert not (run_dir / "sft").exists()  # no stage started, nothing loaded


def test_auto_mode_is_not_probed_without_a_key(make_recipe, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    monkeypatch.setenv("WANDB_BASE_URL", "http://203.0.113.1:9")  # would time out if probed
    started = time.time()
    assert resolve_mode(load_recipe(wandb_recipe(make_recipe, "auto"))) == ("offline", None)
    assert time.time() - started < 1


def wandb_history_keys(path) -> set[str]:
    """Keys logged to an offline W&B run. Its .wandb file is a LevelDB-style log (32 KiB blocks of records with
    a 7-byte header: crc, length, type) of protobuf Records, after a 7-byte ':W&B' file header."""
    import struct
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, keys = 32768, 7, b"", set()
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # the rest of a block too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full / first, then middle / last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return keys


def tensorboard_tags(log_dir) -> dict[str, set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, set[str]] = {"scalars": set(), "images": set(), "tensors": set()}
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    return tags


@pytest.mark.slow
def test_tensorboard_and_wandb_get_the_same_metrics_eval_table_and_plots(make_recipe, tmp_path):
    import json
    from pathlib import Path

    from conftest import TINY

    recipe = make_recipe(
        {
            "tracking": {"report_to": ["tensorboard", "wandb"], "wandb": {"mode": "offline"}},
            "stages": {
                "eval": {
                    "kind": "eval",
                    "prompts": {"path": str(TINY / "prompts_eval.jsonl"), "limit": 16},
                    "policies": ["sft"],
                    "reference": "sft",
                    "max_new_tokens": 16,
                    "kl_samples": 1,
                    "checkers": {
                        "preference_pass": "pipeline.builtin.tasks:preferred",
                        "gold_accuracy": "pipeline.builtin.tasks:answer_correct",
                    },
                }
            },
        }
    )
    run_dir = tmp_path / "run"
    out = run_cli("run", str(recipe), "--output-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    console = (out.stdout + out.stderr).splitlines()
    assert not [line for line in console if line.startswith("wandb:")]  # W&B's banners and summaries
    assert len([line for line in console if line.startswith("W&B: logged offline")]) == 2  # one line a stage
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    for name in ("sft", "eval"):
        tracker = stages[name]["tracker"]
        board = tensorboard_tags(Path(tracker["tensorboard"]["dir"]))
        logged = wandb_history_keys(next(Path(tracker["wandb"]["dir"]).glob("run-*.wandb")))
        results = {tag for tag in board["scalars"] if tag.startswith("results/")}
        assert results and results == {key for key in logged if key.startswith("results/")}
        if name == "sft":  # the Trainer's own curves reach both
            assert {"train/loss", "eval/loss"} <= board["scalars"] & logged
            assert "results/eval_loss" in results
        else:  # every policy's figures, the held-out table and the plots, in both
            assert {"results/policies/sft/preference_pass", "results/policies/sft/kl_to_ref"} <= results
            assert "tables/policies/text_summary" in board["tensors"] and "tables/policies/_type" in logged
            assert "plots/frontier" in board["images"] and "plots/frontier/_type" in logged
