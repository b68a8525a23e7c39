"""What ``pipeline plan`` prints: each stage's terms, peak and verdict as text or JSON, and the one-line
headline ``run`` prints before a stage."""

from __future__ import annotations

import json

from pipeline.config import Recipe, load_recipe
from pipeline.plan import plan_recipe
from pipeline.plan.memory import CUDA_CONTEXT_BYTES
from pipeline.plan.stage_plan import StagePlan, largest_first, plan_stage
from pipeline.plan.units import gib, parse_gpu_memory
from pipeline.util.errors import PipelineError


def format_plan(plan: StagePlan) -> str:
    if plan.error:
        return f"[{plan.name}] {plan.kind}: no estimate: {plan.error}"
    lines = [
        f"[{plan.name}] {plan.kind}: {plan.summary}",
        f"  peak {gib(plan.peak_bytes)} GiB, during the {plan.phase}:",
    ]
    lines += [f"  {gib(v):>8}  {k}" for k, v in largest_first(plan.terms)]
    lines.append(f"  {gib(plan.peak_bytes):>8}  total (GiB)")
    if plan.other_terms:
        lines.append(
            "  not held at the peak: " + "; ".join(f"{k} {gib(v)}" for k, v in largest_first(plan.other_terms))
        )
    lines += [f"  note: {n}" for n in plan.notes]
    if plan.gpu_memory is not None:
        spare = plan.gpu_memory - plan.peak_bytes
        if plan.fits:
            lines.append(f"  verdict: fits {gib(plan.gpu_memory)} GiB ({gib(spare)} GiB to spare)")
        else:
            lines.append(f"  verdict: does not fit {gib(plan.gpu_memory)} GiB (over by {gib(-spare)} GiB)")
            if plan.suggestions:
                lines.append("  to make it fit (each change re-planned):")
            for sug in plan.suggestions:
                sets = " ".join(f"--set {o}" for o in sug["set"])
                verdict = "fits" if sug["fits"] else "does not fit"
                lines.append(
                    f"    - {sug['change']}: {gib(sug['peak_bytes'])} GiB, {verdict}" + (f"   [{sets}]" if sets else "")
                )
    return "\n".join(lines)


def to_json(plans: dict[str, StagePlan], gpu_memory: int | None) -> str:
    return json.dumps(
        {
            "gpu_memory_bytes": gpu_memory,
            "cuda_context_bytes": CUDA_CONTEXT_BYTES,
            "stages": {name: plan.as_dict() for name, plan in plans.items()},
        },
        indent=1,
    )


def detected_gpu_memory() -> int | None:
    """Total memory of the current CUDA device, or None without CUDA (torch already imported by run)."""
    try:
        import torch

        return (
            int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
            if torch.cuda.is_available()
            else None
        )
    except Exception:  # noqa: BLE001 -- a headline never needs this badly enough to fail
        return None


def headline(recipe: Recipe, stage_name: str, gpu_memory: int | str | None = None) -> str:
    """One line for ``run`` to print before a stage: the estimated peak, its largest terms and, with a GPU
    size (given, or the current CUDA device's), the verdict."""
    memory = parse_gpu_memory(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    memory = memory if memory is not None else detected_gpu_memory()
    plan = plan_stage(recipe, stage_name, memory)
    largest = [(k, v) for k, v in largest_first(plan.terms) if not k.startswith("CUDA context")][:3]
    top = ", ".join(f"{k.split(' (')[0].split(':')[0]} {gib(v)}" for k, v in largest)
    verdict = (
        ""
        if plan.fits is None
        else (
            f"; fits {gib(memory)} GiB" if plan.fits else f"; DOES NOT FIT {gib(memory)} GiB (pipeline plan for fixes)"
        )
    )
    return f"[{stage_name}] memory plan (CUDA GPU): peak ~{gib(plan.peak_bytes)} GiB ({top}){verdict}"


def main(args) -> int:
    """``pipeline plan``: the text report, or JSON on stdout with --json."""
    recipe = load_recipe(args.recipe, args.overrides)
    memory = parse_gpu_memory(args.gpu_memory)
    if args.num_processes is not None and args.num_processes < 1:
        raise PipelineError(f"--num-processes {args.num_processes}: must be at least 1")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    for name in stages or []:
        recipe.stage(name)
    plans = plan_recipe(recipe, stages, memory, args.launch, args.num_processes, args.prompt_tokens)
    if args.json:
        print(to_json(plans, memory))
        return 0
    print(
        f"memory plan for {args.recipe} (estimates for a CUDA GPU; CUDA context allowance {gib(CUDA_CONTEXT_BYTES)} GiB)\n"
    )
    print("\n\n".join(format_plan(p) for p in plans.values()))
    if memory is None:
        print("\n(give --gpu-memory, e.g. --gpu-memory 24GiB, for a verdict and suggestions)")
    return 0
