"""One stage's plan: its Setup (from the kind's memory hook), the model's shape, and the terms at its peak."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pipeline.config import Recipe
from pipeline.plan.launch import Distribution, read_launch
from pipeline.plan.memory import Setup, generation_plan, stage_setup, training_plan
from pipeline.plan.shapes import CAUSAL_LM, REWARD_HEAD, ModelShape, model_shape
from pipeline.plan.units import GIB, count


@dataclass
class StagePlan:
    name: str
    kind: str
    summary: str  # one line: model, method, batch, launch
    terms: dict[str, int]  # held at the peak; they add up to peak_bytes
    other_terms: dict[str, int]  # held at another time of the step (not at the peak)
    phase: str
    gpu_memory: int | None = None
    notes: list[str] = field(default_factory=list)
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # why there is no estimate (then no terms and no verdict)

    @classmethod
    def without_estimate(cls, name: str, kind: str, error: str, gpu_memory: int | None = None) -> StagePlan:
        return cls(name, kind, "no estimate", {}, {}, "", gpu_memory, error=error)

    @property
    def peak_bytes(self) -> int:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None or self.error else self.peak_bytes <= self.gpu_memory

    def as_dict(self) -> dict[str, Any]:
        extra = {"error": self.error} if self.error else {}
        return {
            "kind": self.kind,
            "summary": self.summary,
            "peak_bytes": self.peak_bytes,
            "peak_gib": round(self.peak_bytes / GIB, 3),
            "phase": self.phase,
            "terms": dict(largest_first(self.terms)),
            "other_terms": dict(largest_first(self.other_terms)),
            "fits": self.fits,
            "gpu_memory_bytes": self.gpu_memory,
            "notes": self.notes,
            "suggestions": self.suggestions,
            **extra,
        }


def largest_first(terms: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(((k, int(v)) for k, v in terms.items() if v), key=lambda kv: -kv[1])


def plan_stage(
    recipe: Recipe,
    name: str,
    gpu_memory: int | None = None,
    dist: Distribution | None = None,
    prompt_tokens: int | None = None,
) -> StagePlan:
    dist = dist or read_launch(recipe.launch)
    s = stage_setup(recipe, name, prompt_tokens)
    m = recipe.model
    shape_of = partial(model_shape, m.name_or_path, m.revision, m.trust_remote_code)
    if s.training:
        shape = shape_of(s.head)
        terms, other, phase, notes = training_plan(shape, s, dist)
        if s.quantization == "4bit" and dist.strategy == "zero3":
            notes.append("4-bit QLoRA under ZeRO-3 is not supported by this pipeline (see README)")
        if s.optim.startswith("paged_"):
            notes.append(
                "paged optimizer states live in CUDA unified memory: counted here, not in torch.cuda.max_memory_allocated"
            )
    else:
        shape = shape_of(CAUSAL_LM)
        scorer = shape_of(REWARD_HEAD) if s.scorer else None
        terms, other, phase, notes = generation_plan(shape, s, scorer)
    summary = describe(shape, s, dist)
    return StagePlan(name, recipe.stage(name).kind, summary, terms, other, phase, gpu_memory, notes)


def describe(shape: ModelShape, s: Setup, dist: Distribution) -> str:
    """One line: model, method, batch, reference, launch."""
    quant = {"none": {4: "fp32", 2: "bf16"}[s.weight_bytes], "4bit": "4-bit NF4", "8bit": "8-bit"}[s.quantization]
    method = f"{quant} + LoRA r={s.lora.r}" if s.lora is not None else (f"{quant} full" if s.training else quant)
    parts = [f"{shape.arch} ({count(shape.total)} params)", method]
    if s.training:
        pair = " (chosen + rejected)" if s.pairs else ""
        parts += [
            f"{s.sequences} x {s.length} tokens{pair}",
            f"checkpointing {'on' if s.checkpointing else 'off'}",
            s.optim,
        ]
        if s.reference != "none":
            parts.append({"copy": "reference: full copy", "adapter": "reference: frozen adapter"}[s.reference])
        elif s.reference_label is not None:
            parts.append(s.reference_label)
    else:
        parts.append(f"{s.gen_batch} sequences x ({s.prompt_tokens} + {s.new_tokens}) tokens")
    parts.append(dist.describe())
    return ", ".join(parts)
