"""DPO against the frozen SFT policy (every SFT output shape), the precomputed-reference cache, export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import cli, modeling
from pipeline.builtin.prompt_templates import alpaca_prompt
from pipeline.config import load_recipe
from pipeline.run import runner
from pipeline.run.manifest import Manifest
from pipeline.stages import dpo
from pipeline.util.errors import PipelineError, RecipeError

from conftest import BASE_RECIPE, TINY, merge, run_cli

pytestmark = pytest.mark.slow

LORA = {"r": 8, "alpha": 16}
# SFT runs shared by the tests of this file: name -> recipe additions
SFT_KINDS = {
    "full": {},
    "lora": {"lora": LORA},
    "4bit": {"lora": LORA, "model": {"quantization": "4bit"}},
}
SFT_STAGE = {"data": {"train": {"limit": 96}, "eval": {"limit": 8}}, "train": {"max_steps": 16, "save_steps": 100}}


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def pair(row: dict) -> dict:
    """Chosen: the preferred style; rejected: the same answer with trailing chatter."""
    return {
        "prompt": alpaca_prompt(row["instruction"], row.get("input", "")),
        "chosen": f"The answer is {row['answer']}.",
        "rejected": f"The answer is {row['answer']}. Anyway, whatever.",
    }


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pairs")
    rows = read_jsonl(TINY / "prompts_bon.jsonl")
    files = {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    for name, chunk in (("train", rows[:48]), ("eval", rows[48:60])):
        files[name].write_text("".join(json.dumps(pair(r)) + "\n" for r in chunk))
    return files


def dpo_stage(pairs, **extra) -> dict:
    stage = {
        "kind": "dpo",
        "policy_from": "sft",
        "beta": 0.3,
        "data": {
            "train": {"path": str(pairs["train"]), "format": "explicit"},
            "eval": {"path": str(pairs["eval"]), "format": "explicit"},
            "max_length": 128,
        },
        "train": {
            "learning_rate": 5e-4,
            "max_steps": 8,
            "batch_size": 8,
            "logging_steps": 2,
            "save_steps": 100,
            "precision": "fp32",
        },
    }
    return merge(stage, extra)


class SFTRuns:
    """One short SFT per kind, trained on first use; tests get private copies of the run directory."""

    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def recipe_dict(self, kind: str) -> dict:
        return merge(BASE_RECIPE, {**SFT_KINDS[kind], "stages": {"sft": SFT_STAGE}})

    def copy(self, kind: str, dest: Path) -> Path:
        if kind not in self.done:
            path = self.root / f"{kind}.yaml"
            path.write_text(yaml.safe_dump(self.recipe_dict(kind), sort_keys=False))
            entry = runner.run_stage(load_recipe(path), "sft", self.root / kind)
            assert entry["status"] == "done"
            self.done[kind] = self.root / kind
        shutil.copytree(self.done[kind], dest)
        return dest


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    return SFTRuns(tmp_path_factory.mktemp("sft"))


def write_recipe(tmp_path: Path, raw: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------- log-probs


def completion_logps(model, tokenizer, records: list[dict]) -> torch.Tensor:
    """[n, 2]: sum of the log-probs of the chosen / rejected tokens (and EOS) after the prompt, one row at a time."""
    out = []
    model.eval()
    for rec in records:
        row = []
        for side in ("chosen", "rejected"):
            prompt = tokenizer(rec["prompt"])["input_ids"]
            full = tokenizer(rec["prompt"] + rec[side] + tokenizer.eos_token)["input_ids"]
            n = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), len(prompt))
            ids = torch.tensor([full])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].float()
            logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            row.append(logps[n - 1 :].sum().item())
        out.append(row)
    return torch.tensor(out)


def trl_reference_logps(trainer) -> torch.Tensor:
    """[n, 2]: the reference log-probs of the eval pairs exactly as DPOTrainer gets them."""
    if trainer.precompute_ref_logps:
        ds = trainer.eval_dataset
        return torch.tensor([ds["ref_chosen_logps"], ds["ref_rejected_logps"]]).T
    rows = []
    for batch in trainer.get_eval_dataloader():
        batch = trainer._prepare_inputs(batch)
        chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model or trainer.model, batch)
        rows.append(torch.stack([chosen, rejected], 1).cpu())
    return torch.cat(rows)


def margin(logps: torch.Tensor) -> float:
    return (logps[:, 0] - logps[:, 1]).mean().item()


# ---------------------------------------------------------------- the reference, in every combination

CASES = {
    # name: (SFT kind, DPO recipe additions, DPO stage additions, expected reference)
    "full sft -> frozen copy": ("full", {}, {}, "frozen copy"),
    "full sft, precomputed": ("full", {}, {"precompute_ref_log_probs": True}, "precomputed"),
    "lora sft -> frozen sft adapter": ("lora", {}, {}, "frozen sft adapter"),
    "4-bit lora sft -> frozen sft adapter": ("4bit", {}, {}, "frozen sft adapter"),
    # a fresh adapter (B = 0) moves slowly at first: a LoRA learning rate
    "full sft + new lora -> adapter disabled": (
        "full",
        {"lora": LORA},
        {"train": {"learning_rate": 3e-3}},
        "adapter disabled",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_is_the_frozen_sft_policy(case, sft_runs, pairs, tmp_path, monkeypatch):
    kind, recipe_extra, stage_extra, expected = CASES[case]
    run_dir = sft_runs.copy(kind, tmp_path / "run")
    raw = merge(sft_runs.recipe_dict(kind), recipe_extra)
    raw["stages"]["dpo"] = dpo_stage(pairs, **stage_extra)
    recipe = load_recipe(write_recipe(tmp_path, raw))
    records = read_jsonl(pairs["eval"])

    seen = {}
    build = dpo.build_trainer

    def spy(ctx):
        trainer, summary, setup = build(ctx)
        tok = trainer.processing_class
        seen.update(
            trainer=trainer,
            ref_before=trl_reference_logps(trainer),
            policy_before=completion_logps(trainer.model, tok, records),
        )
        return trainer, summary, setup

    monkeypatch.setattr(dpo, "build_trainer", spy)
    entry = runner.run_stage(recipe, "dpo", run_dir)
    trainer, metrics = seen["trainer"], entry["metrics"]
    tok = trainer.processing_class
    assert entry["status"] == "done" and metrics["reference"] == expected and metrics["steps"] == 8

    # The reference did not move during training...
    ref_after = trl_reference_logps(trainer)
    assert torch.allclose(seen["ref_before"], ref_after, atol=1e-5), (seen["ref_before"] - ref_after).abs().max()
    # ...and it is the SFT policy, loaded here independently from the SFT stage's output...
    sft_ref = modeling.ModelRef.from_dict(Manifest(run_dir).stage("sft")["outputs"]["model"])
    sft_cfg = load_recipe(write_recipe(tmp_path, sft_runs.recipe_dict(kind), "sft.yaml"))
    sft_model = modeling.load_policy(sft_cfg.model, sft_cfg.lora, init=sft_ref, trainable=False)
    sft_logps = completion_logps(sft_model, tok, records)
    assert torch.allclose(ref_after, sft_logps, atol=2e-3), (ref_after - sft_logps).abs().max()
    # The policy starts from the SFT policy too (TRL keeps QLoRA adapter weights in bf16: a little rounding).
    assert torch.allclose(seen["policy_before"], sft_logps, atol=0.05), (seen["policy_before"] - sft_logps).abs().max()
    # The reference is not the bare base model.
    base_logps = completion_logps(modeling.load_base(recipe.model), tok, records)
    assert (ref_after - base_logps).abs().mean() > 1.0

    # The policy learned the preference: its chosen-minus-rejected margin grew, on held-out pairs too.
    policy_after = completion_logps(trainer.model, tok, records)
    assert margin(policy_after) > margin(seen["policy_before"]) + 1.0
    assert metrics["heldout_reward_accuracy"] >= 0.75 and metrics["heldout_reward_margin"] > 0.2
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    for key in (
        "heldout_reward_chosen",
        "heldout_reward_rejected",
        "heldout_logps_chosen",
        "heldout_logps_rejected",
        "train_reward_accuracy",
        "train_reward_margin",
    ):
        assert isinstance(metrics[key], float), key

    # Margins per logging step (logging_steps=2 over 8 steps), and the held-out ones before/after.
    series = json.loads((run_dir / "dpo" / "margins.json").read_text())
    assert [p["step"] for p in series["train"]] == [2, 4, 6, 8]
    assert [p["step"] for p in series["heldout"]] == [0, 8] and series["heldout"][0]["margin"] == pytest.approx(
        0, abs=0.05
    )
    summary = json.loads((run_dir / "dpo" / "data_summary.json").read_text())
    assert summary["train"]["kept"] == metrics["train_pairs"] == 48 and summary["eval"]["kept"] == 12

    out = entry["outputs"]["model"]
    if expected in ("frozen sft adapter", "adapter disabled"):
        assert out["kind"] == "adapter"
        # the adapter belongs on the SFT policy's base: the SFT model itself for a new LoRA on a full SFT model
        assert out["base"] == (sft_ref.base if sft_ref.form == "adapter" else sft_ref.path)
        assert not (Path(out["path"]) / "ref").exists()  # TRL's frozen copy is not part of the output
        assert metrics["trainable_parameters"] < metrics["parameters"] / 2
    else:
        assert out["kind"] == "full"
    if expected == "frozen sft adapter":
        assert_reference_adapter_frozen_and_policy_trains(trainer)


def assert_reference_adapter_frozen_and_policy_trains(trainer):
    """TRL's 'ref' adapter copy never trains, and gradients still reach the policy adapter after the no-grad
    eval and reference forwards (the CPU 4-bit repack trap)."""
    model = trainer.model
    named = dict(model.named_parameters())
    ref = {n: p for n, p in named.items() if ".ref." in n}
    policy = {n: p for n, p in named.items() if ".default." in n}
    assert ref and policy and not any(p.requires_grad for p in ref.values())
    assert any(not torch.equal(policy[n.replace(".ref.", ".default.")].float(), p.float()) for n, p in ref.items())
    model.train()
    model.zero_grad()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.compute_loss(model, batch).backward()
    assert all(p.grad is None for p in ref.values())
    assert sum(p.grad.norm().item() for p in policy.values() if p.grad is not None) > 0


# ---------------------------------------------------------------- precomputed reference log-probs


def test_precomputed_reference_log_probs_are_cached_under_the_stage_dir(sft_runs, pairs, tmp_path, capsys):
    run_dir = sft_runs.copy("full", tmp_path / "run")
    raw = sft_runs.recipe_dict("full")
    raw["stages"]["dpo"] = dpo_stage(pairs, precompute_ref_log_probs=True)
    path = write_recipe(tmp_path, raw)

    def build(*overrides):
        recipe = load_recipe(path, list(overrides))
        ctx = runner.make_context(recipe, "dpo", run_dir)
        ctx.config_hash = "test"
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        trainer, _, _ = dpo.build_trainer(ctx)
        return trainer

    first = build()
    assert first.ref_logp_batches == 6 + 2  # 48 train and 12 eval pairs, batches of 8
    said = capsys.readouterr().out  # our progress line for the step, in place of TRL's tqdm bar
    assert "reference log-probs (train): 6/6 batches (100%)" in said and "(eval): 2/2 batches" in said
    cache = run_dir / "dpo" / "ref_cache"
    files = sorted(cache.rglob("cache-*.arrow"))
    assert files and all(f.is_relative_to(cache) for f in files)
    # Same pairs and reference, other DPO settings: nothing recomputed, the same log-probs.
    again = build("stages.dpo.beta=0.5", "stages.dpo.train.learning_rate=1e-5")
    assert again.ref_logp_batches == 0
    assert "reference log-probs (train): 0/6 batches (0%), 0s; reused from the cache" in capsys.readouterr().out
    assert sorted(cache.rglob("cache-*.arrow")) == files
    assert again.train_dataset["ref_chosen_logps"] == first.train_dataset["ref_chosen_logps"]
    # A setting that changes the reference log-probs (truncation) recomputes.
    assert build("stages.dpo.data.max_length=60").ref_logp_batches > 0

    # A rerun in a new process (the CLI) finds the cache too.
    out = run_cli("stage", "dpo", str(path), "--output-dir", str(run_dir), "--set", "stages.dpo.train.max_steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert Manifest(run_dir).stage("dpo")["metrics"]["ref_logp_batches_computed"] == 0


# ---------------------------------------------------------------- export


def generate(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    model.eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


def test_export_merges_a_lora_adapter_into_a_plain_model(sft_runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = sft_runs.copy("lora", tmp_path / "run")
    out_dir = tmp_path / "exported"
    result = run_cli("export", str(run_dir), "sft", str(out_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out_dir / "adapter_config.json").exists() and (out_dir / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    recipe = load_recipe(write_recipe(tmp_path, sft_runs.recipe_dict("lora")))
    ref = modeling.ModelRef.from_dict(Manifest(run_dir).stage("sft")["outputs"]["model"])
    adapter_model = modeling.load_policy(recipe.model, recipe.lora, init=ref, trainable=False)
    prompts = [pair(r)["prompt"] for r in read_jsonl(TINY / "prompts_eval.jsonl")[:6]]
    assert generate(merged, tok, prompts) == generate(adapter_model, tok, prompts)
    assert json.loads((out_dir / "export.json").read_text())["merged_adapter"] is True
    card = (out_dir / "README.md").read_text()  # the model card says an adapter was merged
    assert "- peft\n- lora\n" in card.split("\n---\n")[0] and "its LoRA adapter merged into the base" in card


def test_export_of_a_4bit_adapter_and_of_a_full_model(sft_runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.run.export import export

    run_dir = sft_runs.copy("4bit", tmp_path / "run4")
    export(run_dir, "sft", tmp_path / "q", say=lambda _: None)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain full-precision model
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    tok = AutoTokenizer.from_pretrained(tmp_path / "q")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tokens = generate(model, tok, [pair(read_jsonl(TINY / "prompts_eval.jsonl")[0])["prompt"]])[0]
    assert tokens and "answer" in tok.decode(tokens)  # the SFT learned the answer format; it survives the merge

    full_run = sft_runs.copy("full", tmp_path / "runf")
    export(full_run, "sft", tmp_path / "f", say=lambda _: None)
    source = Path(Manifest(full_run).stage("sft")["outputs"]["model"]["path"])
    assert (tmp_path / "f" / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    with pytest.raises(PipelineError, match="not an empty directory"):
        export(full_run, "sft", tmp_path / "f", say=lambda _: None)


def test_export_errors_are_clear(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(
        json.dumps(
            {
                "stages": {
                    "label": {"status": "done", "kind": "bon", "outputs": {"pairs": "x.jsonl", "best": "y.jsonl"}},
                    "sft": {"status": "failed", "kind": "sft", "outputs": {}},
                }
            }
        )
    )
    assert cli.main(["export", str(run_dir), "label", str(tmp_path / "out")]) == 2
    assert "stage 'label' (bon) has no model output (it wrote: pairs, best)" in capsys.readouterr().err
    assert cli.main(["export", str(run_dir), "sft", str(tmp_path / "out")]) == 2
    assert "stage 'sft' is failed, not done" in capsys.readouterr().err
    assert cli.main(["export", str(run_dir), "dpo", str(tmp_path / "out")]) == 2
    assert "has no stage 'dpo'; it has: label, sft" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path), "sft", str(tmp_path / "out")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad settings


def test_bad_dpo_settings_fail_before_training_and_name_the_setting(sft_runs, pairs, tmp_path):
    run_dir = sft_runs.copy("full", tmp_path / "run")
    raw = sft_runs.recipe_dict("full")
    raw["stages"]["dpo"] = dpo_stage(pairs, train={"trainer_extra": {"rpo_alpha": 0.5}})  # removed from TRL
    with pytest.raises(
        RecipeError, match=r"stages\.dpo\.train\.trainer_extra\.rpo_alpha: not a field of TRL's DPOConfig"
    ):
        runner.run_stage(load_recipe(write_recipe(tmp_path, raw)), "dpo", run_dir)
    assert Manifest(run_dir).stage("dpo")["status"] == "failed"

    raw["stages"]["dpo"] = dpo_stage(pairs, loss_type=["sigmoid", "sfft"], loss_weights=[1.0, 0.5])
    with pytest.raises(RecipeError, match=r"stages\.dpo\.loss_type: unknown DPO loss 'sfft' \(did you mean 'sft'\?\)"):
        runner.run_stage(load_recipe(write_recipe(tmp_path, raw)), "dpo", run_dir)

    raw["stages"]["dpo"] = dpo_stage(pairs, loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(RecipeError, match="loss_weights has 1 values for 2 loss type"):
        load_recipe(write_recipe(tmp_path, raw))
    assert not (run_dir / "dpo" / "model").exists()


def test_combined_losses_reach_trl(sft_runs, pairs, tmp_path):
    run_dir = sft_runs.copy("full", tmp_path / "run")
    raw = sft_runs.recipe_dict("full")
    raw["stages"]["dpo"] = dpo_stage(pairs, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.2)
    recipe = load_recipe(write_recipe(tmp_path, raw))
    ctx = runner.make_context(recipe, "dpo", run_dir)
    ctx.is_main = False  # build only; write nothing
    trainer, _, setup = dpo.build_trainer(ctx)
    assert trainer.args.loss_type == ["sigmoid", "sft"] and trainer.loss_weights == [1.0, 0.5]
    assert trainer.beta == 0.2 and trainer.args.max_length == 128 and setup.reference == "frozen copy"
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())


# ---------------------------------------------------------------- rounds: DPO from a DPO policy


@pytest.mark.parametrize("kind", ["full", "lora", "4bit"])
def test_round_two_continues_round_one_against_the_reference_from_policy(kind, sft_runs, pairs, tmp_path, monkeypatch):
    """dpo_r2 starts from dpo's model (its adapter continued for LoRA / 4-bit) while its reference is the SFT
    policy named by reference_from, loaded independently and frozen."""
    run_dir = sft_runs.copy(kind, tmp_path / "run")
    raw = sft_runs.recipe_dict(kind)
    raw["stages"]["dpo"] = dpo_stage(pairs)
    raw["stages"]["dpo_r2"] = dpo_stage(pairs, policy_from="dpo", reference_from="sft")
    recipe = load_recipe(write_recipe(tmp_path, raw))
    records = read_jsonl(pairs["eval"])
    runner.run_stage(recipe, "dpo", run_dir)

    seen = {}
    build = dpo.build_trainer

    def spy(ctx):
        trainer, summary, setup = build(ctx)
        seen.update(
            trainer=trainer,
            ref_before=trl_reference_logps(trainer),
            policy_before=completion_logps(trainer.model, trainer.processing_class, records),
        )
        return trainer, summary, setup

    monkeypatch.setattr(dpo, "build_trainer", spy)
    entry = runner.run_stage(recipe, "dpo_r2", run_dir)
    trainer, metrics = seen["trainer"], entry["metrics"]
    tok = trainer.processing_class
    assert entry["status"] == "done" and metrics["steps"] == 8
    assert metrics["reference"] == "frozen reference_from model" and metrics["reference_stage"] == "sft"

    def independent(stage):
        ref = modeling.ModelRef.from_dict(Manifest(run_dir).stage(stage)["outputs"]["model"])
        model = modeling.load_policy(recipe.model, recipe.lora, init=ref, trainable=False)
        return completion_logps(model, tok, records)

    sft_logps, round_one = independent("sft"), independent("dpo")
    ref_after = trl_reference_logps(trainer)
    assert torch.allclose(seen["ref_before"], ref_after, atol=1e-5)  # frozen
    assert torch.allclose(ref_after, sft_logps, atol=2e-3), (ref_after - sft_logps).abs().max()
    assert torch.allclose(seen["policy_before"], round_one, atol=0.05), (seen["policy_before"] - round_one).abs().max()
    assert margin(round_one) > margin(sft_logps) + 0.5  # round one moved: the two are different models
    out = entry["outputs"]["model"]
    assert out["kind"] == ("full" if kind == "full" else "adapter")
    if kind != "full":
        assert out["base"] == Manifest(run_dir).stage("sft")["outputs"]["model"]["base"]  # the chain's base
