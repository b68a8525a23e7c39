"""SFT on the built-in tiny model: the real CLI, full / LoRA / 4-bit QLoRA, loss masking, tracking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import modeling
from pipeline.config import load_recipe
from pipeline.run import runner

from conftest import SHARED_DATA, run_cli

pytestmark = pytest.mark.slow


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def test_cli_runs_full_sft_and_records_everything(make_recipe, tmp_path):
    recipe = make_recipe()
    run_dir = tmp_path / "run"
    out = run_cli("run", str(recipe), "--stages", "sft", "--output-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    entry = manifest(run_dir)["stages"]["sft"]
    assert entry["status"] == "done"
    assert entry["metrics"]["eval_loss"] < entry["metrics"]["eval_loss_before"] - 1.0
    assert entry["metrics"]["steps"] == 12
    assert entry["outputs"]["model"]["kind"] == "full"
    assert len(entry["config_hash"]) == 16 and entry["versions"]["trl"]
    model_dir = Path(entry["outputs"]["model"]["path"])
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    saved = yaml.safe_load((run_dir / "sft" / "recipe.yaml").read_text())
    assert saved["stages"]["sft"]["train"]["max_steps"] == 12
    summary = json.loads((run_dir / "sft" / "data_summary.json").read_text())
    assert summary["train"]["rows"] == 160 and summary["eval"]["kept"] == 40
    assert "eval_loss" in out.stdout and "done" in out.stdout  # the results table

    # Same recipe again: cached, nothing retrained.
    again = run_cli("run", str(recipe), "--stages", "sft", "--output-dir", str(run_dir))
    assert again.returncode == 0 and "cached" in again.stdout
    assert manifest(run_dir)["stages"]["sft"]["ended_at"] == entry["ended_at"]


class ModelSpy:
    """Wraps modeling.load_policy to keep the trained model object and a snapshot of its weights at load."""

    def __init__(self, monkeypatch):
        self.model = None
        self.before: dict[str, torch.Tensor] = {}
        original = modeling.load_policy

        def spy(*args, **kwargs):
            self.model = original(*args, **kwargs)
            self.before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            return self.model

        monkeypatch.setattr(modeling, "load_policy", spy)

    def changed(self) -> dict[str, bool]:
        after = dict(self.model.named_parameters())
        # Compare raw bytes: packed 4-bit weights live in float containers where some bit patterns are NaN.
        return {n: _bytes(before) != _bytes(after[n].detach()) for n, before in self.before.items()}


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit"])
def test_lora_and_qlora_train_adapter_only(make_recipe, tmp_path, monkeypatch, quantization):
    recipe = load_recipe(make_recipe({"model": {"quantization": quantization}, "lora": {"r": 8, "alpha": 16}}))
    spy = ModelSpy(monkeypatch)
    entry = runner.run_stage(recipe, "sft", tmp_path / "run")
    assert entry["status"] == "done"
    assert entry["outputs"]["model"]["kind"] == "adapter"
    assert entry["outputs"]["model"]["base"] == "builtin:tiny-llama"
    assert entry["metrics"]["eval_loss"] < entry["metrics"]["eval_loss_before"]
    changed = spy.changed()
    lora = {n: c for n, c in changed.items() if "lora_" in n}
    base = {n: c for n, c in changed.items() if "lora_" not in n}
    assert lora and all(lora.values()), [n for n, c in lora.items() if not c]
    assert base and not any(base.values()), [n for n, c in base.items() if c]
    lora_size = sum(p.numel() for n, p in spy.model.named_parameters() if "lora_" in n)
    assert entry["metrics"]["trainable_parameters"] == lora_size  # nothing but the adapter trains
    if quantization == "4bit":
        import bitsandbytes as bnb

        layers = [m for m in spy.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        # really 4-bit: two weights per byte
        assert layers and all(_nbytes(m.weight) * 2 == m.in_features * m.out_features for m in layers)
    # The saved adapter reloads on its base and reproduces the trained model's outputs.
    ref = modeling.ModelRef.from_dict(entry["outputs"]["model"])
    reloaded = modeling.load_policy(recipe.model, recipe.lora, init=ref, trainable=False)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    spy.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, spy.model(input_ids=ids).logits, atol=1e-4)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_only_response_tokens_carry_loss(make_recipe, tmp_path):
    from pipeline.stages import sft

    recipe = load_recipe(make_recipe())
    ctx = runner.make_context(recipe, "sft", tmp_path / "run")
    ctx.is_main = False  # build only; write nothing
    trainer, _ = sft.build_trainer(ctx)
    batch = next(iter(trainer.get_train_dataloader()))
    tok = trainer.processing_class
    rows = [json.loads(line) for line in Path(recipe.stages["sft"].data.train.path).read_text().splitlines()]
    checked = 0
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        text = tok.decode(ids[mask.bool()])
        row = next(r for r in rows if text.startswith(_prompt(r)) and text.endswith(r["output"] + tok.eos_token))
        n_prompt = len(tok(_prompt(row), add_special_tokens=False)["input_ids"])
        n_real = int(mask.sum())
        assert (labels[:n_prompt] == -100).all(), "prompt tokens must not carry loss"
        assert torch.equal(labels[n_prompt:n_real], ids[n_prompt:n_real]), "every response token (and EOS) carries loss"
        assert labels[n_real - 1] == tok.eos_token_id
        assert (labels[n_real:] == -100).all(), "padding carries no loss"
        checked += 1
    assert checked == len(batch["input_ids"]) == 8


def _prompt(row):
    from pipeline.builtin.prompt_templates import alpaca_prompt

    return alpaca_prompt(row["instruction"], row.get("input", ""))


def test_4bit_lora_gradients_survive_an_eval_forward(tiny_model_dir):
    """Guards the CPU repack trap: after a no-grad eval forward, LoRA gradients must still flow."""
    from pipeline.config import LoraConfig, ModelConfig

    cfg = ModelConfig(quantization="4bit", dtype="float32")
    model = modeling.load_policy(cfg, LoraConfig(r=8, alpha=16, dropout=0.0))  # no dropout: comparable norms
    ids = torch.randint(10, 500, (2, 24))

    def lora_grad_norm() -> float:
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return sum(p.grad.norm().item() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None)

    before = lora_grad_norm()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = lora_grad_norm()
    assert before > 0
    assert after == pytest.approx(before, rel=1e-4)


def test_wandb_offline_logs_training_loss_and_never_the_key(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "sekrit-key-0123456789abcdef0123456789abcdef01234567")
    recipe = make_recipe(
        {"tracking": {"report_to": ["wandb"], "wandb": {"project": "pipeline-tests", "mode": "offline"}}}
    )
    run_dir = tmp_path / "run"
    out = run_cli("run", str(recipe), "--stages", "sft", "--output-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    tracker = manifest(run_dir)["stages"]["sft"]["tracker"]["wandb"]
    assert tracker["mode"] == "offline" and tracker["sync"].startswith("wandb sync ")
    files = list(Path(tracker["dir"]).glob("run-*.wandb"))
    assert files, f"no .wandb file in {tracker['dir']}"
    losses = _logged(files[0], "train/loss")
    assert len(losses) >= 3 and all(v > 0 for v in losses)
    assert "wandb sync" in out.stdout
    for path in run_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert b"sekrit-key" not in path.read_bytes(), f"API key leaked into {path}"


def _logged(wandb_file: Path, key: str) -> list[float]:
    """Values of ``key`` in the history records of a .wandb file (a LevelDB-style record log)."""
    from wandb.proto import wandb_internal_pb2

    data = wandb_file.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    block, header = 32768, 7
    pos, chunks, values = 7, b"", []
    while pos + header <= len(data):
        if block - pos % block < header:  # block trailer padding
            pos += block - pos % block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        payload = data[pos + header : pos + header + length]
        pos += header + length
        if kind == 0:
            continue
        chunks = payload if kind in (1, 2) else chunks + payload
        if kind not in (1, 4):  # FIRST / MIDDLE: wait for the rest
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunks)
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                name = item.key or "/".join(item.nested_key)
                if name == key:
                    values.append(float(json.loads(item.value_json)))
    return values


@pytest.mark.skipif(not (SHARED_DATA / "alpaca_seed_tasks.json").is_file(), reason="../shared/data not present")
def test_real_alpaca_seed_tasks_train_through_a_recipe(make_recipe, tmp_path):
    recipe = make_recipe(
        {
            "stages": {
                "sft": {
                    "data": {
                        "train": {"path": str(SHARED_DATA / "alpaca_seed_tasks.json"), "limit": None},
                        "eval": None,
                        "eval_fraction": 0.1,
                        "max_length": 256,
                        "overlength": "truncate",
                    }
                }
            }
        }
    )
    run_dir = tmp_path / "run"
    out = run_cli("run", str(recipe), "--stages", "sft", "--output-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    entry = manifest(run_dir)["stages"]["sft"]
    summary = json.loads((run_dir / "sft" / "data_summary.json").read_text())
    # every row read and length-checked, then a held-out fraction of those kept
    assert summary["train"]["rows"] == 175
    assert summary["train_rows"] + summary["eval"]["rows"] == summary["train"]["kept"] and summary["eval"]["rows"] > 0
    assert summary["train"]["truncated"] > 0  # real outputs are long: the policy is exercised and counted
    assert entry["metrics"]["eval_loss"] < entry["metrics"]["eval_loss_before"]


def test_chat_template_sft_on_messages_data(make_recipe, tmp_path):
    rows = [
        json.loads(line)
        for line in (Path(__file__).parent.parent / "data/tiny/sft_train.jsonl").read_text().splitlines()[:96]
    ]
    messages = tmp_path / "chat.jsonl"
    messages.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "Answer briefly."},
                        {"role": "user", "content": f"{r['instruction']} {r['input']}".strip()},
                        {"role": "assistant", "content": r["output"]},
                    ]
                }
            )
            + "\n"
            for r in rows
        )
    )
    recipe = load_recipe(
        make_recipe(
            {
                "stages": {
                    "sft": {
                        "data": {
                            "train": {"path": str(messages)},
                            "eval": None,
                            "eval_fraction": 0.25,
                            "template": "chat",
                        }
                    }
                }
            }
        )
    )
    ctx = runner.make_context(recipe, "sft", tmp_path / "run")
    ctx.is_main = False
    from pipeline.stages import sft

    trainer, summary = sft.build_trainer(ctx)
    assert summary["format"] == "messages" and summary["train"]["kept"] == 96  # then 24 held out
    assert summary["train_rows"] == 72 and summary["eval"]["kept"] == 24
    batch = next(iter(trainer.get_train_dataloader()))
    tok = trainer.processing_class
    replies = {r["output"] for r in rows}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        learned = tok.decode(ids[labels != -100])
        # Only the assistant's reply (and the end-of-turn token) carry loss, never the system or user turn.
        assert learned.replace("<|eos|>", "").strip() in replies, learned
        assert "<|user|>" not in learned and "<|system|>" not in learned and "Answer briefly" not in learned
        assert learned.endswith("<|eos|>") or learned.endswith("<|eos|>\n")
    entry = runner.run_stage(recipe, "sft", tmp_path / "run2")
    assert entry["status"] == "done" and entry["metrics"]["eval_loss"] < entry["metrics"]["eval_loss_before"]


def test_bad_data_fails_before_training_with_a_clear_message(make_recipe, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "Add.", "output": ""}) + "\n")
    recipe = make_recipe({"stages": {"sft": {"data": {"train": {"path": str(bad)}}}}})
    run_dir = tmp_path / "run"
    out = run_cli("run", str(recipe), "--stages", "sft", "--output-dir", str(run_dir))
    assert out.returncode == 2
    assert "bad.jsonl row 1 (line 1): 'output' is empty" in out.stderr
    assert "Traceback" not in out.stderr
    # refused by run's checks before the stage starts: nothing recorded, nothing trained
    assert not (run_dir / "manifest.json").exists() and not (run_dir / "sft" / "model").exists()


def test_resume_at_the_final_checkpoint_loads_it_instead_of_training_past_max_steps(make_recipe, tmp_path):
    import shutil

    recipe = load_recipe(make_recipe())
    run_dir = tmp_path / "run"
    first = runner.run_stage(recipe, "sft", run_dir)
    shutil.rmtree(run_dir / "sft" / "model")  # as if killed after the last checkpoint, before 'done'
    again = runner.run_stage(recipe, "sft", run_dir)
    assert again["metrics"]["resumed_from"] == "checkpoint-12"
    assert again["metrics"]["steps"] == first["metrics"]["steps"] == 12
    assert again["metrics"]["eval_loss"] == pytest.approx(first["metrics"]["eval_loss"], rel=1e-6)  # the same weights
