"""Scorers for best-of-n candidates: one interface, so stages never care which.

``score(items)`` takes dicts with ``prompt`` (as rendered for the policy), ``response`` and ``row``
(the prompt's source row: instruction, input and metadata such as a gold answer) and returns floats.
- a checker: a user function ``module:function(row, response) -> float | bool`` (verifiable rewards);
- a reward model trained by a reward stage: it scores prompt + response exactly as TRL's
  RewardTrainer saw its training pairs.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from collections.abc import Callable
from typing import Any, Protocol

from pipeline.util.console import Progress
from pipeline.util.errors import PipelineError


class Scorer(Protocol):
    name: str

    def score(self, items: list[dict[str, Any]]) -> list[float]: ...


def load_function(ref: str, key: str, call: tuple[str, ...] = ("row", "response")) -> Callable:
    """Import ``module:function`` and check it can be called with the arguments ``call`` names; errors name the
    recipe key (``validate`` calls this for every checker before anything runs, the stages again)."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PipelineError(
            f"{key}: cannot import module {module_name!r} ({exc}); is it installed or on PYTHONPATH?"
        ) from None
    except Exception as exc:  # the module's own bug (a syntax error, a failing import-time line): say where
        where = f" ({exc.filename}, line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise PipelineError(
            f"{key}: module {module_name!r} fails when imported: {type(exc).__name__}: {exc}{where}"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        available = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise PipelineError(f"{key}: {module_name!r} has no function {attr!r}; it has: {', '.join(available[:20])}")
    problem = _signature_problem(fn, call)
    if problem:
        raise PipelineError(
            f"{key}: {ref} cannot be called as {attr}({', '.join(call)}): {problem}. A checker takes the prompt's "
            "source row (a dict: instruction, input and the other columns) and the response (a str), and returns a "
            f"bool or a number: def {attr}({', '.join(call)}): ..."
        )
    return fn


def _signature_problem(fn: Callable, call: tuple[str, ...]) -> str | None:
    """Why ``fn`` cannot take ``len(call)`` positional arguments, or None (also when it has no readable signature)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C functions: nothing to check
        return None
    try:
        signature.bind(*call)
    except TypeError as exc:
        return f"its signature is {fn.__name__ if hasattr(fn, '__name__') else 'it'}{signature} ({exc})"
    return None


class CheckerScorer:
    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def score(self, items):
        scores = []
        for item in items:
            value = self.fn(item["row"], item["response"])
            if not isinstance(value, (bool, int, float)):
                raise PipelineError(
                    f"checker {self.name} returned {type(value).__name__} ({value!r}); it must return a number or a bool"
                )
            if math.isnan(float(value)):
                raise PipelineError(f"checker {self.name} returned NaN for the prompt {str(item['row'])[:80]}")
            scores.append(float(value))
        return scores


class RewardModelScorer:
    """Batched, length-sorted scoring with a sequence-classifier reward model."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        batch_size: int = 64,
        max_length: int | None = None,
        progress: bool = False,
        padding_side: str = "right",
    ):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batch_size, self.max_length, self.progress = batch_size, max_length, progress
        self.padding_side = padding_side

    def encode(self, prompt: Any, response: str) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, list):  # conversational: the chat template over prompt + reply, as RewardTrainer
            from pipeline.modeling.chat import chat_ids

            ids = chat_ids(tok, prompt + [{"role": "assistant", "content": response}])
        else:  # RewardTrainer: prompt + response + EOS, tokenized as one text
            text = prompt + response
            ids = tok(text if text.endswith(tok.eos_token) else text + tok.eos_token)["input_ids"]
        return ids[: self.max_length] if self.max_length else ids

    def score(self, items):
        import torch

        from pipeline.rollout.batches import pad_batch

        encoded = [self.encode(item["prompt"], item["response"]) for item in items]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = [0.0] * len(encoded)
        pad = self.tokenizer.pad_token_id
        device = self.model.device
        was_training = self.model.training
        self.model.eval()
        batches = range(0, len(order), self.batch_size)
        # a bar on a terminal only: scoring is a part of a stage's longer step, whose progress line the logs get
        bar = Progress(f"scoring with {self.name}", len(batches), "batches", self.progress and sys.stdout.isatty())
        with torch.no_grad(), bar:
            for start in batches:
                chunk = order[start : start + self.batch_size]
                ids, mask, positions = pad_batch([encoded[i] for i in chunk], pad, self.padding_side)
                logits = self.model(
                    input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)
                ).logits
                for i, value in zip(chunk, logits[:, 0].float().tolist()):
                    scores[i] = value
                bar.advance()
        self.model.train(was_training)
        return scores


def build_scorer(cfg, ctx) -> Scorer:
    """The scorer a stage's ``scorer:`` block asks for."""
    if cfg.checker:
        return CheckerScorer(load_function(cfg.checker, f"stages.{ctx.name}.scorer.checker"), cfg.checker)
    return reward_scorer(ctx, cfg.reward_from, batch_size=cfg.batch_size)


def reward_scorer(ctx, stage: str, batch_size: int = 64) -> RewardModelScorer:
    """The reward model a reward stage trained, ready to score (on this process's device)."""
    from pipeline import modeling

    ref = ctx.model_of(stage)
    recipe = ctx.recipe
    tokenizer = modeling.load_tokenizer(recipe.model, path=ref.path)
    model = modeling.load_trained_reward_model(recipe.model, ref, ctx.device)
    max_length = recipe.stages[stage].data.max_length
    return RewardModelScorer(model, tokenizer, f"reward model of {stage!r}", batch_size, max_length, ctx.is_main)
