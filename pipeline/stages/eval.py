"""Evaluation of every policy on held-out prompts, written to ``eval/metrics.json``.

Per policy (greedy decoding for trained policies): the checkers' pass rates (e.g. preference_pass: the
alignment gained; gold_accuracy: the capability kept -- the alignment tax), the reward model's mean
score, the win rate against the reference policy judged by the reward model, the KL to the reference
estimated from samples, and the mean response length. Best-of-n is evaluated as a selection policy:
n samples from its policy, its scorer picks one; the first sample's figures are reported beside it.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from pipeline import generation, modeling, plots, selection
from pipeline.artifacts import write_json_atomic
from pipeline.data.prompts import load_prompts
from pipeline.data.sources import write_jsonl
from pipeline.scoring import build_scorer, load_function, reward_scorer


def run(ctx) -> dict[str, Any]:
    cfg, recipe = ctx.cfg, ctx.recipe
    if not ctx.is_main:  # evaluation is cheap next to training: one process does it
        return {}
    template = cfg.template or _template_of(recipe, cfg.reference)
    prompts, prompt_stats = load_prompts(ctx.resolve_source(cfg.prompts), template)
    checks = {name: load_function(ref, f"stages.{ctx.name}.checkers.{name}") for name, ref in cfg.checkers.items()}
    rm = reward_scorer(ctx, cfg.reward_from) if cfg.reward_from else None
    tokenizer = modeling.load_tokenizer(recipe.model, path=ctx.model_of(cfg.reference).path, padding_side="left")
    prompt_ids = generation.encode_prompts(tokenizer, [p.prompt for p in prompts])
    reference = _load(ctx, cfg.reference)

    results: dict[str, dict[str, Any]] = {}
    responses: dict[str, list[str]] = {}
    rewards: dict[str, list[float]] = {}
    rows = []
    names = [cfg.reference] + [n for n in cfg.policies if n != cfg.reference]
    for name in names:
        model = reference if name == cfg.reference else _load(ctx, name)
        samples = generation.sample_responses(model, tokenizer, [p.prompt for p in prompts], n=1,
                                              max_new_tokens=cfg.max_new_tokens, temperature=0, batch_size=cfg.batch_size)
        texts = [generation.decode(tokenizer, s) for s in samples]
        responses[name] = texts
        metrics = _response_metrics(prompts, texts, [len(s.token_ids) for s in samples], checks)
        if rm is not None:
            rewards[name] = rm.score([{"prompt": p.prompt, "response": t} for p, t in zip(prompts, texts)])
            metrics["reward_mean"] = round(statistics.fmean(rewards[name]), 4)
        if cfg.kl_samples and name != cfg.reference:
            metrics["kl_to_ref"] = _kl_estimate(model, reference, tokenizer, prompts, prompt_ids, cfg, seed=ctx.seed)
        elif name == cfg.reference:
            metrics["kl_to_ref"] = 0.0
        results[name] = metrics
        rows.extend({"policy": name, "prompt_id": p.prompt_id, "response": t, **({"reward": rewards[name][i]} if rm else {})}
                    for i, (p, t) in enumerate(zip(prompts, texts)))
        if model is not reference:
            del model

    if cfg.bon_from:
        results["bon"], bon_texts, bon_rewards = _best_of_n(ctx, prompts, checks, rm, loaded={cfg.reference: reference})
        responses["bon"] = bon_texts
        if bon_rewards is not None:
            rewards["bon"] = bon_rewards
        rows.extend({"policy": "bon", "prompt_id": p.prompt_id, "response": t} for p, t in zip(prompts, bon_texts))

    if rm is not None:
        base = rewards[cfg.reference]
        for name, scores in rewards.items():
            wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, base)]
            results[name][f"win_rate_vs_{cfg.reference}"] = round(statistics.fmean(wins), 4)

    report = {"prompts": prompt_stats["prompts"], "reference": cfg.reference, "policies": results}
    write_json_atomic(ctx.stage_dir / "metrics.json", report)
    write_jsonl(ctx.stage_dir / "responses.jsonl", rows)
    ctx.outputs.update(metrics=str(ctx.stage_dir / "metrics.json"), responses=str(ctx.stage_dir / "responses.jsonl"))
    if rewards:
        path = plots.histogram(ctx.stage_dir / "reward_distribution.png", rewards, "reward-model score per policy (held-out prompts)", "reward")
        ctx.outputs["reward_distribution"] = str(path)
    ctx.say(format_table(results, cfg.reference))
    return {"prompts": prompt_stats["prompts"], "policies": results}


def _template_of(recipe, stage: str) -> str:
    cfg = recipe.stages[stage]
    while getattr(cfg, "data", None) is None or not hasattr(cfg.data, "template") or cfg.data.template == "none":
        cfg = recipe.stages[cfg.policy_from]
    return cfg.data.template


def _load(ctx, stage: str):
    model = modeling.load_policy(ctx.recipe.model, None, init=ctx.model_of(stage), trainable=False)
    if ctx.recipe.model.quantization == "none":
        model.to(ctx.device)
    return model.eval()


def _response_metrics(prompts, texts: list[str], lengths: list[int], checks: dict) -> dict[str, Any]:
    metrics = {name: round(statistics.fmean(bool(check(p.row, t)) for p, t in zip(prompts, texts)), 4) for name, check in checks.items()}
    metrics["response_length"] = round(statistics.fmean(lengths), 2)
    return metrics


def _kl_estimate(policy, reference, tokenizer, prompts, prompt_ids, cfg, seed: int) -> float:
    """KL(policy || reference) ~ mean over policy samples of log p_policy(y|x) - log p_ref(y|x)."""
    samples = generation.sample_responses(policy, tokenizer, [p.prompt for p in prompts], n=cfg.kl_samples,
                                          max_new_tokens=cfg.max_new_tokens, temperature=1.0, batch_size=cfg.batch_size, seed=seed)
    pids = [prompt_ids[s.prompt_index] for s in samples]
    cids = [s.token_ids for s in samples]
    lp_policy = generation.completion_logprobs(policy, pids, cids)
    lp_ref = generation.completion_logprobs(reference, pids, cids)
    return round(statistics.fmean(a - b for a, b in zip(lp_policy, lp_ref)), 4)


def _best_of_n(ctx, prompts, checks, rm, loaded: dict):
    """Best-of-n as a policy: the bon stage's sampler and scorer on these prompts.
    ``loaded``: models already in memory by stage name (its policy is usually the reference)."""
    bon = ctx.recipe.stages[ctx.cfg.bon_from]
    from pipeline.stages.bon import sample_shard

    policy_ref = ctx.model_of(bon.policy_from)
    tokenizer = modeling.load_tokenizer(ctx.recipe.model, path=policy_ref.path, padding_side="left")
    model = loaded.get(bon.policy_from) or _load(ctx, bon.policy_from)
    candidates, _ = sample_shard(model, tokenizer, prompts, bon, seed=ctx.seed)
    scorer = rm if (bon.scorer.reward_from and rm is not None and bon.scorer.reward_from == ctx.cfg.reward_from) else build_scorer(bon.scorer, ctx)
    for c, score in zip(candidates, scorer.score(candidates)):
        c["score"] = score
    picked, _ = selection.select_best_candidates(candidates)
    by_prompt = {c["prompt_id"]: c for c in picked}
    first = {c["prompt_id"]: c for c in candidates if c["sample_idx"] == 0}
    chosen = [by_prompt.get(p.prompt_id, first[p.prompt_id]) for p in prompts]  # no valid sample: fall back to the first
    texts = [c["response"] for c in chosen]
    metrics = _response_metrics(prompts, texts, [c["n_tokens"] for c in chosen], checks)
    firsts = [first[p.prompt_id] for p in prompts]
    metrics["first_sample"] = _response_metrics(prompts, [c["response"] for c in firsts], [c["n_tokens"] for c in firsts], checks)
    metrics["n"] = bon.n
    # Best-of-n's KL to its sampling policy is known in closed form: log n - (n - 1) / n.
    metrics["kl_to_ref"] = round(math.log(bon.n) - (bon.n - 1) / bon.n, 4)
    rewards = None
    if rm is not None:
        rewards = rm.score([{"prompt": p.prompt, "response": t} for p, t in zip(prompts, texts)])
        metrics["reward_mean"] = round(statistics.fmean(rewards), 4)
        first_rewards = rm.score([{"prompt": p.prompt, "response": c["response"]} for p, c in zip(prompts, firsts)])
        metrics["first_sample"]["reward_mean"] = round(statistics.fmean(first_rewards), 4)
    return metrics, texts, rewards


def format_table(results: dict[str, dict[str, Any]], reference: str) -> str:
    keys = []
    for metrics in results.values():
        keys += [k for k, v in metrics.items() if isinstance(v, (int, float)) and k not in keys and k != "n"]
    header = ["policy"] + keys
    lines = [header] + [[name] + [f"{m[k]:.3f}" if isinstance(m.get(k), float) else str(m.get(k, "-")) for k in keys] for name, m in results.items()]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
