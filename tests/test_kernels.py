"""GPU speed switches (issue 22): ``model.kernels``, ``train.compile``, ``train.optim`` — checked at validate,
mapped onto TRL's configs by ``pipeline.train.args``, and a no-op on CPU unless asked for."""

from __future__ import annotations

from pathlib import Path

import pytest
from trl import DPOConfig, GRPOConfig, RewardConfig, SFTConfig

from pipeline import plan
from pipeline.config import load_recipe
from pipeline.plan import memory, report
from pipeline.run import runner
from pipeline.run.manifest import stage_hash
from pipeline.train import args as train_args
from pipeline.util.errors import RecipeError

REPO = Path(__file__).resolve().parent.parent
TRL_CONFIGS = [SFTConfig, DPOConfig, GRPOConfig, RewardConfig]


def _ctx(make_recipe, tmp_path, model=None, **train):
    recipe = load_recipe(make_recipe({"model": model or {}, "stages": {"sft": {"train": train}}}))
    ctx = runner.make_context(recipe, "sft", tmp_path / "run")
    ctx.config_hash = "test"
    return ctx


def _gpu_with_liger(monkeypatch, installed=True):
    monkeypatch.setattr(train_args.modeling, "has_cuda", lambda: True)
    monkeypatch.setattr(train_args, "liger_installed", lambda: installed)


def test_defaults_change_nothing_on_cpu(make_recipe, tmp_path):
    ctx = _ctx(make_recipe, tmp_path)
    assert ctx.recipe.model.kernels == "auto" and ctx.cfg.train.compile is False
    for cls in TRL_CONFIGS:
        cfg = train_args.trl_args(cls, ctx)
        assert cfg.use_liger_kernel is False and cfg.torch_compile is False and cfg.optim == "adamw_torch"


def test_liger_on_cpu_is_refused_at_run_time(make_recipe, tmp_path):
    ctx = _ctx(make_recipe, tmp_path, model={"kernels": "liger"})  # validates: the machine is known at run time
    with pytest.raises(RecipeError, match=r"model.kernels: liger needs a CUDA GPU and `pip install \.\[gpu\]`"):
        train_args.trl_args(SFTConfig, ctx)


def test_liger_without_the_package_is_refused(make_recipe, tmp_path, monkeypatch):
    ctx = _ctx(make_recipe, tmp_path, model={"kernels": "liger"})
    _gpu_with_liger(monkeypatch, installed=False)
    with pytest.raises(RecipeError, match="liger-kernel"):
        train_args.kernel_flags("liger", "sft")
    assert train_args.kernel_flags("auto", "sft") == {}  # auto: trains without it
    assert ctx.recipe.model.kernels == "liger"


@pytest.mark.parametrize("kernels", ["auto", "liger"])
def test_liger_on_a_gpu_reaches_every_trl_config(kernels, make_recipe, tmp_path, monkeypatch):
    ctx = _ctx(make_recipe, tmp_path, model={"kernels": kernels})
    _gpu_with_liger(monkeypatch)
    for cls in TRL_CONFIGS:
        cfg = train_args.trl_args(cls, ctx)
        assert cfg.use_liger_kernel is True
        # TRL 1.16 refuses Liger's fused linear cross-entropy in SFT/DPO/GRPO; a reward model has no LM head
        assert cfg.liger_kernel_config == {"fused_linear_cross_entropy": False}
    assert train_args.kernel_flags("none", "sft") == {}


def test_compile_and_fused_optimizer_reach_the_trl_config(make_recipe, tmp_path):
    ctx = _ctx(make_recipe, tmp_path, compile=True, optim="adamw_torch_fused")
    for cls in TRL_CONFIGS:
        cfg = train_args.trl_args(cls, ctx)
        assert cfg.torch_compile is True and cfg.optim == "adamw_torch_fused"


def test_kernels_value_is_checked(make_recipe):
    with pytest.raises(RecipeError, match=r"model\.kernels: Input should be 'auto', 'none' or 'liger'"):
        load_recipe(make_recipe({"model": {"kernels": "triton"}}))


@pytest.mark.parametrize(
    ("key", "switch"),
    [
        ("use_liger_kernel", "model.kernels"),
        ("liger_kernel_config", "model.kernels"),
        ("torch_compile", "train.compile"),
    ],
)
def test_trainer_extra_cannot_bypass_the_switches(key, switch, make_recipe):
    with pytest.raises(RecipeError, match=rf"stages\.sft\.train\.trainer_extra.*{key} is set by {switch}"):
        load_recipe(make_recipe({"stages": {"sft": {"train": {"trainer_extra": {key: True}}}}}))


# ------------------------------------------------------------------------------------------------
# plan
# ------------------------------------------------------------------------------------------------

QWEN_FULL = REPO / "recipes" / "gpu" / "qwen2.5-0.5b-full.yaml"
QWEN05B = REPO / "bench" / "configs" / "Qwen2.5-0.5B"


def _plan(*overrides, stage="sft"):
    recipe = load_recipe(QWEN_FULL, [f"model.name_or_path={QWEN05B}", *overrides])
    return plan.plan_recipe(recipe, [stage], None)[stage]


def _logits_terms(p):
    return {k: v for k, v in p.terms.items() if k.startswith(("logits", "LM head"))}


def test_plan_with_trls_chunked_head_liger_saves_no_logits_and_says_so(monkeypatch):
    monkeypatch.setattr(memory, "liger_installed", lambda: False)
    none, liger, auto = _plan("model.kernels=none"), _plan("model.kernels=liger"), _plan("model.kernels=auto")
    assert liger.peak_bytes == none.peak_bytes == auto.peak_bytes
    assert not none.notes and not auto.notes  # auto on the installed TRL: nothing to say
    assert any("fused linear cross-entropy off" in n for n in liger.notes)
    assert "note: model.kernels: liger: no logits saving planned" in report.format_plan(liger)  # what plan prints


def test_plan_without_trls_chunked_head_liger_drops_the_full_logits(monkeypatch):
    monkeypatch.setattr(memory, "trl_fuses_lm_head", lambda: True)
    chunked = _logits_terms(_plan("model.kernels=none"))
    monkeypatch.setattr(memory, "trl_fuses_lm_head", lambda: False)
    monkeypatch.setattr(memory, "liger_installed", lambda: False)
    none, liger, auto = _plan("model.kernels=none"), _plan("model.kernels=liger"), _plan("model.kernels=auto")
    (full_label, full), (liger_label, fused) = *_logits_terms(none).items(), *_logits_terms(liger).items()
    assert full_label.startswith("logits: 16384 tokens x 151936 vocab") and "Liger fused linear" in liger_label
    assert fused == next(iter(chunked.values())) and fused < full
    assert none.peak_bytes - liger.peak_bytes == full - fused  # the forward/backward is the peak in both
    assert any("liger-kernel is not installed" in n for n in auto.notes) and auto.peak_bytes == none.peak_bytes


def test_fused_adamw_is_planned_like_adamw():
    torch_, fused = _plan("stages.sft.train.optim=adamw_torch"), _plan("stages.sft.train.optim=adamw_torch_fused")
    states = [v for p in (torch_, fused) for k, v in p.terms.items() if k.startswith("optimizer states")]
    assert states[0] == states[1]
    # fused AdamW steps in one kernel: no foreach temporary
    assert fused.peak_bytes <= torch_.peak_bytes


def test_defaults_stay_out_of_dumps_so_finished_stages_stay_cached(make_recipe):
    recipe = load_recipe(make_recipe())
    assert "kernels" not in recipe.model.model_dump(mode="json")
    assert "compile" not in recipe.stages["sft"].model_dump(mode="json")["train"]
    changed = load_recipe(make_recipe(), ["model.kernels=liger", "stages.sft.train.compile=true"])
    assert changed.model.model_dump(mode="json")["kernels"] == "liger"
    assert changed.stages["sft"].model_dump(mode="json")["train"]["compile"] is True
    assert stage_hash(changed, "sft", {}) != stage_hash(recipe, "sft", {})
