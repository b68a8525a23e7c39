"""Reward model: preference pairs -> TRL's RewardTrainer on a one-output sequence classifier.

Then a held-out evaluation (pairwise accuracy, margin, length bias) and the quality gate: below
``min_accuracy`` the stage fails with the reason, so no downstream stage trusts a weak reward model.
"""

from __future__ import annotations

import statistics
from functools import partial
from typing import Any, ClassVar, Literal

from pydantic import Field

from pipeline import compat
from pipeline.config import PairsStageConfig, TrainConfig
from pipeline.config.registry import POLICY, StageKind, register
from pipeline.data.preference.prepare import prepare_pairs, summary_line
from pipeline.observe import plots
from pipeline.run.context import StageContext
from pipeline.stages import input_files, keep_checks
from pipeline.util.errors import GateFailed
from pipeline.util.files import write_json_atomic


class RewardStage(PairsStageConfig):
    """A reward model: a sequence classifier with one output, trained on preference pairs (TRL RewardTrainer)."""

    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"base_from": (POLICY,), **PairsStageConfig.PAIR_SOURCES}

    kind: Literal["reward"] = "reward"
    base_from: str | None = Field(
        None, description="Start from an sft stage's model (default: the recipe's base model)."
    )
    train: TrainConfig = TrainConfig()
    min_accuracy: float | None = Field(None, ge=0, le=1, description="Quality gate on held-out pairwise accuracy.")


def run(ctx: StageContext[RewardStage]) -> dict[str, Any]:
    from pipeline.train.fit import fit

    trainer, tokenizer, held, base, summary = build_trainer(ctx)
    metrics = fit(trainer, ctx, base=base)
    if held:
        from pipeline.rollout.scoring import RewardModelScorer

        scorer = RewardModelScorer(trainer.model, tokenizer, "reward model", max_length=ctx.cfg.data.max_length)
        metrics.update(evaluate_pairs(scorer, tokenizer, held, ctx))
    keep_checks.record(metrics, keep_checks.pair_warnings(ctx.name, summary), ctx.say)
    check_gate(ctx.cfg.min_accuracy, metrics)
    return metrics


def build_trainer(ctx: StageContext[RewardStage]):
    """(RewardTrainer, tokenizer, held-out pairs, the base a new adapter belongs to, data summary)."""
    from trl import RewardConfig, RewardTrainer

    from pipeline import modeling
    from pipeline.train.args import trl_args
    from pipeline.train.batching import length_grouped
    from pipeline.train.fit import to_dataset

    cfg, recipe = ctx.cfg, ctx.recipe
    init = ctx.model_of(cfg.base_from)
    tokenizer = modeling.load_tokenizer(recipe.model, path=init.path if init else None)
    keep_checks.check_upstream_output(ctx, cfg.data.train, "preference pairs", "pairs")
    train, held, summary = prepare_pairs(
        ctx.resolve_source(cfg.data.train, "pairs"),
        ctx.resolve_source(cfg.data.eval, "pairs"),
        cfg.data,
        count_tokens=partial(modeling.token_length, tokenizer),
        seed=ctx.seed,
    )
    if ctx.is_main:
        write_json_atomic(ctx.stage_dir / "data_summary.json", summary)
        ctx.say(summary_line(ctx.name, summary))
    keep_checks.check_training_rows(
        ctx, cfg.data.train, len(train), "preference pairs", "pairs"
    )  # before the model loads
    quantized = recipe.model.quantization != "none"
    args = trl_args(
        RewardConfig,
        ctx,
        max_length=cfg.data.max_length,
        precision=compat.KBIT_REWARD_PRECISION if quantized else None,
    )
    model, base = modeling.load_reward_model(recipe.model, recipe.lora, init=init, work_dir=ctx.stage_dir)
    trainer = length_grouped(RewardTrainer)(
        model=model,
        args=args,
        train_dataset=to_dataset(train),
        eval_dataset=to_dataset(held),
        processing_class=tokenizer,
    )
    return trainer, tokenizer, held, base, summary


def check_gate(min_accuracy: float | None, metrics: dict[str, Any]) -> None:
    """The quality gate: below ``min_accuracy`` the stage fails, so no downstream stage trusts the model."""
    if min_accuracy is None:
        return
    accuracy = metrics.get("heldout_accuracy")
    if accuracy is None:
        raise GateFailed(
            "min_accuracy is set but there are no held-out pairs to measure it; set data.eval or data.eval_fraction",
            metrics,
        )
    if accuracy < min_accuracy:
        raise GateFailed(
            f"quality gate: held-out pairwise accuracy {accuracy:.3f} is below min_accuracy {min_accuracy} "
            f"({metrics['heldout_pairs']} pairs); downstream stages would trust a weak reward model. "
            "Check the pairs (data_summary.json), train longer, or lower min_accuracy deliberately.",
            metrics,
        )


def evaluate_pairs(scorer, tokenizer, pairs: list[dict], ctx: StageContext[RewardStage]) -> dict[str, Any]:
    """Held-out pairwise accuracy, margin, and length bias; writes rewards.jsonl-style stats and a histogram."""

    def text(side: Any) -> str:
        return side if isinstance(side, str) else " ".join(m["content"] for m in side)

    chosen = scorer.score([{"prompt": p["prompt"], "response": text(p["chosen"])} for p in pairs])
    rejected = scorer.score([{"prompt": p["prompt"], "response": text(p["rejected"])} for p in pairs])
    from pipeline.modeling import token_length

    lengths_c = [token_length(tokenizer, text(p["chosen"])) for p in pairs]
    lengths_r = [token_length(tokenizer, text(p["rejected"])) for p in pairs]
    wins = [c > r for c, r in zip(chosen, rejected)]

    def accuracy(mask: list[bool]) -> float | None:
        picked = [w for w, m in zip(wins, mask) if m]
        return round(sum(picked) / len(picked), 4) if picked else None

    metrics = {
        "heldout_pairs": len(pairs),
        "heldout_accuracy": round(sum(wins) / len(wins), 4),
        "heldout_margin_mean": round(statistics.fmean(c - r for c, r in zip(chosen, rejected)), 4),
        "heldout_reward_chosen_mean": round(statistics.fmean(chosen), 4),
        "heldout_reward_rejected_mean": round(statistics.fmean(rejected), 4),
        # length bias: a reward that tracks length, or accuracy that depends on which side is longer
        "reward_length_correlation": _correlation(chosen + rejected, lengths_c + lengths_r),
        "accuracy_chosen_longer": accuracy([lc > lr for lc, lr in zip(lengths_c, lengths_r)]),
        "accuracy_chosen_shorter": accuracy([lc < lr for lc, lr in zip(lengths_c, lengths_r)]),
        "chosen_longer_fraction": round(sum(lc > lr for lc, lr in zip(lengths_c, lengths_r)) / len(pairs), 4),
    }
    if ctx.is_main:
        path = plots.histogram(
            ctx.stage_dir / "reward_histogram.png",
            {"chosen": chosen, "rejected": rejected},
            f"{ctx.name}: held-out rewards (accuracy {metrics['heldout_accuracy']:.3f})",
            "reward",
        )
        ctx.outputs["reward_histogram"] = str(path)
    return metrics


def _correlation(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or len(set(ys)) < 2 or len(set(xs)) < 2:
        return None
    return round(statistics.correlation(xs, ys), 4)


def memory(recipe, name: str, prompt_tokens: int | None = None):
    """plan: the chosen and rejected response of batch_size pairs, through the one-output reward head."""
    from pipeline.plan.memory import training_setup

    return training_setup(recipe, name, pairs=True)


KIND = register(
    StageKind(
        name="reward",
        config=RewardStage,
        run=run,
        memory=memory,
        data_checks=input_files.pairs,
        outputs=("model", "reward_histogram"),
        key_metrics=("heldout_accuracy", "heldout_margin_mean", "reward_length_correlation", "steps"),
        model_head="reward",
        plots={"reward_histogram": "{name}: chosen vs rejected rewards"},
    )
)
