"""The model card ``export`` writes (README.md: Hub metadata header, the lineage from the manifest, the evaluation)
and ``export --push-to-hub``, stopped at the HTTP boundary: huggingface_hub's HfApi methods recorded, or local
servers that refuse the token or drop the connection, or a closed port. Nothing here reaches the real Hub.

The end-to-end card test runs the demo recipe once per module (slow); the rest use a hand-built run directory
whose manifest and per-stage recipes are written as the runner writes them (no training).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import shutil
import socket
import threading
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.config import recipe_from_dict
from pipeline.run.manifest import stage_hash

from conftest import TINY, run_cli

FAKE_TOKEN = "hf_fakeTOKENfortests0123456789"
DEMO_LINEAGE = ["sft", "label", "reward", "bon", "dpo"]  # the demo's dpo is built from these, in run order


# ---------------------------------------------------------------- reading a card


def split_card(text: str) -> tuple[dict, str]:
    """(metadata header, body) of a Hugging Face model card."""
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    assert match, "the card does not open with a --- YAML header ---"
    return yaml.safe_load(match.group(1)), match.group(2)


def sections(body: str) -> dict[str, str]:
    """Lineage stage name -> the text of its section (### N. `name` (kind))."""
    parts = re.split(r"^### \d+\. `([^`]+)` \([^)]*\)\n", body, flags=re.M)
    return {parts[i]: parts[i + 1].split("\n## ")[0] for i in range(1, len(parts), 2)}


def table_row(body: str, first_cell: str) -> tuple[list[str], list[str]]:
    """(header, cells) of the markdown table row that starts with ``first_cell``."""
    lines = body.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            header_at = max(j for j in range(i) if lines[j].startswith("|") and not lines[j - 1].startswith("|"))
            return [c.strip() for c in lines[header_at].strip().strip("|").split("|")], cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def sha16(path: Path) -> str:
    """A data file's fingerprint, computed here independently of the pipeline (small files: sha256 of the bytes)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def local_files(node) -> list[str]:
    """Every local data file (a source's ``path``) in a stage's saved config."""
    if isinstance(node, dict):
        own = [node["path"]] if isinstance(node.get("path"), str) and "hub" in node else []
        return own + [p for v in node.values() for p in local_files(v)]
    if isinstance(node, list):
        return [p for v in node for p in local_files(v)]
    return []


# ---------------------------------------------------------------- a hand-built run


def hand_recipe() -> dict:
    """The demo's shape on a Hub base model and one Hub dataset, plus rs_sft (not in dpo's lineage)."""
    rows = {"path": str(TINY / "sft_train.jsonl"), "limit": 50}
    return {
        "name": "hand",
        "seed": 3,
        "model": {"name_or_path": "Qwen/Qwen2.5-0.5B", "dtype": "bfloat16"},
        "lora": {"r": 8, "alpha": 16},
        "tracking": {"report_to": "none"},
        "stages": {
            "sft": {
                "kind": "sft",
                "data": {
                    "train": rows,
                    "eval": {"hub": "tatsu-lab/alpaca", "split": "train[:100]"},
                    "template": "chat",
                },
                "train": {"learning_rate": 2e-4, "max_steps": 40, "batch_size": 4, "save_steps": 20},
            },
            "label": {
                "kind": "bon",
                "policy_from": "sft",
                "prompts": {"path": str(TINY / "prompts_label.jsonl")},
                "n": 4,
                "scorer": {"checker": "pipeline.builtin.tasks:preferred"},
            },
            "reward": {"kind": "reward", "base_from": "sft", "pairs_from": "label", "train": {"max_steps": 5}},
            "bon": {
                "kind": "bon",
                "policy_from": "sft",
                "prompts": {"path": str(TINY / "prompts_bon.jsonl")},
                "n": 6,
                "scorer": {"reward_from": "reward"},
            },
            "rs_sft": {"kind": "sft", "init_from": "sft", "data": {"train": {"from_stage": "bon", "output": "best"}}},
            "dpo": {"kind": "dpo", "policy_from": "sft", "pairs_from": "bon", "beta": 0.2, "train": {"max_steps": 7}},
            "eval": {
                "kind": "eval",
                "prompts": {"path": str(TINY / "prompts_eval.jsonl")},
                "policies": ["sft", "dpo"],
                "reference": "sft",
                "checkers": {"preference_pass": "pipeline.builtin.tasks:preferred"},
            },
        },
    }


EVAL_METRICS = {
    "prompts": 12,
    "reference": "sft",
    "policies": {
        "sft": {"preference_pass": 0.125, "response_length": 9.5, "kl_to_ref": 0.0},
        "dpo": {"preference_pass": 0.8125, "response_length": 11.25, "kl_to_ref": 0.0625},
    },
    "frontier": {
        "alignment": "preference_pass",
        "capability": None,
        "reference": "sft",
        "points": [
            {"policy": "sft", "alignment": 0.125, "capability": None, "kl_to_ref": 0.0},
            {"policy": "dpo", "alignment": 0.8125, "capability": None, "kl_to_ref": 0.0625},
        ],
    },
}


def build_run(root: Path, raw: dict | None = None) -> Path:
    """A finished run directory as the runner leaves it: manifest (hashes, upstream, outputs, metrics), each
    stage's resolved recipe.yaml, the files stages hand each other, and full-weight "models" (a config file)."""
    from pipeline.run.runner import with_run_date

    recipe = recipe_from_dict(raw or hand_recipe())
    run_dir = root / "run"
    stages, hashes = {}, {}
    for name, cfg in recipe.stages.items():
        stage_dir = run_dir / name
        stage_dir.mkdir(parents=True)
        # as the runner saves it: the recipe its stages saw, with the run's date for the chat template
        (stage_dir / "recipe.yaml").write_text(with_run_date(recipe, "2026-01-02").resolved_yaml())
        upstream = {target: hashes[target] for target in cfg.upstream().values()}
        hashes[name] = stage_hash(recipe, name, upstream)
        outputs, metrics = _stage_outputs(stage_dir, cfg.kind)
        stages[name] = {
            "kind": cfg.kind,
            "status": "done",
            "config_hash": hashes[name],
            "upstream": upstream,
            "ended_at": "2026-01-02T03:04:05+0000",
            "duration_s": 12.5,
            "outputs": outputs,
            "metrics": metrics,
            "versions": {"python": "3.11", "trl": "1.0"},
            "git_commit": "abc123",
            "world_size": 1,
        }
    manifest = {"recipe": recipe.name, "run_dir": str(run_dir), "run_date": "2026-01-02", "stages": stages}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "recipe.yaml").write_text(recipe.resolved_yaml())
    return run_dir


def _stage_outputs(stage_dir: Path, kind: str) -> tuple[dict, dict]:
    """What a stage of each shape records: selected rows and pairs, an evaluation report, or a model."""
    metrics = {"steps": 7, "eval_loss": 0.4321, "heldout_accuracy": 0.91, "prompts": 12, "n": 4}
    if kind == "bon":
        for output in ("best", "pairs"):
            (stage_dir / f"{output}.jsonl").write_text(json.dumps({"output": output, "stage": stage_dir.name}) + "\n")
        return {"best": str(stage_dir / "best.jsonl"), "pairs": str(stage_dir / "pairs.jsonl")}, metrics
    if kind == "eval":
        (stage_dir / "metrics.json").write_text(json.dumps(EVAL_METRICS))
        (stage_dir / "frontier.png").write_bytes(b"\x89PNG fake")
        outputs = {"metrics": str(stage_dir / "metrics.json"), "frontier": str(stage_dir / "frontier.png")}
        return outputs, {"prompts": 12}
    (stage_dir / "model").mkdir()
    (stage_dir / "model" / "config.json").write_text(json.dumps({"model_type": "llama", "stage": stage_dir.name}))
    return {"model": {"path": str(stage_dir / "model"), "kind": "full", "base": None}}, metrics


@pytest.fixture
def hand_run(tmp_path) -> Path:
    return build_run(tmp_path)


def test_card_of_a_hand_built_run_names_the_lineage_data_and_evaluation(hand_run, tmp_path):
    from pipeline.run.export import export

    info = export(hand_run, "dpo", tmp_path / "out", say=lambda _: None, license="apache-2.0")
    meta, body = split_card((tmp_path / "out" / "README.md").read_text())
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and meta["datasets"] == ["tatsu-lab/alpaca"]
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"sft", "bon", "reward", "dpo", "trl"} <= set(meta["tags"]) and "eval" not in meta["tags"]
    assert "peft" not in meta["tags"]  # a full model was copied: no adapter merged
    assert json.loads((tmp_path / "out" / "export.json").read_text())["card"] == "README.md" == info["card"]

    found = sections(body)
    assert list(found) == ["sft", "label", "reward", "bon", "dpo"]  # rs_sft and eval are not upstream of dpo
    assert f"`sft_train.jsonl`, local file (first 50 rows) | `{sha16(TINY / 'sft_train.jsonl')}`" in found["sft"]
    assert "Hub dataset `tatsu-lab/alpaca` (split train[:100])" in found["sft"]
    assert (
        f"`{sha16(TINY / 'prompts_bon.jsonl')}`" in found["bon"]
        and "`reward` (as `scorer.reward_from`)" in found["bon"]
    )
    pairs = hand_run / "bon" / "pairs.jsonl"
    assert f"output `pairs` of stage `bon` (`pairs.jsonl`) | `{sha16(pairs)}`" in found["dpo"]
    assert "`beta=0.2`" in found["dpo"] and "`max_steps=7`" in found["dpo"] and "save_steps" not in found["dpo"]
    assert "`learning_rate=0.0002`" in found["sft"] and "`epochs=" not in found["sft"]  # max_steps overrides epochs
    assert all("matches the settings and data fingerprints" in text for text in found.values())
    assert "LoRA r=8, alpha=16" in body and "`Qwen/Qwen2.5-0.5B` (on the Hugging Face Hub)" in body
    assert "tokenizer's chat template" in body and "2026-01-02" in body  # the template it learned, the run's date

    header, dpo_row = table_row(body, "**dpo**")  # the evaluation table, this model's row in bold
    for column, value in EVAL_METRICS["policies"]["dpo"].items():
        assert float(dpo_row[header.index(column)]) == pytest.approx(value, abs=5.1e-4)
    assert "![alignment trade-off](eval_frontier.png)" in body
    assert (tmp_path / "out" / "eval_frontier.png").read_bytes() == (hand_run / "eval" / "frontier.png").read_bytes()


def test_card_says_when_a_data_file_changed_since_the_stage_ran(tmp_path):
    from pipeline.run.card import render_card

    data = tmp_path / "rows.jsonl"
    data.write_text((TINY / "sft_train.jsonl").read_text())
    raw = hand_recipe()
    raw["stages"]["sft"]["data"]["train"]["path"] = str(data)
    run_dir = build_run(tmp_path, raw)
    before = sections(split_card(render_card(run_dir, "sft", {}))[1])["sft"]
    data.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")
    after = sections(split_card(render_card(run_dir, "sft", {}))[1])["sft"]
    assert "matches the settings" in before and "differs: a data file or setting changed" in after
    assert f"`{sha16(data)}`" in after and f"`{sha16(data)}`" not in before


def test_card_without_recipes_or_hub_names_still_renders_from_the_manifest(hand_run):
    """A run directory whose recipe files are gone (or a kind no longer installed): what the manifest says."""
    from pipeline.run.card import render_card

    for path in hand_run.rglob("recipe.yaml"):
        path.unlink()
    meta, body = split_card(render_card(hand_run, "dpo", {"merged_adapter": True}))
    assert "base_model" not in meta and "license" not in meta and {"peft", "lora", "dpo"} <= set(meta["tags"])
    assert list(sections(body)) == DEMO_LINEAGE  # followed through the manifest's recorded upstream hashes
    assert "not checked: its resolved recipe is not in the run directory" in body


# ---------------------------------------------------------------- --push-to-hub


class Hub:
    """A local stand-in for the Hub's address: accepts TCP (so the reachability probe passes) and answers every
    HTTP request with ``status``, echoing the Authorization header (a server message that quotes the token)."""

    def __init__(self, status: int = 401):
        def reply(handler):
            said = "Invalid credentials: " + handler.headers.get("authorization", "")
            body = json.dumps({"error": said}).encode()
            handler.send_response(status)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)

        handler = type("H", (http.server.BaseHTTPRequestHandler,), {"do_POST": reply, "do_GET": reply})
        handler.log_message = lambda *_: None
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def dropping_server() -> tuple[str, socket.socket]:
    """An address that accepts a connection and closes it at once: the network fails mid-request."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)

    def drop():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=drop, daemon=True).start()
    return f"http://127.0.0.1:{sock.getsockname()[1]}", sock


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """A fake token in HF_TOKEN, no saved login, online mode, and the Hub at a local server (answers 401)."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    hub = Hub(status=401)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    yield hub
    hub.close()


@pytest.fixture
def recorded(monkeypatch):
    """HfApi.create_repo / upload_folder replaced by recorders: the push stops at the HTTP boundary."""
    from huggingface_hub import HfApi

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, "endpoint": self.endpoint, **kwargs}))
        return type("RepoUrl", (str,), {"repo_id": repo_id})(f"{self.endpoint}/{repo_id}")

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in folder.iterdir())}))
        return type("CommitInfo", (), {"oid": "c0ffee"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def push(run_dir: Path, out: Path, *extra: str) -> int:
    return cli.main(["export", str(run_dir), "dpo", str(out), "--push-to-hub", "me/hand-dpo", *extra])


def assert_no_token(capsys_text: str, out: Path) -> None:
    assert FAKE_TOKEN not in capsys_text
    for path in out.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_push_creates_the_repo_and_uploads_the_export_folder(hand_run, tmp_path, hub_env, recorded, capsys):
    out = tmp_path / "out"
    assert push(hand_run, out, "--private", "--license", "mit") == 0
    said = capsys.readouterr()
    (create, args), (upload, kwargs) = recorded
    assert (create, args["repo_id"], args["private"], args["exist_ok"]) == ("create_repo", "me/hand-dpo", True, True)
    assert args["endpoint"] == hub_env.url
    assert upload == "upload_folder" and kwargs["repo_id"] == "me/hand-dpo" and Path(kwargs["folder_path"]) == out
    assert {"README.md", "export.json", "config.json"} <= set(kwargs["files"])
    assert f"pushed to {hub_env.url}/me/hand-dpo" in said.out
    meta, body = split_card((out / "README.md").read_text())
    assert meta["license"] == "mit" and 'from_pretrained("me/hand-dpo")' in body and body.startswith("\n# me/hand-dpo")
    assert_no_token(said.out + said.err, out)


def test_push_without_a_token_says_how_to_log_in_and_keeps_the_export(
    hand_run, tmp_path, hub_env, recorded, capsys, monkeypatch
):
    monkeypatch.delenv("HF_TOKEN")
    out = tmp_path / "out"
    assert push(hand_run, out) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "no Hugging Face token" in err and "hf auth login" in err and "HF_TOKEN" in err
    assert f"kept in {out}" in err and (out / "README.md").is_file() and (out / "config.json").is_file()
    assert recorded == []  # nothing was sent


def test_push_offline_or_unreachable_is_one_error_and_the_same_command_later_pushes(
    hand_run, tmp_path, hub_env, recorded, capsys, monkeypatch
):
    out = tmp_path / "out"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert push(hand_run, out) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "no Hugging Face token" not in err and (out / "README.md").is_file()

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    assert push(hand_run, out) == 2
    said = capsys.readouterr()
    assert said.err.count("error:") == 1 and "cannot be reached" in said.err and "Traceback" not in said.err
    assert "run the same command again" in said.err and recorded == []
    card = (out / "README.md").read_bytes()

    monkeypatch.setenv("HF_ENDPOINT", hub_env.url)  # the network is back
    assert push(hand_run, out) == 0
    said = capsys.readouterr()
    assert "already holds the export" in said.out and [name for name, _ in recorded] == ["create_repo", "upload_folder"]
    assert (out / "README.md").read_bytes() == card
    assert_no_token(said.out + said.err, out)


def test_push_refused_token_and_dropped_connection_through_huggingface_hub(
    hand_run, tmp_path, hub_env, capsys, monkeypatch
):
    """No recorders: huggingface_hub's real create_repo against a server that answers 401 (quoting the token in
    its message) and one that drops the connection."""
    out = tmp_path / "out"
    assert push(hand_run, out) == 2
    said = capsys.readouterr()
    assert "refused the token (401)" in said.err and "hf auth login" in said.err and "***" in said.err
    assert_no_token(said.out + said.err, out)

    url, sock = dropping_server()
    monkeypatch.setenv("HF_ENDPOINT", url)
    try:
        assert push(hand_run, out) == 2
    finally:
        sock.close()
    err = capsys.readouterr().err
    assert "connection to the Hub" in err and "failed during the upload" in err and err.count("error:") == 1


def test_push_arguments_are_checked_before_anything_is_exported(hand_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["export", str(hand_run), "dpo", str(out), "--private"]) == 2
    assert "--private applies to a repo that --push-to-hub" in capsys.readouterr().err
    assert cli.main(["export", str(hand_run), "dpo", str(out), "--push-to-hub", "not a/valid//id"]) == 2
    assert "is not a Hub repo id" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------- the demo, end to end


@pytest.fixture(scope="module")
def demo_run(shared_demo_run, tmp_path_factory) -> Path:
    """A copy of the session's demo run (conftest: run once, shared with test_demo), for this module's card tests."""
    assert shared_demo_run.result.returncode == 0, shared_demo_run.result.stderr[-4000:]
    run_dir = tmp_path_factory.mktemp("demo-card") / "run"
    shutil.copytree(shared_demo_run.run_dir, run_dir)  # a moved run directory: the manifest's paths follow it
    return run_dir


@pytest.mark.slow
def test_demo_dpo_card_records_its_whole_lineage_and_evaluation(demo_run, tmp_path):
    out = tmp_path / "demo-dpo"
    env = {"HF_TOKEN": FAKE_TOKEN, "HF_ENDPOINT": closed_port_url(), "HF_HUB_OFFLINE": "0"}
    result = run_cli("export", str(demo_run), "dpo", str(out), "--push-to-hub", "me/demo-dpo", env=env)
    assert result.returncode == 2 and "cannot be reached" in result.stderr  # no Hub here: the export is kept
    assert_no_token(result.stdout + result.stderr, out)
    manifest = json.loads((demo_run / "manifest.json").read_text())["stages"]
    meta, body = split_card((out / "README.md").read_text())

    recipe = yaml.safe_load((demo_run / "dpo" / "recipe.yaml").read_text())
    assert "base_model" not in meta and f"`{recipe['model']['name_or_path']}` (not on the Hub)" in body
    assert {manifest[n]["kind"] for n in DEMO_LINEAGE} | {"trl"} <= set(meta["tags"])
    assert ("peft" in meta["tags"]) == json.loads((out / "export.json").read_text())["merged_adapter"]
    assert (meta["library_name"], meta["pipeline_tag"]) == ("transformers", "text-generation")

    found = sections(body)
    assert list(found) == DEMO_LINEAGE
    for name in DEMO_LINEAGE:
        config = yaml.safe_load((demo_run / name / "recipe.yaml").read_text())["stages"][name]
        for path in local_files(config):
            assert f"`{Path(path).name}`, local file" in found[name] and f"`{sha16(Path(path))}`" in found[name]
        assert f"config hash `{manifest[name]['config_hash']}` (matches" in found[name]
        for key, value in manifest[name]["metrics"].items():
            if f"`{key}=" in found[name] and isinstance(value, float):
                assert f"`{key}={value:.4g}`" in found[name]
    assert f"`{sha16(Path(manifest['bon']['outputs']['pairs']))}`" in found["dpo"]  # its pairs, from bon
    assert f"`beta={recipe['stages']['dpo']['beta']:.4g}`" in found["dpo"]

    evaluation = json.loads((demo_run / "eval" / "metrics.json").read_text())
    header, row = table_row(body, "**dpo**")
    numeric = {k: v for k, v in evaluation["policies"]["dpo"].items() if isinstance(v, (int, float))}
    assert numeric and set(numeric) <= set(header)
    for column, value in numeric.items():
        assert float(row[header.index(column)]) == pytest.approx(value, abs=5.1e-4), column
    point = next(p for p in evaluation["frontier"]["points"] if p["policy"] == "dpo")
    _, frontier_row = table_row(body, "dpo")  # the trade-off table
    assert float(frontier_row[1]) == pytest.approx(point["alignment"], abs=5.1e-4)
    assert (out / "eval_frontier.png").stat().st_size > 0


@pytest.mark.slow
def test_demo_reward_model_card_is_a_classifier_built_from_sft_and_labels(demo_run, tmp_path):
    result = run_cli("export", str(demo_run), "reward", str(tmp_path / "rm"))
    assert result.returncode == 0, result.stderr[-2000:]
    meta, body = split_card((tmp_path / "rm" / "README.md").read_text())
    assert meta["pipeline_tag"] == "text-classification" and "AutoModelForSequenceClassification" in body
    assert list(sections(body)) == ["sft", "label", "reward"]
    assert not any(str(value).startswith("/") for value in meta.values())  # no local paths in the metadata
