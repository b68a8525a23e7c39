"""Our small TrainConfig -> TRL ``*Config`` classes, and one fit() shared by the training stages.

The only module where TRL/transformers training-argument names appear.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import TrainOutput

from pipeline import compat, modeling
from pipeline.train import batching, checkpoints
from pipeline.util import console
from pipeline.util.errors import RecipeError
from pipeline.util.files import write_json_atomic
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


def to_dataset(records: list[dict[str, Any]]):
    """Rows as an in-memory ``datasets.Dataset`` for a trainer; None when there are none."""
    import datasets

    return datasets.Dataset.from_list(records) if records else None


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


def fit(trainer, ctx, base: str | None = None) -> dict[str, Any]:
    """Train with resume from the last checkpoint, evaluate before and after, save the final model.

    Returns the metrics; the model is written to ``<stage_dir>/model`` (adapter or full weights).
    ``base``: what an adapter is applied to (default: the recipe's model; a stage that put a new
    adapter on an earlier stage's full model passes that model's path).
    """
    ckpt_dir = Path(trainer.args.output_dir)
    last = resume_point(ctx, ckpt_dir)
    metrics: dict[str, Any] = {}
    initial_eval = ckpt_dir / "initial_eval.json"
    has_eval = trainer.eval_dataset is not None
    # The before-training eval runs inside train() (eval_on_start): under DeepSpeed ZeRO-1/2 an
    # evaluate() before train() fails ("ZeRO inference only makes sense with ZeRO Stage 3").
    eval_on_start = has_eval and not (last and initial_eval.is_file())
    compat.set_eval_on_start(trainer, eval_on_start)
    if eval_on_start:
        trainer.add_callback(KeepInitialEval(initial_eval, ctx.is_main))
    counter = batching.TokenCounter(trainer.model)
    show_progress(trainer, ctx)
    if last:
        log.info("resuming %s from %s", ctx.name, last)
        metrics["resumed_from"] = Path(last).name
    finished = _finished_state(last) if last and not trainer.is_deepspeed_enabled else None
    if finished is not None:
        # killed after the last checkpoint but before the stage was marked done: resuming would train
        # a step past max_steps, so load the final weights instead
        compat.load_final_checkpoint(trainer, last, finished)
        losses = [e["loss"] for e in finished.log_history if "loss" in e]
        result = TrainOutput(finished.global_step, sum(losses) / len(losses) if losses else float("nan"), {})
    else:
        result = trainer.train(resume_from_checkpoint=last)
    if has_eval:
        metrics["eval_loss_before"] = (
            json.loads(initial_eval.read_text())["eval_loss"] if initial_eval.is_file() else None
        )
    counter.close()
    runtime = result.metrics.get("train_runtime", 0.0)
    metrics.update(
        train_loss=result.training_loss,
        steps=result.global_step,
        train_runtime_s=round(runtime, 2),
        batching=batching.mode_of(trainer.args),
        **counter.metrics(runtime),
    )
    if trainer.eval_dataset is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    model_dir = ctx.stage_dir / "model"
    partial = ctx.stage_dir / ".model.partial"  # renamed into place once complete: a kill never leaves half a model
    trainer.save_model(str(partial))  # gathers ZeRO-3 / FSDP shards; adapters only for PEFT models
    if ctx.is_main:
        trainer.processing_class.save_pretrained(str(partial))
        compat.drop_ref_adapter_copy(partial)  # DPO on a PeftModel saves TRL's frozen reference adapter too
        replace_dir(partial, model_dir)
        write_json_atomic(ctx.stage_dir / "log_history.json", trainer.state.log_history)
    ctx.wait()
    metrics.update(modeling.trainable_summary(trainer.model))
    ctx.outputs["model"] = modeling.saved_ref(trainer.model, model_dir, base or ctx.recipe.model.name_or_path).as_dict()
    return metrics


def replace_dir(src: Path, dest: Path) -> None:
    """Move a finished directory into place (an older one from an earlier attempt is removed first)."""
    import shutil

    if dest.exists():
        shutil.rmtree(dest)
    src.replace(dest)


def resume_point(ctx, ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint: the main process sets damaged ones aside (see pipeline.train.checkpoints),
    then every rank picks the same newest one."""
    if ctx.is_main:
        checkpoints.last_good_checkpoint(ckpt_dir, warn=lambda message: ctx.say(f"[{ctx.name}] warning: {message}"))
    ctx.wait()
    found = checkpoints.checkpoints(ckpt_dir)
    return str(found[0]) if found else None


def _finished_state(checkpoint: str):
    """The checkpoint's TrainerState if it is the end of training, else None."""
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    return state if state.max_steps and state.global_step >= state.max_steps else None


class KeepInitialEval(TrainerCallback):
    """Saves the step-0 eval loss as soon as it exists, so a resumed run still reports 'before' correctly."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main = path, is_main

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.is_main and state.global_step == 0 and metrics and "eval_loss" in metrics:
            write_json_atomic(self.path, {"eval_loss": metrics["eval_loss"]})


class TrainingProgress(TrainerCallback):
    """``[stage] training: 440/1100 steps (40%), 23s, ETA 35s; loss 0.51`` -- in place of the Trainer's
    per-log dicts and tqdm bar (which ``--verbose`` brings back)."""

    def __init__(self, ctx):
        self.ctx, self.bar, self.loss = ctx, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = console.stage_progress(self.ctx, "training", state.max_steps, "steps", already=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step, f"loss {self.loss:.4g}" if self.loss is not None else "")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def show_progress(trainer, ctx) -> None:
    """Our progress line instead of the Trainer's printed log dicts, unless --verbose."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if not console.verbose():
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    trainer.add_callback(TrainingProgress(ctx))
