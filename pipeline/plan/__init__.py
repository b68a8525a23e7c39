"""Will each stage fit on my GPU? A peak-memory estimate per stage, term by term (``pipeline plan``).

- ``shapes``: exact parameter counts, the model instantiated on the ``meta`` device (no weights read);
- ``optimizers``: optimizer states per trainable parameter;
- ``launch``: processes, ZeRO / FSDP sharding and offload, read from an accelerate config;
- ``memory``: a stage's ``Setup`` (built by its kind's ``memory`` hook in the registry) and its memory terms;
- ``stage_plan``: one stage's peak and one-line summary (``plan_stage``);
- ``changes``: suggestions for a stage that does not fit, each re-planned;
- ``report``: the CLI's text and JSON, and ``run``'s headline; ``units``: sizes and their text.

torch and transformers are imported only inside the functions that need them.
"""

from __future__ import annotations

from pipeline.config import Recipe
from pipeline.plan.changes import suggest_changes
from pipeline.plan.launch import read_launch
from pipeline.plan.memory import NoMemoryModel
from pipeline.plan.stage_plan import StagePlan, plan_stage

__all__ = ["StagePlan", "plan_recipe", "plan_stage"]


def plan_recipe(
    recipe: Recipe,
    stages: list[str] | None = None,
    gpu_memory: int | None = None,
    launch: str | None = None,
    num_processes: int | None = None,
    prompt_tokens: int | None = None,
    with_suggestions: bool = True,
) -> dict[str, StagePlan]:
    """Every stage (or ``stages``) planned; a stage whose kind has no memory model gets a plan without an
    estimate that says so, and the others are planned as usual."""
    dist = read_launch(launch or recipe.launch, num_processes)
    plans = {}
    for name in stages or list(recipe.stages):
        try:
            plan = plan_stage(recipe, name, gpu_memory, dist, prompt_tokens)
        except NoMemoryModel as exc:
            plans[name] = StagePlan.without_estimate(name, recipe.stage(name).kind, str(exc), gpu_memory)
            continue
        if with_suggestions and plan.fits is False:
            plan.suggestions = suggest_changes(recipe, name, plan, dist, prompt_tokens)
        plans[name] = plan
    return plans
