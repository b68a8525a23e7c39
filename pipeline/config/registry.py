"""The stage-kind registry: the only place a kind of stage is known.

A stage kind is one module that ends with

    KIND = register(StageKind(name="sft", config=SFTStage, run=run, outputs=(...), key_metrics=(...), ...))

Everything else reads it: the recipe loader (which config class validates ``kind: sft``), the runner (what to
run), ``plan`` (the kind's memory model), preflight (its data checks), the report and the trackers (its key
metrics, plots, tables and headline), export (which model head). Nothing outside the kind's module switches on
its name.

Where kinds come from, in this order:
- the built-in kinds, the modules of ``pipeline.stages`` (imported by name on first use, so this module stays
  below the stages in the layer order);
- installed plugins: every entry point of the group ``pipeline.stages`` (its value a module to import);
- a recipe's ``plugins: [package.module, ...]``, imported by the loader before the stages are validated.

Stage modules import torch and the training libraries inside their functions, so loading a kind stays light and
validating a recipe needs no GPU libraries. No torch here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from pipeline.util.errors import RecipeError
from pipeline.util.text import suggest

BUILTIN_KINDS_PACKAGE = "pipeline.stages"
ENTRY_POINT_GROUP = "pipeline.stages"

# What a ``*_from`` field may point at, as a capability rather than a kind name (StageConfig.FROM_FIELDS).
POLICY = "policy"  # any stage whose model output is a causal LM (a policy)
REWARD_MODEL = "reward_model"  # any stage whose model output is a reward model
PAIRS = "pairs"  # any stage that writes preference pairs ("pairs" output)
CAPABILITIES = {
    POLICY: ("any stage that trains a policy", lambda k: k.model_head == "causal_lm"),
    REWARD_MODEL: ("any stage that trains a reward model", lambda k: k.model_head == "reward"),
    PAIRS: ("any stage that writes preference pairs", lambda k: "pairs" in k.outputs),
}


@dataclass(frozen=True)
class StageKind:
    """What the rest of the pipeline needs to know about a kind of stage. Only ``name``, ``config`` and ``run``
    are required; each hook left out means the feature says plainly that this kind has none."""

    name: str  # the recipe's `kind:` value
    config: type  # its settings: a pipeline.config.StageConfig subclass with `kind: Literal[name]`
    run: Callable[..., dict[str, Any]]  # run(ctx: StageContext[config]) -> metrics; outputs go to ctx.outputs
    outputs: tuple[str, ...] = ()  # output names it records in the manifest (e.g. "model", "pairs")
    key_metrics: tuple[str, ...] = ()  # metrics the report and the results table show
    model_head: str | None = None  # "causal_lm" or "reward" when its "model" output is a model
    # plan: memory(recipe, stage_name, prompt_tokens) -> pipeline.plan.memory.Setup (what its peak memory depends on)
    memory: Callable[..., Any] | None = None
    # preflight: data_checks(recipe, stage_name) -> callables that read and check its local data files
    data_checks: Callable[..., list[Callable[[], Any]]] | None = None
    # report: output name -> title of the plot it is ({name}: the stage)
    plots: Mapping[str, str] = field(default_factory=dict)
    # report, console and trackers: tables(metrics, detailed) -> {table name: (title, rows)}, rows[0] the header
    tables: Callable[..., dict[str, tuple[str, list[list[str]]]]] | None = None
    # report: headline(metrics, figures) -> markdown lines opening report.md (figures: output -> copied file name)
    headline: Callable[..., list[str]] | None = None


_KINDS: dict[str, StageKind] = {}
_discovered = False


def register(kind: StageKind) -> StageKind:
    """Add a stage kind; the config's `kind` field must default to the kind's name."""
    declared = kind.config.model_fields["kind"].default
    if declared != kind.name:
        raise ValueError(f"stage kind {kind.name!r}: its config {kind.config.__name__} has kind default {declared!r}")
    existing = _KINDS.get(kind.name)
    if existing is not None and existing.config.__qualname__ != kind.config.__qualname__:
        raise ValueError(f"stage kind {kind.name!r} is already registered by {existing.config.__module__}")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    _KINDS.pop(name, None)


def kinds() -> dict[str, StageKind]:
    """Every registered kind: the built-in ones first, then installed plugins (both imported on first use)."""
    global _discovered
    if not _discovered:
        _discovered = True
        package = importlib.import_module(BUILTIN_KINDS_PACKAGE)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{BUILTIN_KINDS_PACKAGE}.{module.name}")
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            load_plugin(entry.value, f"entry point {entry.name!r} of group {ENTRY_POINT_GROUP!r}")
    return dict(_KINDS)


def get(name: str) -> StageKind:
    found = kinds().get(name)
    if found is None:
        raise KeyError(f"unknown stage kind {name!r}; registered: {', '.join(_KINDS)}")
    return found


def load_plugin(module: str, where: str) -> None:
    """Import a module that registers stage kinds; one clear error naming ``where`` when it cannot."""
    module = module.split(":")[0]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        top = [m.name for m in pkgutil.iter_modules()]
        raise RecipeError(
            f"{where}: cannot import plugin module {module!r} ({exc}){suggest(module.split('.')[0], top)}. "
            "Install the package that provides it, or put its folder on PYTHONPATH"
        ) from exc
    except Exception as exc:  # a plugin's own bug: name it, with its message
        raise RecipeError(f"{where}: plugin module {module!r} failed to import: {type(exc).__name__}: {exc}") from exc


def capable(capability_or_kind: str) -> list[str]:
    """The kinds a ``*_from`` target may have: those with the capability, or the kind itself."""
    if capability_or_kind in CAPABILITIES:
        test = CAPABILITIES[capability_or_kind][1]
        return sorted(name for name, kind in kinds().items() if test(kind))
    return [capability_or_kind]


def describe_capability(capability_or_kind: str) -> str:
    return CAPABILITIES[capability_or_kind][0] if capability_or_kind in CAPABILITIES else ""
