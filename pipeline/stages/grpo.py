"""GRPO: online RL from any policy stage, rewarded by checkers (verifiable rewards) and/or a reward model.

TRL's ``GRPOTrainer`` samples ``num_generations`` completions per prompt, scores each with every reward, and
moves the policy towards the completions that beat their group's mean, with a KL term (``beta``) to the
frozen starting policy. Rewards are the project's scorers behind one adapter: a checker
``module:function(row, response)`` sees the prompt's source row (e.g. its gold answer), exactly as in
best-of-n, and ``reward_from`` scores with a reward stage's model.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import Sources, StageConfig, Strict, TrainConfig, function_ref
from pipeline.config.registry import POLICY, REWARD_MODEL, StageKind, register
from pipeline.run.context import StageContext
from pipeline.stages import input_files
from pipeline.util.errors import PipelineError


class CheckerReward(Strict):
    checker: str = Field(..., description="module:function(row, response) -> float | bool")
    weight: float = 1.0

    _ref = field_validator("checker")(classmethod(lambda cls, value: function_ref(value)))


class GRPOStage(StageConfig):
    """Online RL (TRL GRPOTrainer) from a policy stage, with checker and/or reward-model rewards."""

    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"policy_from": (POLICY,), "reward_from": (REWARD_MODEL,)}
    FUNCTION_FIELDS: ClassVar[tuple[str, ...]] = ("rewards.*.checker",)

    kind: Literal["grpo"] = "grpo"
    policy_from: str = Field(..., description="The policy stage (sft, dpo, grpo) training starts from.")
    prompts: Sources
    template: Literal["alpaca", "chat"] | None = Field(None, description="Default: the policy stage's template.")
    rewards: dict[str, CheckerReward] = Field({}, description="name -> {checker: module:function, weight}")
    reward_from: str | None = Field(None, description="A reward stage whose model also scores completions.")
    reward_weight: float = Field(1.0, description="Weight of the reward_from model's score.")
    num_generations: int = Field(8, ge=2, description="Completions per prompt (the group).")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    beta: float = Field(0.04, ge=0, description="KL coefficient to the frozen starting policy (0: no reference).")
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _some_reward(self) -> GRPOStage:
        if not self.rewards and not self.reward_from:
            raise ValueError("give at least one reward: rewards: {name: {checker: module:function}} or reward_from")
        return self


def run(ctx: StageContext[GRPOStage]) -> dict[str, Any]:
    from pipeline.stages import keep_checks
    from pipeline.train.fit import fit

    trainer, prompt_count = build_trainer(ctx)
    metrics = fit(trainer, ctx, base=ctx.model_of(ctx.cfg.policy_from).lineage_base())
    metrics.update(reward_metrics(trainer.state.log_history, ctx.cfg), train_prompts=prompt_count)
    return keep_checks.record(metrics, [], ctx.say)


def build_trainer(ctx: StageContext[GRPOStage]):
    from trl import GRPOConfig, GRPOTrainer

    from pipeline import modeling
    from pipeline.data.prompts import stage_prompts
    from pipeline.train.args import trl_args
    from pipeline.train.fit import to_dataset

    cfg, recipe = ctx.cfg, ctx.recipe
    policy = ctx.model_of(cfg.policy_from)
    tokenizer = modeling.load_tokenizer(recipe.model, path=policy.path)
    prompts, _ = stage_prompts(ctx, cfg.policy_from)
    if len(prompts) < cfg.train.batch_size:
        raise PipelineError(
            f"stages.{ctx.name}.prompts: {len(prompts)} prompt(s), fewer than one step's train.batch_size "
            f"({cfg.train.batch_size} prompts); add prompts or lower the batch size"
        )
    funcs, weights = reward_functions(ctx, {p.prompt_id: p.row for p in prompts})
    dataset = to_dataset([{"prompt": p.prompt, "prompt_id": p.prompt_id} for p in prompts])
    args = trl_args(
        GRPOConfig,
        ctx,
        # train.batch_size counts prompts; TRL's counts completions
        per_device_train_batch_size=cfg.train.batch_size * cfg.num_generations,
        num_generations=cfg.num_generations,
        temperature=cfg.temperature,
        max_completion_length=cfg.max_new_tokens,
        beta=cfg.beta,
        reward_weights=weights,
        log_completions=False,
        train_sampling_strategy="random",  # GRPO samples prompt groups with its own sampler: no length grouping
    )
    model = modeling.load_policy(recipe.model, recipe.lora, init=policy)
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=dataset, processing_class=tokenizer)
    return trainer, len(prompts)


def reward_functions(ctx: StageContext[GRPOStage], rows: dict[str, dict]):
    """(reward functions as TRL calls them, their weights): every checker, then the reward model if any."""
    from pipeline.rollout.scoring import CheckerScorer, load_function, reward_scorer

    cfg = ctx.cfg
    scorers, weights = [], []
    for name, spec in cfg.rewards.items():
        scorers.append(CheckerScorer(load_function(spec.checker, f"stages.{ctx.name}.rewards.{name}.checker"), name))
        weights.append(spec.weight)
    if cfg.reward_from:
        scorer = reward_scorer(ctx, cfg.reward_from)
        scorer.name = "reward_model"
        scorers.append(scorer)
        weights.append(cfg.reward_weight)
    return [as_reward_function(s, rows, ctx.name) for s in scorers], weights


def as_reward_function(scorer, rows: dict[str, dict], stage: str):
    """A scorer as TRL's reward function: ``f(prompts, completions, prompt_id=[...], **columns) -> floats``."""

    def reward(prompts, completions, prompt_id, **_):
        items = [
            {"prompt": p, "response": _text(c), "row": rows[i]} for p, c, i in zip(prompts, completions, prompt_id)
        ]
        try:
            scores = scorer.score(items)
        except PipelineError as exc:
            raise PipelineError(f"stages.{stage}: reward {scorer.name!r}: {exc}") from None
        except Exception as exc:
            raise PipelineError(f"stages.{stage}: reward {scorer.name!r} raised {type(exc).__name__}: {exc}") from exc
        bad = [s for s in scores if not isinstance(s, (int, float)) or math.isnan(s)]
        if bad:
            raise PipelineError(f"stages.{stage}: reward {scorer.name!r} returned {bad[0]!r}; rewards must be numbers")
        return [float(s) for s in scores]

    reward.__name__ = scorer.name
    return reward


def _text(completion) -> str:
    """TRL hands conversational completions as message lists."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return completion


# TRL's logged GRPO metrics -> ours (the last logged value of each)
LOGGED = {"reward": "reward_mean", "kl": "kl", "completions/mean_length": "completion_length_mean"}


def reward_metrics(history: list[dict], cfg: GRPOStage) -> dict[str, Any]:
    """Per reward function: its mean over the first and the last logged steps; KL and completion length."""
    logs = [h for h in history if "reward" in h]
    if not logs:
        return {}
    out: dict[str, Any] = {ours: logs[-1][theirs] for theirs, ours in LOGGED.items() if theirs in logs[-1]}
    names = [*cfg.rewards, *(["reward_model"] if cfg.reward_from else [])]
    for name in names:
        key = f"rewards/{name}/mean"
        series = [h[key] for h in logs if key in h]
        if series:
            out[f"reward_{name}_first"], out[f"reward_{name}_last"] = series[0], series[-1]
    out["reward_mean_first"] = logs[0]["reward"]
    return out


def memory(recipe, name: str, prompt_tokens: int | None = None):
    """plan: batch_size prompts x num_generations completions of prompt + max_new_tokens tokens, and the frozen
    reference when beta > 0."""
    from pipeline.plan.memory import DEFAULT_PROMPT_TOKENS, training_setup

    stage = recipe.stage(name)
    return training_setup(
        recipe,
        name,
        group=stage.num_generations,
        length=(prompt_tokens or DEFAULT_PROMPT_TOKENS) + stage.max_new_tokens,
        reference=stage.beta > 0,
        reference_label="no reference (beta 0)",
    )


KIND = register(
    StageKind(
        name="grpo",
        config=GRPOStage,
        run=run,
        memory=memory,
        data_checks=input_files.prompts,
        outputs=("model",),
        key_metrics=("reward_mean_first", "reward_mean", "kl", "steps"),
        model_head="causal_lm",
    )
)
