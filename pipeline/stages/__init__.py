"""The stage-kind registry. A stage kind is one module in this package that ends with

    KIND = register(StageKind(name="sft", config=SFTStage, run=run, outputs=(...), key_metrics=(...)))

``config`` (the recipe schema), ``runner`` (what to run), ``report`` (which metrics to show) and ``export``
(which model head) all read this registry; nothing else lists the kinds. Built-in kinds are found by
importing every module of this package, so stage modules import torch and the training libraries inside
their functions: validating a recipe stays light. A kind defined elsewhere (a plugin, a test) registers the
same way once its module is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config.schema import StageConfig


@dataclass(frozen=True)
class StageKind:
    """What the rest of the pipeline needs to know about a kind of stage."""

    name: str  # the recipe's `kind:` value
    config: type[StageConfig]  # its settings (pydantic; `kind: Literal[name]`)
    run: Callable[..., dict[str, Any]]  # run(ctx: StageContext[config]) -> metrics; outputs go to ctx.outputs
    outputs: tuple[str, ...] = ()  # output names it records in the manifest (e.g. "model", "pairs")
    key_metrics: tuple[str, ...] = ()  # metrics the report and the results table show
    model_head: str | None = None  # "causal_lm" or "reward" when its "model" output is a model


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
    """Every registered kind, the built-in ones first (imported on first use)."""
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _discovered = True
    return dict(_KINDS)


def get(name: str) -> StageKind:
    found = kinds().get(name)
    if found is None:
        raise KeyError(f"unknown stage kind {name!r}; registered: {', '.join(_KINDS)}")
    return found
