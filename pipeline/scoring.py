"""Scorers for best-of-n candidates: one interface, so the stage never cares which.

A checker is a user function ``module:function(row, response) -> float | bool`` (verifiable rewards):
``row`` is the prompt's source row (instruction, input and metadata such as a gold answer).
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Protocol

from pipeline.errors import PipelineError


class Scorer(Protocol):
    name: str

    def score(self, rows: list[dict[str, Any]], responses: list[str]) -> list[float]: ...


def load_function(ref: str, key: str) -> Callable:
    """Import ``module:function``; errors name the recipe key."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PipelineError(f"{key}: cannot import module {module_name!r} ({exc}); is it installed or on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        available = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise PipelineError(f"{key}: {module_name!r} has no function {attr!r}; it has: {', '.join(available[:20])}")
    return fn


class CheckerScorer:
    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def score(self, rows, responses):
        scores = []
        for row, response in zip(rows, responses):
            value = self.fn(row, response)
            if isinstance(value, bool) or isinstance(value, (int, float)):
                value = float(value)
            else:
                raise PipelineError(f"checker {self.name} returned {type(value).__name__} ({value!r}); it must return a number or a bool")
            if math.isnan(value):
                raise PipelineError(f"checker {self.name} returned NaN for the prompt {str(row)[:80]}")
            scores.append(value)
        return scores


def build_scorer(cfg, stage: str) -> Scorer:
    return CheckerScorer(load_function(cfg.checker, f"stages.{stage}.scorer.checker"), cfg.checker)
