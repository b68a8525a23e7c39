"""Best-of-n: sample n responses per prompt from a policy, score them, select the best and best-vs-worst.

Resumable and data-parallel by shards: each shard of prompts is generated, scored and written
atomically, with its own seed, so a rerun skips finished shards and gives the same candidates as an
uninterrupted run; under ``accelerate launch`` rank r takes shards r, r+N, ...; the main process merges.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import Sources, StageConfig, Strict, function_ref, function_refs
from pipeline.config.registry import POLICY, REWARD_MODEL, StageKind, register
from pipeline.data.prompts import PromptRecord, stage_prompts
from pipeline.rollout import selection
from pipeline.run.context import StageContext
from pipeline.stages import input_files, keep_checks
from pipeline.util.errors import PipelineError
from pipeline.util.files import write_jsonl_atomic


class ScorerConfig(Strict):
    """How candidates are scored: a checker function (verifiable rewards) or a trained reward model."""

    checker: str | None = Field(None, description="module:function(row, response) -> float | bool")
    reward_from: str | None = Field(None, description="A reward stage whose model scores prompt + response.")
    batch_size: int = Field(64, gt=0, description="Reward-model scoring batch size.")

    @field_validator("checker")
    @classmethod
    def _ref(cls, value: str | None) -> str | None:
        return None if value is None else function_ref(value)

    @model_validator(mode="after")
    def _one(self) -> ScorerConfig:
        if (self.checker is None) == (self.reward_from is None):
            raise ValueError("give exactly one of 'checker' (module:function) or 'reward_from' (a reward stage)")
        return self


class SelectConfig(Strict):
    top_k: int = Field(1, gt=0, description="Responses kept per prompt in 'best' (1: the best one).")
    min_score: float | None = Field(None, description="Best responses scoring below this are not kept.")
    min_margin: float = Field(0.0, ge=0, description="Pairs need chosen - rejected >= this (and > 0).")
    keep_truncated: bool = Field(False, description="Keep responses cut at max_new_tokens (unfinished text) as usable.")


class BonStage(StageConfig):
    """Best-of-n: the policy samples n responses per prompt, a scorer scores them, selection keeps
    the best as SFT rows and best-vs-worst as preference pairs."""

    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "policy_from": (POLICY,),
        "scorer.reward_from": (REWARD_MODEL,),
    }
    FUNCTION_FIELDS: ClassVar[tuple[str, ...]] = ("scorer.checker", "report")

    kind: Literal["bon"] = "bon"
    policy_from: str = Field(..., description="The sft stage whose model samples.")
    prompts: Sources
    template: Literal["alpaca", "chat"] | None = Field(None, description="Default: the policy stage's template.")
    n: int = Field(8, gt=0)
    temperature: float = Field(1.0, ge=0, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(64, gt=0, description="Prompts per generation batch (each with n samples).")
    shard_size: int = Field(256, gt=0, description="Prompts per shard; an interrupted run redoes at most one.")
    scorer: ScorerConfig
    select: SelectConfig = SelectConfig()
    # name -> module:function; reported per checker: first-sample rate, best rate, oracle pass@n
    report: dict[str, str] = {}

    _refs = field_validator("report")(classmethod(lambda cls, value: function_refs(value)))


def run(ctx: StageContext[BonStage]) -> dict[str, Any]:
    from pipeline.rollout.scoring import load_function

    cfg = ctx.cfg
    prompts, prompt_stats = stage_prompts(ctx, cfg.policy_from)
    checks = {name: load_function(ref, f"stages.{ctx.name}.report.{name}") for name, ref in cfg.report.items()}

    shards = [prompts[i : i + cfg.shard_size] for i in range(0, len(prompts), cfg.shard_size)]
    shard_dir = ctx.stage_dir / f"shards-{ctx.config_hash}"  # settings changed -> new shards, never stale ones
    mine = [k for k in range(len(shards)) if k % ctx.world_size == ctx.process_index]
    todo = [k for k in mine if not _complete(shard_path(shard_dir, k), shards[k], cfg.n)]
    generated_tokens, generation_s = sample_shards(ctx, shards, todo, shard_dir) if todo else (0, 0.0)
    ctx.wait()
    if not ctx.is_main:
        return {}

    candidates = merge_shards(shard_dir, shards, cfg.n)
    return finish(
        ctx,
        candidates,
        checks,
        {
            **prompt_stats,
            "n": cfg.n,
            "shards": len(shards),
            "shards_resumed": len(mine) - len(todo),
            "generated_tokens": generated_tokens,
            "tokens_per_s": round(generated_tokens / generation_s, 1) if generation_s else None,
        },
    )


def sample_shards(
    ctx: StageContext[BonStage], shards: list[list[PromptRecord]], todo: list[int], shard_dir: Path
) -> tuple[int, float]:
    """Generate, score and write each shard in ``todo``; (tokens generated, seconds spent generating).
    Only called when a shard is left, so a rerun with every shard finished loads no model."""
    from pipeline import modeling
    from pipeline.modeling.loading import load_sampling_policy
    from pipeline.rollout.engine import hf_engine
    from pipeline.rollout.sampling import ProgressBar, sample_candidates, score_candidates
    from pipeline.rollout.scoring import build_scorer
    from pipeline.util.console import stage_progress

    cfg, recipe = ctx.cfg, ctx.recipe
    scorer = build_scorer(cfg.scorer, ctx)
    policy = ctx.model_of(cfg.policy_from)
    tokenizer = modeling.load_tokenizer(recipe.model, path=policy.path, padding_side="left")
    model = load_sampling_policy(recipe.model, policy, ctx.device)  # an adapter merged (unless quantized)
    engine = hf_engine(model, tokenizer, cfg.batch_size)
    shard_dir.mkdir(parents=True, exist_ok=True)
    bar = ProgressBar(stage_progress(ctx, "sampling", sum(len(shards[k]) for k in todo), "prompts"))
    generated_tokens, generation_s = 0, 0.0
    for k in todo:
        started = time.perf_counter()
        bar.new_shard()
        candidates, tokens = sample_candidates(
            model, tokenizer, shards[k], cfg, seed=shard_seed(ctx.seed, k), bar=bar, engine=engine
        )
        generation_s += time.perf_counter() - started
        generated_tokens += tokens
        score_candidates(candidates, scorer)
        write_jsonl_atomic(shard_path(shard_dir, k), candidates)  # a killed run never leaves half a shard
    bar.close()
    return generated_tokens, generation_s


def shard_path(shard_dir: Path, k: int) -> Path:
    return shard_dir / f"shard-{k:05d}.jsonl"


def shard_seed(seed: int, k: int) -> int:
    return seed * 1_000_003 + k


def _complete(path: Path, prompts: list[PromptRecord], n: int) -> bool:
    """A shard counts as done only if it holds every (prompt, sample) it should."""
    if not path.is_file():
        return False
    try:
        keys = {(c["prompt_id"], c["sample_idx"]) for c in map(json.loads, path.read_text().splitlines())}
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
    return keys == {(p.prompt_id, i) for p in prompts for i in range(n)}


def merge_shards(shard_dir: Path, shards: list[list[PromptRecord]], n: int) -> list[dict]:
    candidates = []
    for k, prompts in enumerate(shards):
        path = shard_path(shard_dir, k)
        if not _complete(path, prompts, n):
            raise PipelineError(
                f"shard {k} ({path}) is missing or incomplete after generation; rerun the stage to redo it"
            )
        candidates.extend(json.loads(line) for line in path.read_text().splitlines())
    return candidates


def finish(
    ctx: StageContext[BonStage], candidates: list[dict], checks: dict, metrics: dict[str, Any]
) -> dict[str, Any]:
    """Select, write the outputs, and compute the metrics (main process)."""
    sel = ctx.cfg.select
    best_candidates, best_stats = selection.select_top_k_candidates(
        candidates, sel.top_k, sel.min_score, sel.keep_truncated
    )
    pairs, pair_stats = selection.select_pair_candidates(candidates, sel.min_margin, sel.keep_truncated)
    warnings = keep_warnings(
        ctx.name, ctx.cfg, len({c["prompt_id"] for c in best_candidates}), len(pairs), best_stats, pair_stats
    )
    if not best_candidates:
        raise PipelineError(
            f"best-of-n selected nothing from {len(candidates)} candidates ({json.dumps(best_stats['degenerate'])} degenerate, "
            f"{best_stats['below_min_score']} below min_score): " + "; ".join(warnings)
        )
    out = ctx.stage_dir
    write_jsonl_atomic(out / "candidates.jsonl", candidates)
    write_jsonl_atomic(out / "best.jsonl", [selection.sft_row(c) for c in best_candidates])
    write_jsonl_atomic(out / "pairs.jsonl", [selection.pair_row(c, r) for c, r in pairs])
    ctx.outputs.update(
        candidates=str(out / "candidates.jsonl"), best=str(out / "best.jsonl"), pairs=str(out / "pairs.jsonl")
    )

    scores = [c["score"] for c in candidates]
    metrics.update(
        candidates=len(candidates),
        best_rows=len(best_candidates),
        pairs=len(pairs),
        score_mean=round(sum(scores) / len(scores), 4),
        best_score_mean=round(sum(c["score"] for c in best_candidates) / len(best_candidates), 4),
        degenerate=best_stats["degenerate"],
        select={"best": best_stats, "pairs": pair_stats},
    )
    top1 = selection.select_top_k_candidates(candidates, 1, keep_truncated=sel.keep_truncated)[0]
    for name, check in checks.items():
        metrics[f"checks.{name}"] = selection.checker_rates(candidates, top1, check, sel.keep_truncated)
    ctx.say(_summary_line(ctx.name, metrics))
    return keep_checks.record(metrics, warnings, ctx.say)


def _summary_line(name: str, m: dict[str, Any]) -> str:
    checks = "; ".join(
        f"{k[7:]}: first {v['first_sample']:.2f}, best {v['best']:.2f}, pass@n {v['pass_at_n']:.2f}"
        for k, v in m.items()
        if k.startswith("checks.")
    )
    speed = f", {m['tokens_per_s']:.0f} tok/s" if m.get("tokens_per_s") else ""
    return (
        f"[{name}] {m['prompts']} prompts x {m['n']} samples{speed}; best rows {m['best_rows']}, pairs {m['pairs']}"
        + (f"; {checks}" if checks else "")
    )


def degenerate_cause(degenerate: dict[str, int], candidates: int, max_new_tokens: int) -> tuple[int, str]:
    """The commoner kind of unusable sample (truncated or empty) and what to do about it."""
    truncated, empty = degenerate.get("truncated", 0), degenerate.get("empty", 0)
    if truncated >= empty:
        return truncated, (
            f"{truncated} of {candidates} samples hit max_new_tokens={max_new_tokens} and were dropped as truncated: "
            "raise max_new_tokens, or set select.keep_truncated: true"
        )
    return empty, (
        f"{empty} of {candidates} samples were empty: the policy ends its reply at once; check that the prompts "
        "use the template it was trained with"
    )


def keep_warnings(name: str, cfg, best_prompts: int, pairs: int, best_stats: dict, pair_stats: dict) -> list[str]:
    """Warnings for a best-of-n stage (``cfg``: its BonStage) that kept best rows or pairs for few prompts."""
    prompts, candidates = best_stats["prompts"], best_stats["candidates"]
    unusable = degenerate_cause(best_stats["degenerate"], candidates, cfg.max_new_tokens)[1]
    sel = cfg.select
    best_causes = [
        (
            best_stats["prompts_without_valid"],
            f"{best_stats['prompts_without_valid']} prompts had no usable sample: {unusable}",
        ),
        (
            best_stats["below_min_score"],
            f"{best_stats['below_min_score']} best samples scored below select.min_score="
            f"{sel.min_score}: lower select.min_score",
        ),
    ]
    degenerate_total = sum(best_stats["degenerate"].values())
    too_few = f"{pair_stats['too_few_valid']} prompts had fewer than 2 usable samples: " + (
        unusable if degenerate_total else f"n={cfg.n} is too small; raise n"
    )
    pair_causes = [
        (pair_stats["too_few_valid"], too_few),
        (
            pair_stats["equal_scores"],
            f"{pair_stats['equal_scores']} prompts had every usable sample scored the same "
            "(no preference between them): raise n or temperature, or use a scorer with finer scores",
        ),
        (
            pair_stats["below_min_margin"],
            f"{pair_stats['below_min_margin']} pairs had a margin below select.min_margin="
            f"{sel.min_margin}: lower select.min_margin",
        ),
    ]
    found = [
        keep_checks.keep_warning(f"[{name}] best.jsonl", best_prompts, prompts, best_causes),
        keep_checks.keep_warning(f"[{name}] pairs.jsonl", pairs, prompts, pair_causes),
    ]
    return [w for w in found if w]


def memory(recipe, name: str, prompt_tokens: int | None = None):
    """plan: n samples of batch_size prompts at once, and the reward model when it scores them."""
    from pipeline.plan.memory import generation_setup

    stage = recipe.stage(name)
    return generation_setup(
        recipe,
        name,
        prompt_tokens,
        gen_batch=stage.batch_size * stage.n,
        gen_prompts=stage.batch_size,
        new_tokens=stage.max_new_tokens,
        sampling=stage.temperature > 0,
        top_p=stage.top_p,
        scorer=stage.scorer.reward_from is not None,
        scorer_batch=stage.scorer.batch_size,
    )


KIND = register(
    StageKind(
        name="bon",
        config=BonStage,
        run=run,
        memory=memory,
        data_checks=input_files.prompts,
        outputs=("candidates", "best", "pairs"),
        key_metrics=("prompts", "n", "best_rows", "pairs", "tokens_per_s"),
    )
)
