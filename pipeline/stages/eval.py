"""Evaluation of every policy on held-out prompts, written to ``eval/metrics.json``.

Per policy (greedy decoding for trained policies): the checkers' pass rates (e.g. preference_pass: the
alignment gained; gold_accuracy: the capability kept -- the alignment tax), the reward model's mean
score, the win rate against the reference policy judged by the reward model, the KL to the reference
estimated from samples, and the mean response length. Best-of-n is evaluated as a selection policy:
n samples from its policy, its scorer picks one; the first sample's figures are reported beside it.
With ``harness``, lm-evaluation-harness tasks score every policy too (pipeline.stages.harness); ``examples``
puts a few prompts with every policy's response side by side in the report (pipeline.stages.eval_examples).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import Sources, StageConfig, function_refs
from pipeline.config.registry import POLICY, REWARD_MODEL, StageKind, register
from pipeline.data.prompts import stage_prompts
from pipeline.observe import plots
from pipeline.rollout import selection
from pipeline.run.context import StageContext
from pipeline.stages import eval_examples, harness, input_files
from pipeline.stages.harness import HarnessConfig
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
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("harness.include_path",)

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
        None,
        description="A checker name (capability kept, e.g. gold_accuracy) or a harness metric "
        "(harness/<task>/<metric>, e.g. harness/hellaswag/acc_norm); default: the second checker.",
    )
    harness: HarnessConfig | None = Field(
        None,
        description="lm-evaluation-harness tasks run on every policy (the [eval] extra); scores as "
        "harness/<task>/<metric>.",
        # left out of dumps when absent: the stage hashes of runs finished before the key existed stay cached
        exclude_if=lambda value: value is None,
    )
    examples: int = Field(
        4,
        ge=0,
        description="Held-out prompts shown in the report with every policy's response, checker results and reward "
        "side by side: half where the policies disagree most, half a seeded random choice. 0: none.",
        exclude_if=lambda value: value == 4,  # the default stays out of stage hashes, as harness's
    )

    _refs = field_validator("checkers")(classmethod(lambda cls, value: function_refs(value)))

    @model_validator(mode="after")
    def _frontier_metrics(self) -> EvalStage:
        known = [*self.checkers, *(["reward_mean"] if self.reward_from else [])]
        for key in ("alignment_metric", "capability_metric"):
            value = getattr(self, key)
            if value is None or value in known:
                continue
            if self.harness is not None and value.startswith(harness.PREFIX):
                problem = harness.metric_name_problem(value, self.harness)
                if problem:
                    raise ValueError(f"{key}: {problem}")
                continue
            options = ", ".join(known) or "(no checkers or reward_from)"
            also = " or harness/<task>/<metric>" if self.harness else " (or a harness metric, with harness: set)"
            raise ValueError(f"{key}: {value!r} is not measured here; one of: {options}{also}")
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
    bench = _harness(ctx) if cfg.harness else None  # the tasks are indexed before any policy runs

    results, rewards, rows = _evaluate_policies(ctx, prompts, prompt_ids, checks, rm, tokenizer, reference, bench)
    if rm is not None:
        base = rewards[cfg.reference]
        for name, scores in rewards.items():
            wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, base)]
            results[name][f"win_rate_vs_{cfg.reference}"] = round(statistics.fmean(wins), 4)

    report: dict[str, Any] = {"prompts": prompt_stats["prompts"], "reference": cfg.reference, "policies": results}
    if bench is not None:
        report["harness"] = bench.info
    report["frontier"] = frontier(cfg, results)
    if cfg.examples:
        report["examples"] = eval_examples.pick(prompts, rows, cfg.examples, ctx.seed)
    said = _missing_axes(report["frontier"], results)
    if said:
        report["warnings"] = said
    _write_outputs(ctx, report, rows, rewards)
    ctx.say(text_table(policy_rows(report, first_samples=False)))
    if bench is not None:
        scores_title, scores = harness_table(report)
        ctx.say(f"{scores_title}:\n{text_table(scores)}")
    return report  # the stage's metrics.json is this report (the runner rewrites it from what a stage returns)


@dataclass
class Responses:
    """One policy's responses to the held-out prompts, each checker's verdict on each, and reward-model scores."""

    texts: list[str]
    checks: list[dict[str, bool]]
    rewards: list[float] | None = None

    def rows(self, policy: str, prompts) -> list[dict[str, Any]]:
        """responses.jsonl rows: policy, prompt_id, response, checks (with checkers), reward (with a reward model)."""
        return [
            {"policy": policy, "prompt_id": p.prompt_id, "response": text}
            | ({"checks": self.checks[i]} if self.checks[i] else {})
            | ({"reward": self.rewards[i]} if self.rewards is not None else {})
            for i, (p, text) in enumerate(zip(prompts, self.texts))
        ]


def _evaluate_policies(ctx: StageContext[EvalStage], prompts, prompt_ids, checks, rm, tokenizer, reference, bench):
    """(metrics by policy, reward-model scores by policy, responses.jsonl rows): every policy, then best-of-n."""
    cfg = ctx.cfg
    results: dict[str, dict[str, Any]] = {}
    rewards: dict[str, list[float]] = {}
    rows: list[dict[str, Any]] = []
    names = [cfg.reference] + [n for n in cfg.policies if n != cfg.reference]
    bar = stage_progress(ctx, "evaluating", len(names) + bool(cfg.bon_from), "policies")
    for name in names:
        bar.update(bar.done, name)
        model = reference if name == cfg.reference else _load(ctx, name)
        results[name], responses = _greedy(ctx, model, reference, tokenizer, prompts, prompt_ids, checks, rm)
        if bench is not None:
            bar.update(bar.done, f"{name}: lm-eval tasks")
            scores, stderr = bench.scores(name, model)
            results[name].update(scores, **({"harness_stderr": stderr} if stderr else {}))
        if responses.rewards is not None:
            rewards[name] = responses.rewards
        rows.extend(responses.rows(name, prompts))
        if model is not reference:
            del model
        bar.advance()

    if cfg.bon_from:
        bar.update(bar.done, "bon")
        results["bon"], responses = _best_of_n(ctx, prompts, checks, rm, loaded={cfg.reference: reference})
        if responses.rewards is not None:
            rewards["bon"] = responses.rewards
        rows.extend(responses.rows("bon", prompts))
        bar.advance()
    bar.close("done")
    return results, rewards, rows


def _harness(ctx: StageContext[EvalStage]) -> harness.Harness:
    """The stage's lm-eval tasks, with a tokenizer of their own (lm_eval sets its padding side and pad token)."""
    from pipeline import modeling

    tokenizer = modeling.load_tokenizer(ctx.recipe.model, path=ctx.model_of(ctx.cfg.reference).path)
    return harness.Harness(ctx.recipe, ctx.name, ctx.cfg.harness, tokenizer)


def _missing_axes(data: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[str]:
    """A frontier axis naming a harness metric no policy has (a metric the task does not report)."""
    said = []
    for axis in ("alignment", "capability"):
        wanted = data.get(axis)
        if wanted and wanted.startswith(harness.PREFIX) and not any(wanted in m for m in results.values()):
            found = sorted({k for m in results.values() for k in m if k.startswith(harness.PREFIX)})
            said.append(f"{axis} axis {wanted!r}: no policy has it; the harness reported: {', '.join(found) or 'none'}")
    return said


def _greedy(ctx: StageContext[EvalStage], model, reference, tokenizer, prompts, prompt_ids, checks, rm):
    """(metrics, Responses) of one policy's greedy responses."""
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
    responses = Responses(texts, _checked(prompts, texts, checks))
    metrics = _response_metrics(responses.checks, [len(s.token_ids) for s in samples], checks)
    if rm is not None:
        responses.rewards = rm.score([{"prompt": p.prompt, "response": t} for p, t in zip(prompts, texts)])
        metrics["reward_mean"] = round(statistics.fmean(responses.rewards), 4)
    if model is reference:
        metrics["kl_to_ref"] = 0.0
    elif cfg.kl_samples:
        metrics["kl_to_ref"] = _kl_estimate(model, reference, tokenizer, prompts, prompt_ids, cfg, seed=ctx.seed)
    return metrics, responses


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


def _checked(prompts, texts: list[str], checks: dict) -> list[dict[str, bool]]:
    """Each checker's verdict on each response."""
    return [{name: bool(check(p.row, t)) for name, check in checks.items()} for p, t in zip(prompts, texts)]


def _response_metrics(checked: list[dict[str, bool]], lengths: list[int], checks: dict) -> dict[str, Any]:
    metrics = {name: round(statistics.fmean(c[name] for c in checked), 4) for name in checks}
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
    responses = Responses(texts, _checked(prompts, texts, checks))
    metrics = _response_metrics(responses.checks, [c["n_tokens"] for c in chosen], checks)
    firsts = [first[p.prompt_id] for p in prompts]
    first_texts = [c["response"] for c in firsts]
    metrics["first_sample"] = _response_metrics(
        _checked(prompts, first_texts, checks), [c["n_tokens"] for c in firsts], checks
    )
    metrics["n"] = bon.n
    # Best-of-n's KL to its sampling policy is known in closed form: log n - (n - 1) / n.
    metrics["kl_to_ref"] = round(math.log(bon.n) - (bon.n - 1) / bon.n, 4)
    if rm is not None:
        responses.rewards = rm.score([{"prompt": p.prompt, "response": t} for p, t in zip(prompts, texts)])
        metrics["reward_mean"] = round(statistics.fmean(responses.rewards), 4)
        first_rewards = rm.score([{"prompt": p.prompt, "response": t} for p, t in zip(prompts, first_texts)])
        metrics["first_sample"]["reward_mean"] = round(statistics.fmean(first_rewards), 4)
    return metrics, responses


def policy_rows(eval_metrics: dict[str, Any], first_samples: bool = True) -> list[list[str]]:
    """One row per evaluated policy (and, for best-of-n, its first sample's figures)."""
    policies = eval_metrics.get("policies", {})
    keys: list[str] = []
    for m in policies.values():  # harness scores are not on these prompts: their own table (harness_table)
        keys += [
            k
            for k, v in m.items()
            if isinstance(v, (int, float)) and k not in keys and k != "n" and not k.startswith(harness.PREFIX)
        ]
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
    found = {"policies": (title, policy_rows(metrics, first_samples=detailed))}
    if isinstance(metrics.get("harness"), dict):
        found["harness"] = harness_table(metrics)
    return found


def harness_table(metrics: dict[str, Any]) -> tuple[str, list[list[str]]]:
    """(title, rows) of the lm-eval scores: a row per policy, a column per task metric, '± standard error'."""
    policies = {name: m for name, m in metrics["policies"].items() if any(k.startswith(harness.PREFIX) for k in m)}
    keys = list(dict.fromkeys(k for m in policies.values() for k in m if k.startswith(harness.PREFIX)))
    rows = [["policy"] + [k.removeprefix(harness.PREFIX) for k in keys]]
    for name, m in policies.items():
        stderr = m.get("harness_stderr") or {}
        cells = []
        for key in keys:
            value, error = m.get(key), stderr.get(key.removeprefix(harness.PREFIX))
            cells.append("-" if value is None else f"{value:.3f}" + (f" ± {error:.3f}" if error is not None else ""))
        rows.append([name] + cells)
    info = metrics["harness"]
    shots, samples = info.get("num_fewshot") or {}, info.get("samples") or {}
    tasks = "; ".join(
        f"{task}: {samples.get(task, '?')} examples, {shots.get(task, '?')}-shot" for task in samples or info["tasks"]
    )
    version = f" {info['lm_eval']}" if info.get("lm_eval") else ""
    return f"benchmark scores (lm-evaluation-harness{version}; {tasks})", rows


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


def data_checks(recipe, name: str) -> list:
    """validate: the held-out prompts read as the stage will, the harness folder and task names."""
    return [*input_files.prompts(recipe, name), *harness.checks(recipe, name)]


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
        data_checks=data_checks,
        outputs=("metrics", "responses", "reward_distribution", "frontier"),
        key_metrics=("prompts",),
        plots={"reward_distribution": "{name}: reward per policy"},
        tables=tables,
        headline=headline,
    )
)
