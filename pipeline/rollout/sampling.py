"""Best-of-n candidates: n sampled responses per prompt as records, their scores, and a progress bar.

Shared by the best-of-n stage (which shards, selects and writes) and the eval stage (which evaluates
best-of-n as a selection policy), so both sample exactly the same way.
"""

from __future__ import annotations

from typing import Any, Protocol

from pipeline.data.prompts import PromptRecord
from pipeline.rollout import generation


class SamplingSettings(Protocol):
    n: int
    max_new_tokens: int
    temperature: float
    top_p: float
    batch_size: int


def sample_candidates(
    model, tokenizer, prompts: list[PromptRecord], settings: SamplingSettings, seed: int, bar=None, engine=None
) -> tuple[list[dict], int]:
    """Unscored candidates (n per prompt) and the number of tokens generated, sampled by ``engine``
    (a ``pipeline.rollout.engine.SamplingEngine``; default: the ``hf`` engine on ``model``)."""
    from pipeline.rollout.engine import hf_engine, sample_prompts

    progress = (lambda done, tokens, secs: bar.tick(done, tokens, secs)) if bar else None
    samples = sample_prompts(
        engine or hf_engine(model, tokenizer, settings.batch_size),
        model,
        tokenizer,
        [p.prompt for p in prompts],
        n=settings.n,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=seed,
        progress=progress,
    )
    candidates = []
    for s in samples:
        record = prompts[s.prompt_index]
        candidates.append(
            {
                "prompt_id": record.prompt_id,
                "prompt": record.prompt,
                "sample_idx": s.sample_idx,
                "response": generation.decode(tokenizer, s),
                "finish_reason": s.finish_reason,
                "n_tokens": len(s.token_ids),
                "row": record.row,
            }
        )
    return candidates, sum(len(s.token_ids) for s in samples)


def score_candidates(candidates: list[dict[str, Any]], scorer) -> list[dict[str, Any]]:
    """Adds each candidate's ``score`` (in place) and returns the candidates."""
    for candidate, score in zip(candidates, scorer.score(candidates)):
        candidate["score"] = score
    return candidates


class ProgressBar:
    """Sampling progress over prompts across shards, with tokens/s (``progress``: a pipeline.util.console.Progress)."""

    def __init__(self, progress):
        self.progress, self.before_shard, self.shard_done = progress, 0, 0

    def new_shard(self) -> None:
        self.before_shard += self.shard_done
        self.shard_done = 0

    def tick(self, done: int, tokens: int, secs: float) -> None:
        """``done`` and ``tokens`` count from the start of the current shard."""
        self.shard_done = done
        self.progress.update(self.before_shard + done, f"{tokens / max(secs, 1e-9):.0f} tok/s")

    def close(self) -> None:
        self.progress.close()
