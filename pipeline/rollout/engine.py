"""The sampling engine: the one interface best-of-n, eval and the label stage sample through.

An engine takes prompts as token ids (already through the chat template, see
``generation.prompt_inputs``) and returns, for each prompt, n samples with their token ids and finish
reason ("eos" | "length"), in (prompt, sample) order. Decoding, scoring and selection stay outside it,
so a backend only has to produce tokens.

Shipped: ``hf``, the transformers sampler of ``pipeline.rollout.generation`` (one prefill per prompt
shared by its n samples, finished rows leave the batch; greedy equals ``generate(do_sample=False)``).
A vLLM backend would implement the same ``sample`` over ``LLM.generate(prompt_token_ids=...,
SamplingParams(n, temperature, top_p, max_tokens, stop_token_ids, seed))``; none is shipped or tested.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from pipeline.rollout.generation import Sample, prompt_inputs, sample_ids

Progress = Callable[[int, int, float], None]  # (prompts done, tokens generated, seconds)


@runtime_checkable
class SamplingEngine(Protocol):
    name: str

    def sample(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop_ids: list[int],
        seed: int,
        progress: Progress | None = None,
    ) -> list[Sample]:
        """n samples per prompt, sorted by (prompt_index, sample_idx); temperature 0 is greedy."""
        ...


class HFEngine:
    """Today's transformers path: ``generation.sample_ids`` on a loaded model."""

    name = "hf"

    def __init__(self, model, pad_id: int | None, batch_size: int = 64):
        self.model, self.pad_id, self.batch_size = model, pad_id, batch_size

    def sample(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop_ids: list[int],
        seed: int,
        progress: Progress | None = None,
    ) -> list[Sample]:
        return sample_ids(
            self.model,
            prompt_ids,
            n,
            max_new_tokens,
            stop_ids,
            self.pad_id,
            temperature=temperature,
            top_p=top_p,
            batch_size=self.batch_size,
            seed=seed,
            progress=progress,
        )


def hf_engine(model, tokenizer, batch_size: int = 64) -> HFEngine:
    return HFEngine(model, tokenizer.pad_token_id, batch_size)


def sample_prompts(
    engine: SamplingEngine,
    model,
    tokenizer,
    prompts: Sequence,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[Sample]:
    """Text or chat prompts through ``engine``: encoded as SFT saw them, stopped at every id that ends a
    response for this model (``modeling.chat.stop_ids``)."""
    encoded, stops = prompt_inputs(model, tokenizer, prompts)
    return engine.sample(encoded, n, max_new_tokens, temperature, top_p, stops, seed, progress)
