"""pipeline plan: exact parameter counts, first-principles peaks, verdicts, suggestions, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import yaml

from pipeline import builtin, cli, plan
from pipeline.config import StageConfig, load_recipe, registry
from pipeline.plan import launch, memory, report, shapes, units

REPO = Path(__file__).resolve().parent.parent
LLAMA8B = REPO / "bench" / "configs" / "Llama-3.1-8B"
QWEN05B = REPO / "bench" / "configs" / "Qwen2.5-0.5B"
QLORA = REPO / "recipes" / "gpu" / "llama3.1-8b-qlora.yaml"
GIB = units.GIB


def small_configs():
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Olmo2Config,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        SmolLM3Config,
    )

    common = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
    )
    return {
        "llama": LlamaConfig(**common, tie_word_embeddings=False),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=True),
        "mistral": MistralConfig(**common),
        "gemma2": Gemma2Config(**common, head_dim=16),
        "phi3": Phi3Config(**common, pad_token_id=0),
        # the replicas' newer families: q/k norms, heads*head_dim != hidden, NoPE layers, partial rotary + tied
        "qwen3": Qwen3Config(**common, head_dim=32, tie_word_embeddings=True),
        "gemma3": Gemma3TextConfig(**common, head_dim=32, layer_types=["sliding_attention", "full_attention"]),
        "smollm3": SmolLM3Config(**common, pad_token_id=0, no_rope_layers=[1, 0]),
        "olmo2": Olmo2Config(**common),
        "phi4": Phi3Config(
            **common, pad_token_id=0, tie_word_embeddings=True, rope_parameters={"partial_rotary_factor": 0.75}
        ),
    }


@pytest.mark.parametrize(
    "arch", ["llama", "qwen2", "mistral", "gemma2", "phi3", "qwen3", "gemma3", "smollm3", "olmo2", "phi4"]
)
def test_counts_equal_the_instantiated_model(arch):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    cfg = small_configs()[arch]
    shape = shapes.shape_of_config(cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    params = list(model.parameters())
    assert shape.total == sum(p.numel() for p in params)
    assert shape.embedding + shape.head + shape.norms + shape.other + shape.linear_weights == shape.total
    setup = memory.Setup(
        kind="sft",
        head="causal_lm",
        weight_bytes=2,
        act_bytes=2,
        quantization="none",
        quant_double=True,
        lora=None,
        checkpointing=False,
    )
    assert sum(memory.weight_terms(shape, setup, training=True).values()) == sum(
        p.numel() * p.element_size() for p in params
    )
    # LoRA on all-linear: what peft actually creates
    lora = load_recipe(REPO / "recipes" / "demo.yaml", ["lora.r=4"]).lora
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    created = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert sum(t.numel for t in memory.lora_tensors(shape, lora)) == created
    assert all(
        p.dtype == torch.float32 for n, p in peft_model.named_parameters() if "lora_" in n
    )  # 4 bytes each, as planned


def test_reward_shape_has_a_one_output_head_and_no_vocab_term():
    shape = shapes.shape_of_config(small_configs()["llama"], head="reward")
    assert shape.head == shape.hidden  # score: hidden -> 1
    setup = memory.Setup(
        kind="reward",
        head="reward",
        weight_bytes=2,
        act_bytes=2,
        quantization="none",
        quant_double=True,
        lora=None,
        checkpointing=True,
        sequences=4,
        length=128,
    )
    head = sum(memory.head_terms(shape, setup, head_trainable=True, fused=False).values())
    assert head < 4 * 128 * shape.vocab  # nothing sized by the vocabulary


def test_nf4_bytes_first_principles():
    n = 4096 * 14336
    blocks = n // 64
    assert memory.nf4_bytes(n, double_quant=False) == n // 2 + 4 * blocks
    assert memory.nf4_bytes(n, double_quant=True) == n // 2 + blocks + 4 * (blocks // 256)


def test_llama8b_published_parameter_count():
    shape = shapes.model_shape(str(LLAMA8B))
    assert shape.total == 8_030_261_248
    assert not shape.tied and shape.head == 128256 * 4096


def _plan(recipe_path, overrides, stage="sft", gpu="24GiB"):
    recipe = load_recipe(recipe_path, overrides)
    return plan.plan_recipe(recipe, [stage], units.parse_gpu_memory(gpu))[stage]


def test_llama8b_full_finetune_bf16_adamw_does_not_fit_24gib():
    p = _plan(
        QLORA,
        [
            f"model.name_or_path={LLAMA8B}",
            "model.quantization=none",
            "lora=null",
            "stages.sft.train.optim=adamw_torch",
            "stages.sft.train.batch_size=1",
            "stages.sft.data.max_length=2048",
        ],
    )
    assert p.peak_bytes >= 60 * GIB  # 2 (weights) + 2 (grads) + 4 (bf16 AdamW) bytes x 8.03B alone is 59.8 GiB
    assert p.fits is False
    assert p.suggestions and all(s["peak_bytes"] < p.peak_bytes for s in p.suggestions)


def test_llama8b_qlora_r16_checkpointing_fits_24gib():
    p = _plan(
        QLORA, [f"model.name_or_path={LLAMA8B}", "stages.sft.train.batch_size=1", "stages.sft.data.max_length=2048"]
    )
    assert 6 * GIB <= p.peak_bytes <= 14 * GIB
    assert p.fits is True and not p.suggestions


def test_suggestions_are_replans_with_the_change_applied():
    overrides = [f"model.name_or_path={QWEN05B}", "model.gradient_checkpointing=false"]
    p = _plan(REPO / "recipes" / "gpu" / "qwen2.5-0.5b-full.yaml", overrides, gpu="8GiB")
    assert p.fits is False
    for sug in p.suggestions:
        if sug["set"]:
            again = _plan(REPO / "recipes" / "gpu" / "qwen2.5-0.5b-full.yaml", overrides + sug["set"], gpu="8GiB")
            assert again.peak_bytes == sug["peak_bytes"] and again.fits == sug["fits"]
    checkpointing = next(s for s in p.suggestions if s["change"] == "activation checkpointing")
    assert checkpointing["peak_bytes"] < p.peak_bytes


def test_more_tokens_more_activations_and_checkpointing_saves():
    base = [f"model.name_or_path={QWEN05B}", "model.gradient_checkpointing=false"]
    qwen = REPO / "recipes" / "gpu" / "qwen2.5-0.5b-full.yaml"
    short = _plan(qwen, base + ["stages.sft.data.max_length=512"]).peak_bytes
    long = _plan(qwen, base + ["stages.sft.data.max_length=2048"]).peak_bytes
    ckpt = _plan(qwen, base + ["stages.sft.data.max_length=2048", "model.gradient_checkpointing=true"]).peak_bytes
    assert short < long and ckpt < long


def test_sharding_divides_what_zero3_shards():
    recipe = load_recipe(
        QLORA,
        [f"model.name_or_path={LLAMA8B}", "model.quantization=none", "lora=null", "stages.sft.train.optim=adamw_torch"],
    )
    one = plan.plan_stage(recipe, "sft", dist=launch.Distribution())
    zero3 = plan.plan_stage(recipe, "sft", dist=launch.read_launch(str(REPO / "launch" / "zero3.yaml"), 8))
    zero2 = plan.plan_stage(recipe, "sft", dist=launch.read_launch(str(REPO / "launch" / "zero2.yaml"), 8))
    assert zero3.peak_bytes < zero2.peak_bytes < one.peak_bytes
    weights = lambda p: sum(v for k, v in p.terms.items() if k.startswith("weights"))  # noqa: E731
    assert weights(zero3) == weights(one) // 8 and weights(zero2) == weights(one)


def test_dpo_reference_copy_adapter_or_precomputed():
    recipe = REPO / "recipes" / "demo.yaml"
    copy = _plan(recipe, [], "dpo")
    pre = _plan(recipe, ["stages.dpo.precompute_ref_log_probs=true"], "dpo")
    lora = _plan(recipe, ["lora.r=8"], "dpo")
    shape = shapes.model_shape(builtin.TINY_MODEL)
    assert copy.terms["reference model (frozen full copy)"] == shape.total * 4
    assert not any(k.startswith("reference") for k in pre.terms)
    assert any(k.startswith("reference adapter") for k in lora.terms)


def test_generation_kv_cache_scales_with_n_and_length():
    recipe = REPO / "recipes" / "demo.yaml"
    a = _plan(recipe, [], "bon")
    b = _plan(recipe, ["stages.bon.n=16"], "bon")
    kv = lambda p: next(v for k, v in {**p.terms, **p.other_terms}.items() if k.startswith("KV cache"))  # noqa: E731
    assert kv(b) == pytest.approx(2 * kv(a), rel=0.01)


@pytest.mark.parametrize(
    "text,gib", [("24GiB", 24), ("24GB", 24), ("80G", 80), ("24", 24), ("16384MiB", 16), ("0.5 TB", 512)]
)
def test_gpu_memory_parsing(text, gib):
    assert units.parse_gpu_memory(text) == gib * GIB


def test_every_recipe_plans_with_a_verdict(capsys):
    # no Hub here: each real recipe plans with its architecture's config.json (Instruct has the base's shape)
    local = {
        "llama3.1-8b-qlora.yaml": LLAMA8B,
        "qwen2.5-0.5b-full.yaml": QWEN05B,
        "qwen2.5-0.5b-instruct-chat.yaml": QWEN05B,
    }
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        args = ["plan", str(path), "--gpu-memory", "24GiB"]
        if path.name in local:
            args += ["--set", f"model.name_or_path={local[path.name]}"]
        assert cli.main(args) == 0, path
        text = capsys.readouterr().out
        recipe = load_recipe(path)
        for name in recipe.stages:
            assert f"[{name}]" in text
        assert text.count("verdict: ") == len(recipe.stages)
        assert cli.main(args + ["--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert set(data["stages"]) == set(recipe.stages)
        for stage in data["stages"].values():
            assert stage["peak_bytes"] == sum(stage["terms"].values()) and isinstance(stage["fits"], bool)


def test_headline_is_one_line_with_a_verdict():
    recipe = load_recipe(REPO / "recipes" / "demo.yaml")
    line = report.headline(recipe, "sft", "24GiB")
    assert "\n" not in line and line.startswith("[sft]") and "fits 24.00 GiB" in line


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "plan", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_bad_inputs_exit_2_with_a_message_naming_the_thing(tmp_path):
    demo = str(REPO / "recipes" / "demo.yaml")
    out = _cli(demo, "--set", "model.name_or_path=nobody/no-such-model-xyz")
    assert out.returncode == 2 and "nobody/no-such-model-xyz" in out.stderr and "config.json" in out.stderr
    assert "Traceback" not in out.stderr
    out = _cli(demo, "--set", "stages.sft.train.optim=adamw_tourch", "--stages", "sft")
    assert out.returncode == 2 and "adamw_tourch" in out.stderr and "adamw_torch" in out.stderr
    out = _cli(demo, "--gpu-memory", "lots")
    assert out.returncode == 2 and "--gpu-memory" in out.stderr and "lots" in out.stderr


@pytest.mark.parametrize("name", builtin.names())
def test_every_builtin_model_plans_through_the_cli(name, capsys):
    # plan, validate and run resolve built-in names through pipeline.builtin alone: each one plans
    architecture = json.loads((builtin.resolve(name) / "config.json").read_text())["architectures"][0]
    args = ["plan", str(REPO / "recipes" / "demo.yaml"), "--set", f"model.name_or_path={name}", "--gpu-memory", "24GiB"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert f"[sft] sft: {architecture} (" in text
    assert text.count("verdict: fits") == len(load_recipe(REPO / "recipes" / "demo.yaml").stages)


class NoPlanStage(StageConfig):
    kind: Literal["noplan"] = "noplan"


def test_a_kind_without_a_memory_model_is_named_and_the_other_stages_still_plan(tmp_path, capsys):
    kind = registry.StageKind(name="noplan", config=NoPlanStage, run=lambda ctx: {})
    registry.register(kind)
    try:
        raw = load_recipe(REPO / "recipes" / "demo.yaml").resolved_dict()
        raw["stages"] = {"sft": raw["stages"]["sft"], "extra": {"kind": "noplan"}}
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        assert cli.main(["plan", str(path), "--gpu-memory", "24GiB"]) == 0
        text = capsys.readouterr().out
        assert "verdict: fits" in text.split("[extra]")[0]
        assert "[extra] noplan: no estimate: stage 'extra': kind 'noplan' has no memory model for plan" in text
        assert cli.main(["plan", str(path), "--json"]) == 0
        stages = json.loads(capsys.readouterr().out)["stages"]
        assert stages["sft"]["peak_bytes"] > 0 and "error" not in stages["sft"]
        assert "has no memory model" in stages["extra"]["error"] and stages["extra"]["fits"] is None
    finally:
        registry.unregister("noplan")
