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
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import Sources, StageConfig, function_refs
from pipeline.config.registry import POLICY, REWARD_MODEL, StageKind, register
from pipeline.data.prompts import stage_prompts
from pipeline.observe import plots
from pipeline.rollout import selection
from pipeline.run.context import StageContext
from pipeline.stages import input_files
from pipeline.util.console import stage_progress
from pipeline.util.files import write_json_atomic, write_jsonl_atomic
from pipeline.util.text import markdown_table, text_table


class EvalStage(StageConfig):
    """Held-out evaluation of every policy: checker rates (alignment gained, capability kept), reward-model
    score, win rate against the reference policy, KL to it, response length. Writes eval/metrics.json."""

    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "policies": (POLICY,),
        "reference": (POLICY,),
        "bon_from": ("bon",),
        "reward_from": (REWARD_MODEL,),
    }
    FUNCTION_FIELDS: ClassVar[tuple[str, ...]] = ("checkers",)

    kind: Literal["eval"] = "eval"
    prompts: Sources
    policies: list[str] = Field(..., min_length=1, description="Stages whose models are evaluated (greedy decoding).")
    reference: str = Field(..., description="The baseline policy for win rate and KL (usually the SFT stage).")
    bon_from: str | None = Field(
        None, description="Also evaluate best-of-n as a selection policy, as this bon stage samples and scores."
    )
    reward_from: str | None = Field(None, description="Reward model for reward_mean and win rates.")
    # metric name -> module:function(row, response) -> bool, e.g. preference_pass, gold_accuracy
    checkers: dict[str, str] = {}
    template: Literal["alpaca", "chat"] | None = Field(None, description="Default: the reference stage's template.")
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(64, gt=0)
    kl_samples: int = Field(4, ge=0, description="Samples per prompt (temperature 1) for the KL estimate; 0 skips it.")
    # The report's headline figure: per policy, the alignment measure against capability kept and against KL.
    alignment_metric: str | None = Field(
        None, description="A checker name or reward_mean; default: the first checker, else reward_mean."
    )
    capability_metric: str | None = Field(
        None, description="A checker name (capability kept, e.g. gold_accuracy); default: the second checker."
    )

    _refs = field_validator("checkers")(classmethod(lambda cls, value: function_refs(value)))

    @model_validator(mode="after")
    def _frontier_metrics(self) -> EvalStage:
        known = [*self.checkers, *(["reward_mean"] if self.reward_from else [])]
        for key in ("alignment_metric", "capability_metric"):
            value = getattr(self, key)
            if value is not None and value not in known:
                raise ValueError(
                    f"{key}: {value!r} is not measured here; one of: {', '.join(known) or '(no checkers or reward_from)'}"
                )
        return self

    def frontier_axes(self) -> tuple[str | None, str | None]:
        """(alignment measure, capability measure) for the frontier plot; None where there is none."""
        checkers = list(self.checkers)
        alignment = self.alignment_metric or (checkers[0] if checkers else "reward_mean" if self.reward_from else None)
        capability = self.capability_metric or next((c for c in checkers[1:] if c != alignment), None)
        return alignment, capability


def run(ctx: StageContext[EvalStage]) -> dict[str, Any]:
    from pipeline import modeling
    from pipeline.rollout import generation
    from pipeline.rollout.scoring import load_function, reward_scorer

    cfg, recipe = ctx.cfg, ctx.recipe
    if not ctx.is_main:  # evaluation is cheap next to training: one process does it
        return {}
    prompts, prompt_stats = stage_prompts(ctx, cfg.reference)
    checks = {name: load_function(ref, f"stages.{ctx.name}.checkers.{name}") for name, ref in cfg.checkers.items()}
    rm = reward_scorer(ctx, cfg.reward_from) if cfg.reward_from else None
    tokenizer = modeling.load_tokenizer(recipe.model, path=ctx.model_of(cfg.reference).path, padding_side="left")
    prompt_ids = generation.encode_prompts(tokenizer, [p.prompt for p in prompts])
    reference = _load(ctx, cfg.reference)

    results: dict[str, dict[str, Any]] = {}
    rewards: dict[str, list[float]] = {}
    rows = []
    names = [cfg.reference] + [n for n in cfg.policies if n != cfg.reference]
    bar = stage_progress(ctx, "evaluating", len(names) + bool(cfg.bon_from), "policies")
    for name in names:
        bar.update(bar.done, name)
        model = reference if name == cfg.reference else _load(ctx, name)
        results[name], texts, scores = _greedy(ctx, model, reference, tokenizer, prompts, prompt_ids, checks, rm)
        if scores is not None:
            rewards[name] = scores
        rows.extend(
            {"policy": name, "prompt_id": p.prompt_id, "response": t, **({"reward": scores[i]} if rm else {})}
            for i, (p, t) in enumerate(zip(prompts, texts))
        )
        if model is not reference:
            del model
        bar.advance()

    if cfg.bon_from:
        bar.update(bar.done, "bon")
        results["bon"], bon_texts, bon_rewards = _best_of_n(ctx, prompts, checks, rm, loaded={cfg.reference: reference})
        if bon_rewards is not None:
            rewards["bon"] = bon_rewards
        rows.extend({"policy": "bon", "prompt_id": p.prompt_id, "response": t} for p, t in zip(prompts, bon_texts))
        bar.advance()
    bar.close("done")

    if rm is not None:
        base = rewards[cfg.reference]
        for name, scores in rewards.items():
            wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, base)]
            results[name][f"win_rate_vs_{cfg.reference}"] = round(statistics.fmean(wins), 4)

    report = {"prompts": prompt_stats["prompts"], "reference": cfg.reference, "policies": results}
    report["frontier"] = frontier(cfg, results)
    _write_outputs(ctx, report, rows, rewards)
    ctx.say(text_table(policy_rows(report, first_samples=False)))
    return report  # the stage's metrics.json is this report (the runner rewrites it from what a stage returns)


def _greedy(ctx: StageContext[EvalStage], model, reference, tokenizer, prompts, prompt_ids, checks, rm):
    """(metrics, responses, reward-model scores or None) of one policy's greedy responses."""
    from pipeline.rollout import engine, generation

    cfg = ctx.cfg
    samples = engine.sample_prompts(
        engine.hf_engine(model, tokenizer, cfg.batch_size),
        model,
        tokenizer,
        [p.prompt for p in prompts],
        n=1,
        max_new_tokens=cfg.max_new_tokens,
        temperature=0,
    )
    texts = [generation.decode(tokenizer, s) for s in samples]
    metrics = _response_metrics(prompts, texts, [len(s.token_ids) for s in samples], checks)
    scores = None
    if rm is not None:
        scores = rm.score([{"prompt": p.prompt, "response": t} for p, t in zip(prompts, texts)])
        metrics["reward_mean"] = round(statistics.fmean(scores), 4)
    if model is reference:
        metrics["kl_to_ref"] = 0.0
    elif cfg.kl_samples:
        metrics["kl_to_ref"] = _kl_estimate(model, reference, tokenizer, prompts, prompt_ids, cfg, seed=ctx.seed)
    return metrics, texts, scores


def frontier(cfg: EvalStage, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline figure's data: which measures it plots, and one point per policy."""
    alignment, capability = cfg.frontier_axes()
    points = [
        {
            "policy": name,
            "alignment": m.get(alignment),
            "capability": m.get(capability) if capability else None,
            "kl_to_ref": m.get("kl_to_ref"),
        }
        for name, m in results.items()
        if m.get(alignment) is not None
    ]
    return {"alignment": alignment, "capability": capability, "reference": cfg.reference, "points": points}


def _write_outputs(ctx: StageContext[EvalStage], report: dict, rows: list[dict], rewards: dict) -> None:
    write_json_atomic(ctx.stage_dir / "metrics.json", report)
    write_jsonl_atomic(ctx.stage_dir / "responses.jsonl", rows)
    ctx.outputs.update(metrics=str(ctx.stage_dir / "metrics.json"), responses=str(ctx.stage_dir / "responses.jsonl"))
    if report["frontier"]["points"]:
        ctx.outputs["frontier"] = str(plots.frontier(ctx.stage_dir / "frontier.png", report["frontier"]))
    if rewards:
        title = "reward-model score per policy (held-out prompts)"
        path = plots.histogram(ctx.stage_dir / "reward_distribution.png", rewards, title, "reward")
        ctx.outputs["reward_distribution"] = str(path)


def _load(ctx: StageContext[EvalStage], stage: str):
    """A policy eval only samples and scores: an adapter merged into its base (unless quantized)."""
    from pipeline.modeling.loading import load_sampling_policy

    return load_sampling_policy(ctx.recipe.model, ctx.model_of(stage), ctx.device)


def _response_metrics(prompts, texts: list[str], lengths: list[int], checks: dict) -> dict[str, Any]:
    metrics = {
        name: round(statistics.fmean(bool(check(p.row, t)) for p, t in zip(prompts, texts)), 4)
        for name, check in checks.items()
    }
    metrics["response_length"] = round(statistics.fmean(lengths), 2)
    return metrics


def _kl_estimate(policy, reference, tokenizer, prompts, prompt_ids, cfg: EvalStage, seed: int) -> float:
    """KL(policy || reference) ~ mean over policy samples of log p_policy(y|x) - log p_ref(y|x)."""
    from pipeline.rollout import engine, generation

    samples = engine.sample_prompts(
        engine.hf_engine(policy, tokenizer, cfg.batch_size),
        policy,
        tokenizer,
        [p.prompt for p in prompts],
        n=cfg.kl_samples,
        max_new_tokens=cfg.max_new_tokens,
        temperature=1.0,
        seed=seed,
    )
    pids = [prompt_ids[s.prompt_index] for s in samples]
    cids = [s.token_ids for s in samples]
    lp_policy = generation.completion_logprobs(policy, pids, cids)
    lp_ref = generation.completion_logprobs(reference, pids, cids)
    return round(statistics.fmean(a - b for a, b in zip(lp_policy, lp_ref)), 4)


def _best_of_n(ctx: StageContext[EvalStage], prompts, checks, rm, loaded: dict):
    """Best-of-n as a policy: the bon stage's sampler and scorer on these prompts.
    ``loaded``: models already in memory by stage name (its policy is usually the reference)."""
    from pipeline import modeling
    from pipeline.rollout.sampling import sample_candidates, score_candidates
    from pipeline.rollout.scoring import build_scorer

    bon = ctx.recipe.stages[ctx.cfg.bon_from]

    policy_ref = ctx.model_of(bon.policy_from)
    tokenizer = modeling.load_tokenizer(ctx.recipe.model, path=policy_ref.path, padding_side="left")
    model = loaded.get(bon.policy_from) or _load(ctx, bon.policy_from)
    candidates, _ = sample_candidates(model, tokenizer, prompts, bon, seed=ctx.seed)
    scorer = (
        rm
        if (bon.scorer.reward_from and rm is not None and bon.scorer.reward_from == ctx.cfg.reward_from)
        else build_scorer(bon.scorer, ctx)
    )
    score_candidates(candidates, scorer)
    picked, _ = selection.select_best_candidates(candidates)
    by_prompt = {c["prompt_id"]: c for c in picked}
    first = {c["prompt_id"]: c for c in candidates if c["sample_idx"] == 0}
    chosen = [
        by_prompt.get(p.prompt_id, first[p.prompt_id]) for p in prompts
    ]  # no valid sample: fall back to the first
    texts = [c["response"] for c in chosen]
    metrics = _response_metrics(prompts, texts, [c["n_tokens"] for c in chosen], checks)
    firsts = [first[p.prompt_id] for p in prompts]
    metrics["first_sample"] = _response_metrics(
        prompts, [c["response"] for c in firsts], [c["n_tokens"] for c in firsts], checks
    )
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


def policy_rows(eval_metrics: dict[str, Any], first_samples: bool = True) -> list[list[str]]:
    """One row per evaluated policy (and, for best-of-n, its first sample's figures)."""
    policies = eval_metrics.get("policies", {})
    keys: list[str] = []
    for m in policies.values():
        keys += [k for k, v in m.items() if isinstance(v, (int, float)) and k not in keys and k != "n"]
    rows = [["policy"] + keys]
    for name, m in policies.items():
        rows.append([name] + [f"{m[k]:.3f}" if isinstance(m.get(k), (int, float)) else "-" for k in keys])
        first = m.get("first_sample")
        if first_samples and isinstance(first, dict):
            rows.append(
                [f"  {name} (first sample)"]
                + [f"{first[k]:.3f}" if isinstance(first.get(k), (int, float)) else "" for k in keys]
            )
    return rows


def tables(metrics: dict[str, Any], detailed: bool) -> dict[str, tuple[str, list[list[str]]]]:
    """The held-out table (report, console, trackers; trackers take it without the first-sample rows)."""
    if not isinstance(metrics.get("policies"), dict):
        return {}
    title = f"held-out evaluation ({metrics.get('prompts')} prompts, reference `{metrics.get('reference')}`)"
    return {"policies": (title, policy_rows(metrics, first_samples=detailed))}


def headline(metrics: dict[str, Any], figure) -> list[str]:
    """The trade-off at a glance, opening the report: the frontier plot (``figure(output)`` copies it beside the
    report and gives its file name) and its points as a table."""
    data = metrics.get("frontier")
    plot = figure("frontier") if data else None
    if not plot:
        return []
    rows = [["policy", f"alignment: {data['alignment']}", f"capability: {data['capability']}", "KL to reference"]]
    rows += [
        [p["policy"]]
        + [
            f"{p[k]:.3f}" if isinstance(p.get(k), (int, float)) else "-"
            for k in ("alignment", "capability", "kl_to_ref")
        ]
        for p in data["points"]
    ]
    return [
        "## Alignment trade-off",
        "",
        f"Per policy: alignment (`{data['alignment']}`) against capability kept (`{data['capability']}`) and against "
        f"KL to the reference `{data['reference']}`. Up and to the right on the left panel, up and to the left on the "
        "right one, is better.",
        "",
        f"![alignment trade-off]({plot})",
        "",
        markdown_table(rows),
        "",
    ]


def memory(recipe, name: str, prompt_tokens: int | None = None):
    """plan: greedy decoding of batch_size prompts with the reference policy resident; KL samples score
    batch_size sequences with full logits."""
    from pipeline.plan.memory import generation_setup

    stage = recipe.stage(name)
    return generation_setup(
        recipe,
        name,
        prompt_tokens,
        gen_batch=stage.batch_size,
        gen_prompts=stage.batch_size,
        new_tokens=stage.max_new_tokens,
        sampling=stage.kl_samples > 0,
        kl_estimate=stage.kl_samples > 0,
        scorer=stage.reward_from is not None,
        scorer_batch=stage.batch_size,
        extra_policies=1,
    )


KIND = register(
    StageKind(
        name="eval",
        config=EvalStage,
        run=run,
        memory=memory,
        data_checks=input_files.prompts,
        outputs=("metrics", "responses", "reward_distribution", "frontier"),
        key_metrics=("prompts",),
        plots={"reward_distribution": "{name}: reward per policy"},
        tables=tables,
        headline=headline,
    )
)
