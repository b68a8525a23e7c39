"""DPO: preference pairs -> TRL's DPOTrainer, against the SFT policy frozen as the reference.

Which reference each SFT output gets is decided in one place, ``modeling.load_dpo_models`` (a table in
its docstring); the stage records the case in its metrics as ``reference``. With
``precompute_ref_log_probs`` the pairs are stored as Arrow files under ``<stage_dir>/ref_cache`` so that
TRL's on-disk cache of reference log-probs lands there and a rerun on the same data and reference reuses
it (``ref_logp_batches_computed`` is 0 then).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipeline import compat
from pipeline.config import PairsStageConfig, TrainConfig
from pipeline.config.registry import POLICY, StageKind, register
from pipeline.data.preference.prepare import prepare_pairs, summary_line
from pipeline.run.context import StageContext
from pipeline.stages import input_files, keep_checks
from pipeline.stages.keep_checks import pair_warnings
from pipeline.util.errors import PipelineError, RecipeError
from pipeline.util.files import write_json_atomic
from pipeline.util.text import suggest

log = logging.getLogger(__name__)


class DPOStage(PairsStageConfig):
    """DPO against a frozen reference (TRL DPOTrainer): by default the policy_from model, as it starts."""

    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "policy_from": (POLICY,),
        "reference_from": (POLICY,),
        **PairsStageConfig.PAIR_SOURCES,
    }

    kind: Literal["dpo"] = "dpo"
    policy_from: str = Field(..., description="The policy stage (sft, dpo, ...) whose model training starts from.")
    reference_from: str | None = Field(
        None,
        description="The policy stage whose model is the frozen reference (default: policy_from). Iterative DPO "
        "often keeps the SFT model as every round's reference.",
    )
    beta: float = Field(0.1, gt=0)
    loss_type: str | list[str] = Field("sigmoid", description="Any TRL DPO loss, or a list combined with loss_weights.")
    loss_weights: list[float] | None = None
    precompute_ref_log_probs: bool = False
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _weights_match(self) -> DPOStage:
        losses = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} values for {len(losses)} loss type(s)")
        return self


# TRL's logged DPO metrics -> our names (eval_* of the final held-out evaluation, and the last training log)
HELDOUT = {
    "eval_rewards/accuracies": "heldout_reward_accuracy",
    "eval_rewards/margins": "heldout_reward_margin",
    "eval_rewards/chosen": "heldout_reward_chosen",
    "eval_rewards/rejected": "heldout_reward_rejected",
    "eval_logps/chosen": "heldout_logps_chosen",
    "eval_logps/rejected": "heldout_logps_rejected",
}
TRAIN = {
    "rewards/accuracies": "train_reward_accuracy",
    "rewards/margins": "train_reward_margin",
    "rewards/chosen": "train_reward_chosen",
    "rewards/rejected": "train_reward_rejected",
    "logps/chosen": "train_logps_chosen",
    "logps/rejected": "train_logps_rejected",
}


def run(ctx: StageContext[DPOStage]) -> dict[str, Any]:
    from pipeline.train.fit import fit

    trainer, summary, setup = build_trainer(ctx)
    metrics = fit(trainer, ctx, base=ctx.model_of(ctx.cfg.policy_from).lineage_base())
    history = trainer.state.log_history
    metrics.update(heldout_metrics(history))
    metrics.update(train_metrics(history))
    metrics.update(
        reference=setup.reference,
        reference_stage=ctx.cfg.reference_from or ctx.cfg.policy_from,
        ref_log_probs="precomputed" if ctx.cfg.precompute_ref_log_probs else "every step",
        ref_logp_batches_computed=trainer.ref_logp_batches,
        train_pairs=summary["train"]["kept"],
        eval_pairs=summary["eval"]["kept"] if summary.get("eval") else 0,
    )
    keep_checks.record(metrics, pair_warnings(ctx.name, summary), ctx.say)
    if ctx.is_main:
        series = margins_series(history)
        write_json_atomic(ctx.stage_dir / "margins.json", series)
        ctx.outputs["margins_plot"] = str(margins_plot(ctx.stage_dir / "margins.png", ctx.name, series))
    return metrics


def margins_plot(path, name: str, series: dict[str, list[dict]]):
    from pipeline.observe import plots

    lines = {
        label: ([p["step"] for p in points], [p["margin"] for p in points])
        for label, points in (("train", series["train"]), ("held-out", series["heldout"]))
        if points
    }
    return plots.lines(path, lines, f"{name}: reward margins over training", "step", "chosen - rejected reward")


def build_trainer(ctx: StageContext[DPOStage]):
    """(DPOTrainer, data summary, modeling.DPOModels) for the stage ``ctx``."""
    from trl import DPOConfig

    from pipeline import modeling
    from pipeline.train.args import trl_args
    from pipeline.train.batching import length_grouped

    cfg, recipe = ctx.cfg, ctx.recipe
    losses = check_losses(cfg, ctx.name)
    policy = ctx.model_of(cfg.policy_from)
    tokenizer = modeling.load_tokenizer(recipe.model, path=policy.path)
    train_ds, eval_ds, summary = prepare_data(ctx, tokenizer)
    # Args before the model: under DeepSpeed ZeRO-3 they make from_pretrained load sharded (zero3_init).
    try:
        args = trl_args(
            DPOConfig,
            ctx,
            beta=cfg.beta,
            loss_type=losses,
            loss_weights=cfg.loss_weights,
            precompute_ref_log_probs=cfg.precompute_ref_log_probs,
            max_length=cfg.data.max_length,
        )
    except ValueError as exc:
        raise RecipeError(f"stages.{ctx.name}: TRL's DPOConfig refuses these settings: {exc}") from None
    reference = ctx.model_of(cfg.reference_from) if cfg.reference_from not in (None, cfg.policy_from) else None
    setup = modeling.load_dpo_models(
        recipe.model, recipe.lora, policy, precompute=cfg.precompute_ref_log_probs, reference=reference
    )
    trainer = length_grouped(compat.dpo_trainer_class())(
        model=setup.model,
        ref_model=setup.ref_model,
        peft_config=setup.peft_config,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )
    if setup.reference == "frozen sft adapter" and not compat.has_frozen_ref_adapter(trainer.model):
        # TRL falls back to the adapter-disabled base for some PEFT versions: that is not the SFT policy.
        raise PipelineError(
            "TRL did not copy the SFT adapter into a frozen 'ref' adapter, so the DPO reference would be the bare "
            "base model; check the installed trl/peft versions"
        )
    # Every 4-bit layer was patched at load; TRL builds no new ones. Anything patched here existed unpatched
    # through TRL's no-grad forwards (precompute) and may have lost its gradients: say so.
    late = compat.fix_cpu_4bit(trainer.model) + (
        compat.fix_cpu_4bit(trainer.ref_model) if trainer.ref_model is not None else 0
    )
    if late:
        log.warning("%d 4-bit layer(s) were unpatched after DPOTrainer was built (CPU repack trap)", late)
    return trainer, summary, setup


def check_losses(cfg: DPOStage, stage: str) -> list[str]:
    """The loss types as TRL's list; unknown names fail here, not at the first training step."""
    losses = [cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type)
    if not losses:
        raise RecipeError(f"stages.{stage}.loss_type: give at least one loss type, e.g. sigmoid")
    known = compat.dpo_loss_names()
    unknown = [name for name in losses if known and name not in known]
    if unknown:
        hints = [f"{name!r}{suggest(name, known)}" for name in unknown]
        raise RecipeError(
            f"stages.{stage}.loss_type: unknown DPO loss {', '.join(hints)}; TRL's DPO losses: {', '.join(known)}"
        )
    return losses


def prepare_data(ctx: StageContext[DPOStage], tokenizer):
    """Read, lint and split the pairs; save the summary; TRL-shaped datasets for train and eval."""
    from pipeline import modeling
    from pipeline.train.fit import to_dataset

    data = ctx.cfg.data
    keep_checks.check_upstream_output(ctx, data.train, "preference pairs", "pairs")
    train_records, eval_records, summary = prepare_pairs(
        ctx.resolve_source(data.train, "pairs"),
        ctx.resolve_source(data.eval, "pairs"),
        data,
        count_tokens=partial(modeling.token_length, tokenizer),
        seed=ctx.seed,
    )
    train_records, eval_records = (as_sampling_renders(tokenizer, r) for r in (train_records, eval_records))
    summary["max_length"] = data.max_length
    if ctx.is_main:
        write_json_atomic(ctx.stage_dir / "data_summary.json", summary)
        ctx.say(summary_line(ctx.name, summary))
    keep_checks.check_training_rows(
        ctx, data.train, len(train_records), "preference pairs", "pairs"
    )  # before the model loads
    if ctx.cfg.precompute_ref_log_probs:  # on disk, where TRL's reference log-prob cache can find it again

        def to_ds(records):
            return (
                compat.file_backed_dataset(records, ctx.stage_dir / "ref_cache", ctx.is_main, ctx.wait)
                if records
                else None
            )
    else:
        to_ds = to_dataset
    return to_ds(train_records), to_ds(eval_records), summary


def as_sampling_renders(tokenizer, records: list[dict]) -> list[dict]:
    """Conversational pairs of a template whose generation prompt opens a think block (DeepSeek-R1 distills) as
    text: the prompt as sampling renders it, each reply closing the block (pipeline.modeling.chat.sampling_texts).
    DPO's log-probs are then those of the replies in the context the policy samples them in."""
    from pipeline.modeling.chat import sampling_texts

    out = []
    for r in records:
        chosen = sampling_texts(tokenizer, r["prompt"], r["chosen"]) if isinstance(r["prompt"], list) else None
        rejected = sampling_texts(tokenizer, r["prompt"], r["rejected"]) if chosen else None
        out.append({**r, "prompt": chosen[0], "chosen": chosen[1], "rejected": rejected[1]} if chosen else r)
    return out


def heldout_metrics(history: list[dict]) -> dict[str, Any]:
    """The final held-out evaluation's DPO metrics (the last eval log), under our names."""
    evals = [h for h in history if "eval_rewards/accuracies" in h]
    if not evals:
        return {}
    last = evals[-1]
    return {ours: last[theirs] for theirs, ours in HELDOUT.items() if theirs in last}


def train_metrics(history: list[dict]) -> dict[str, Any]:
    """Each training metric's last logged value."""
    out: dict[str, Any] = {}
    for entry in history:
        for theirs, ours in TRAIN.items():
            if theirs in entry:
                out[ours] = entry[theirs]
    return out


def margins_series(history: list[dict]) -> dict[str, list[dict]]:
    """Reward margin and accuracy per logging step (train) and per evaluation (held-out)."""
    train = [
        {"step": h["step"], "margin": h["rewards/margins"], "accuracy": h.get("rewards/accuracies")}
        for h in history
        if "rewards/margins" in h
    ]
    heldout = [
        {"step": h["step"], "margin": h["eval_rewards/margins"], "accuracy": h.get("eval_rewards/accuracies")}
        for h in history
        if "eval_rewards/margins" in h
    ]
    return {"train": train, "heldout": heldout}


def memory(recipe, name: str, prompt_tokens: int | None = None):
    """plan: chosen + rejected of batch_size pairs, and the frozen reference unless its log-probs are
    precomputed."""
    from pipeline.plan.memory import training_setup

    stage = recipe.stage(name)
    return training_setup(
        recipe,
        name,
        pairs=True,
        reference=not stage.precompute_ref_log_probs,
        reference_label="precomputed reference",
        precompute_change="precompute_ref_log_probs",
    )


KIND = register(
    StageKind(
        name="dpo",
        config=DPOStage,
        run=run,
        memory=memory,
        data_checks=input_files.pairs,
        outputs=("model", "margins_plot"),
        key_metrics=("heldout_reward_accuracy", "heldout_reward_margin", "eval_loss", "steps"),
        model_head="causal_lm",
        plots={"margins_plot": "{name}: DPO reward margins"},
    )
)
