"""Best-of-n: sample n responses per prompt from a policy, score them, select the best and best-vs-worst.

Resumable and data-parallel by shards: each shard of prompts is generated, scored and written
atomically, with its own seed, so a rerun skips finished shards and gives the same candidates as an
uninterrupted run; under ``accelerate launch`` rank r takes shards r, r+N, ...; the main process merges.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline import generation, modeling, selection
from pipeline.data.prompts import PromptRecord, load_prompts
from pipeline.data.sources import write_jsonl
from pipeline.errors import PipelineError
from pipeline.scoring import build_scorer, load_function


def run(ctx) -> dict[str, Any]:
    cfg, recipe = ctx.cfg, ctx.recipe
    template = cfg.template or recipe.stages[cfg.policy_from].data.template
    prompts, prompt_stats = load_prompts(ctx.resolve_source(cfg.prompts), template)
    checks = {name: load_function(ref, f"stages.{ctx.name}.report.{name}") for name, ref in cfg.report.items()}

    shards = [prompts[i:i + cfg.shard_size] for i in range(0, len(prompts), cfg.shard_size)]
    shard_dir = ctx.stage_dir / f"shards-{ctx.config_hash}"  # settings changed -> new shards, never stale ones
    mine = [k for k in range(len(shards)) if k % ctx.world_size == ctx.process_index]
    todo = [k for k in mine if not _complete(shard_path(shard_dir, k), shards[k], cfg.n)]
    generated_tokens, generation_s = 0, 0.0
    if todo:  # a rerun with every shard finished loads neither the policy nor the scorer
        scorer = build_scorer(cfg.scorer, ctx)
        policy = ctx.model_of(cfg.policy_from)
        tokenizer = modeling.load_tokenizer(recipe.model, path=policy.path, padding_side="left")
        model = modeling.load_policy(recipe.model, None, init=policy, trainable=False)
        if recipe.model.quantization == "none":
            model.to(ctx.device)
        shard_dir.mkdir(parents=True, exist_ok=True)
        bar = _Bar(ctx, total=sum(len(shards[k]) for k in todo))
        for k in todo:
            started = time.perf_counter()
            bar.new_shard()
            candidates, tokens = sample_shard(model, tokenizer, shards[k], cfg, seed=shard_seed(ctx.seed, k), bar=bar)
            generation_s += time.perf_counter() - started
            generated_tokens += tokens
            for candidate, score in zip(candidates, scorer.score(candidates)):
                candidate["score"] = score
            write_jsonl(shard_path(shard_dir, k), candidates)  # atomic: a killed run never leaves half a shard
        bar.close()
    ctx.wait()
    if not ctx.is_main:
        return {}

    candidates = merge_shards(shard_dir, shards, cfg.n)
    return finish(ctx, candidates, checks, {
        **prompt_stats,
        "n": cfg.n,
        "shards": len(shards),
        "shards_resumed": len(mine) - len(todo),
        "generated_tokens": generated_tokens,
        "tokens_per_s": round(generated_tokens / generation_s, 1) if generation_s else None,
    })


def shard_path(shard_dir: Path, k: int) -> Path:
    return shard_dir / f"shard-{k:05d}.jsonl"


def shard_seed(seed: int, k: int) -> int:
    return seed * 1_000_003 + k


def sample_shard(model, tokenizer, prompts: list[PromptRecord], cfg, seed: int, bar=None) -> tuple[list[dict], int]:
    """Candidates for one shard (unscored) and the number of tokens generated."""
    progress = (lambda done, tokens, secs: bar.tick(done, tokens, secs)) if bar else None
    samples = generation.sample_responses(
        model, tokenizer, [p.prompt for p in prompts], n=cfg.n, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size, seed=seed, progress=progress,
    )
    candidates = []
    for s in samples:
        record = prompts[s.prompt_index]
        candidates.append({
            "prompt_id": record.prompt_id,
            "prompt": record.prompt,
            "sample_idx": s.sample_idx,
            "response": generation.decode(tokenizer, s),
            "finish_reason": s.finish_reason,
            "n_tokens": len(s.token_ids),
            "row": record.row,
        })
    return candidates, sum(len(s.token_ids) for s in samples)


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
            raise PipelineError(f"shard {k} ({path}) is missing or incomplete after generation; rerun the stage to redo it")
        candidates.extend(json.loads(line) for line in path.read_text().splitlines())
    return candidates


def finish(ctx, candidates: list[dict], checks: dict, metrics: dict[str, Any]) -> dict[str, Any]:
    """Select, write the outputs, and compute the metrics (main process)."""
    sel = ctx.cfg.select
    best_candidates, best_stats = selection.select_top_k_candidates(candidates, sel.top_k, sel.min_score)
    pairs, pair_stats = selection.select_pair_candidates(candidates, sel.min_margin)
    if not best_candidates:
        raise PipelineError(
            f"best-of-n selected nothing from {len(candidates)} candidates ({json.dumps(best_stats['degenerate'])} degenerate, "
            f"{best_stats['below_min_score']} below min_score); raise max_new_tokens or lower select.min_score"
        )
    out = ctx.stage_dir
    write_jsonl(out / "candidates.jsonl", candidates)
    write_jsonl(out / "best.jsonl", [selection.sft_row(c) for c in best_candidates])
    write_jsonl(out / "pairs.jsonl", [selection.pair_row(c, r) for c, r in pairs])
    ctx.outputs.update(candidates=str(out / "candidates.jsonl"), best=str(out / "best.jsonl"), pairs=str(out / "pairs.jsonl"))

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
    top1 = selection.select_best_candidates(candidates)[0]
    for name, check in checks.items():
        metrics[f"checks.{name}"] = selection.checker_rates(candidates, top1, check)
    ctx.say(_summary_line(ctx.name, metrics))
    return metrics


def _summary_line(name: str, m: dict[str, Any]) -> str:
    checks = "; ".join(f"{k[7:]}: first {v['first_sample']:.2f}, best {v['best']:.2f}, pass@n {v['pass_at_n']:.2f}" for k, v in m.items() if k.startswith("checks."))
    speed = f", {m['tokens_per_s']:.0f} tok/s" if m.get("tokens_per_s") else ""
    return f"[{name}] {m['prompts']} prompts x {m['n']} samples{speed}; best rows {m['best_rows']}, pairs {m['pairs']}" + (f"; {checks}" if checks else "")


class _Bar:
    """Progress over prompts with tokens/s (main process; tqdm when attached to a terminal)."""

    def __init__(self, ctx, total: int):
        self.shard_done = 0
        self.bar = None
        if ctx.is_main and ctx.show_progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="prompt", desc=f"[{ctx.name}] sampling")

    def new_shard(self) -> None:
        self.shard_done = 0

    def tick(self, done: int, tokens: int, secs: float) -> None:
        """``done`` and ``tokens`` count from the start of the current shard."""
        if self.bar is not None:
            self.bar.update(done - self.shard_done)
            self.bar.set_postfix_str(f"{tokens / max(secs, 1e-9):.0f} tok/s")
        self.shard_done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
