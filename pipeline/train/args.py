"""Our small TrainConfig -> TRL ``*Config`` classes (SFTConfig, RewardConfig, DPOConfig, GRPOConfig...).

The only module where TRL/transformers training-argument names appear: precision flags, batching fields and
the recipe's ``trainer_extra`` (checked against the config class's fields) are all set here.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from pipeline import modeling
from pipeline.config.model import LIGER_REQUIRED, liger_installed
from pipeline.train import batching
from pipeline.util import console
from pipeline.util.errors import RecipeError
from pipeline.util.text import suggest

log = logging.getLogger(__name__)


def precision_flags(precision: str) -> dict[str, bool]:
    if precision == "auto":
        if modeling.has_cuda():
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp16" and not modeling.has_cuda():
        raise RecipeError("train.precision: fp16 needs a CUDA GPU; use fp32 or bf16 on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def kernel_flags(kernels: str, stage: str) -> dict[str, Any]:
    """``model.kernels`` as TRL fields: Liger's layer kernels on a CUDA GPU with liger-kernel installed.
    TRL 1.16's SFT/DPO/GRPO trainers switch Liger's fused linear cross-entropy off themselves (it would replace
    the forward they patch with their chunked LM head). RewardTrainer does not, and Liger (0.8.5) would then set
    the reward model's forward to its causal-LM loss forward (a sequence classifier has no LM head): off here."""
    if kernels == "none":
        return {}
    cuda, installed = modeling.has_cuda(), liger_installed()
    if not (cuda and installed):
        if kernels == "liger":
            raise RecipeError(f"{LIGER_REQUIRED}; use model.kernels: auto (Liger where it can run) or none")
        if cuda:  # auto on a GPU without the package: say it once per stage
            log.info("%s: model.kernels: auto: liger-kernel is not installed, training without it", stage)
        return {}
    return {"use_liger_kernel": True, "liger_kernel_config": {"fused_linear_cross_entropy": False}}


def trl_args(config_cls, ctx, precision: str | None = None, packable: bool = False, **stage_specific: Any):
    """Build a TRL config (SFTConfig, RewardConfig, DPOConfig...) from the stage's ``train`` block.
    ``precision`` overrides ``train.precision`` where a stage needs a particular one; ``packable``: the
    trainer can pack rows (SFT)."""
    train = ctx.cfg.train
    report_to = [r for r in ctx.recipe.tracking.report_to if r != "none"]
    kwargs: dict[str, Any] = dict(
        # keyed by config hash: changed settings never resume another configuration's checkpoint
        output_dir=str(ctx.stage_dir / (f"checkpoints-{ctx.config_hash}" if ctx.config_hash else "checkpoints")),
        run_name=f"{ctx.recipe.name}-{ctx.name}",
        seed=ctx.seed,
        data_seed=ctx.seed,
        learning_rate=train.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size or train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        warmup_steps=train.warmup,  # < 1 is a fraction of training in transformers 5
        lr_scheduler_type=train.lr_scheduler,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optim,
        torch_compile=train.compile,
        logging_steps=train.logging_steps,
        eval_strategy="steps" if train.eval_steps else "no",
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        activation_checkpointing=ctx.recipe.model.gradient_checkpointing,
        use_cpu=not modeling.has_cuda(),
        report_to=report_to or "none",
        disable_tqdm=not (ctx.show_progress and console.verbose()),  # our own progress line otherwise
        dataloader_num_workers=0,
        **precision_flags(precision or train.precision),
    )
    if ctx.recipe.model.gradient_checkpointing:
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    kwargs.update(kernel_flags(ctx.recipe.model.kernels, ctx.name))
    kwargs.update(batching.trainer_args(batching.resolve(train.batching, packable, modeling.has_cuda())))
    kwargs.update(stage_specific)
    kwargs.update(_checked_extra(config_cls, train.trainer_extra, ctx.name))
    return config_cls(**kwargs)


def _checked_extra(config_cls, extra: dict[str, Any], stage: str) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for key in extra:
        if key not in fields:
            raise RecipeError(
                f"stages.{stage}.train.trainer_extra.{key}: not a field of TRL's {config_cls.__name__}{suggest(key, fields)}"
            )
    return dict(extra)
