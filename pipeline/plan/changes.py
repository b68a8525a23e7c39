"""Suggestions for a stage that does not fit: each candidate change re-planned with the change applied."""

from __future__ import annotations

from typing import Any

from pipeline.config import Recipe, apply_override, recipe_from_dict
from pipeline.plan.launch import Distribution
from pipeline.plan.memory import Setup, stage_setup
from pipeline.plan.optimizers import optim_spec
from pipeline.plan.stage_plan import StagePlan, plan_stage
from pipeline.util.errors import PipelineError

Change = tuple[str, list[str], Distribution]  # (description, --set overrides, launch)


def _changed(recipe: Recipe, overrides: list[str]) -> Recipe:
    raw = recipe.resolved_dict()
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw)


def candidate_changes(recipe: Recipe, name: str, s: Setup, dist: Distribution) -> list[Change]:
    """Changes that lower a stage's peak, as (description, --set overrides, launch)."""
    if s.training:
        return _training_changes(recipe, name, s, dist)
    b, key = recipe.stage(name).batch_size, f"stages.{name}"
    return [
        (f"batch_size {b} -> {smaller} prompts per generation batch", [f"{key}.batch_size={smaller}"], dist)
        for smaller in sorted({max(1, b // 2), max(1, b // 4), max(1, b // 8)}, reverse=True)
        if smaller < b
    ]


def _training_changes(recipe: Recipe, name: str, s: Setup, dist: Distribution) -> list[Change]:
    train, model, key, out = recipe.stage(name).train, recipe.model, f"stages.{name}", []
    b, ga = train.batch_size, train.gradient_accumulation_steps
    for smaller in sorted({max(1, b // 2), max(1, b // 4), 1}, reverse=True):
        if smaller < b:
            out.append(
                (
                    f"batch_size {b} -> {smaller}, gradient_accumulation_steps {ga} -> {ga * b // smaller} (same effective batch)",
                    [
                        f"{key}.train.batch_size={smaller}",
                        f"{key}.train.gradient_accumulation_steps={ga * b // smaller}",
                    ],
                    dist,
                )
            )
    if not model.gradient_checkpointing:
        out.append(("activation checkpointing", ["model.gradient_checkpointing=true"], dist))
    if model.quantization != "4bit":
        lora = [] if recipe.lora is not None else ["lora.r=16"]
        out.append(
            ("4-bit NF4 base + LoRA (QLoRA)" + (" r=16" if lora else ""), ["model.quantization=4bit", *lora], dist)
        )
    spec = optim_spec(s.optim)
    if spec.bits is None and spec.states >= 2 and recipe.lora is None:
        out.append(("8-bit optimizer states (paged_adamw_8bit)", [f"{key}.train.optim=paged_adamw_8bit"], dist))
    if s.precompute_change and s.reference == "copy":
        setting = s.precompute_change
        out.append((f"{setting} (no reference model during training)", [f"{key}.{setting}=true"], dist))
    if dist.strategy != "zero3" and model.quantization == "none":
        n = dist.processes if dist.processes > 1 else 8
        out.append(
            (
                f"DeepSpeed ZeRO-3 over {n} GPUs (launch/zero3.yaml, --num-processes {n})",
                [],
                Distribution("zero3", n, distributed_type="DEEPSPEED"),
            )
        )
    return out


def suggest_changes(
    recipe: Recipe, name: str, plan: StagePlan, dist: Distribution, prompt_tokens: int | None
) -> list[dict[str, Any]]:
    """Each change re-planned; when none fits alone, all of them together."""
    found = []
    changes = candidate_changes(recipe, name, stage_setup(recipe, name, prompt_tokens), dist)
    for description, overrides, new_dist in changes:
        try:
            peak = plan_stage(_changed(recipe, overrides), name, plan.gpu_memory, new_dist, prompt_tokens).peak_bytes
        except PipelineError:
            continue
        found.append({"change": description, "set": overrides, "peak_bytes": peak, "fits": peak <= plan.gpu_memory})
    if found and not any(f["fits"] for f in found):
        # on the same GPUs: the smallest batch and every other recipe change at once
        same = [c for c in changes if c[2] is dist]
        keep = [c for c in same if not c[0].startswith("batch_size")] + [
            c for c in same if c[0].startswith("batch_size")
        ][-1:]
        overrides = [o for c in keep for o in c[1]]
        try:
            peak = plan_stage(_changed(recipe, overrides), name, plan.gpu_memory, dist, prompt_tokens).peak_bytes
            found.append(
                {
                    "change": "all recipe changes above together",
                    "set": overrides,
                    "peak_bytes": peak,
                    "fits": peak <= plan.gpu_memory,
                }
            )
        except PipelineError:
            pass
    return sorted(found, key=lambda f: (not f["fits"], f["peak_bytes"]))
