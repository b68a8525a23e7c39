"""One fit() shared by the training stages: resume from the last good checkpoint, evaluate before and after,
save the final model where later stages find it.

The trainer's arguments come from ``pipeline.train.args``, its callbacks from ``pipeline.train.callbacks``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers.trainer_utils import TrainOutput

from pipeline import compat, modeling
from pipeline.train import batching, checkpoints
from pipeline.train.callbacks import CheckpointOnSignal, KeepInitialEval, show_progress
from pipeline.util import signals
from pipeline.util.files import write_json_atomic

log = logging.getLogger(__name__)


def to_dataset(records: list[dict[str, Any]]):
    """Rows as an in-memory ``datasets.Dataset`` for a trainer; None when there are none."""
    import datasets

    return datasets.Dataset.from_list(records) if records else None


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
    trainer.add_callback(CheckpointOnSignal())
    # SIGTERM: a checkpoint at the end of the step, then the stage stops (in one process; ranks would not agree)
    with signals.checkpoint_on_term(enabled=ctx.world_size == 1):
        result = _train(trainer, last)
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
    metrics.update(_save(trainer, ctx, base))
    return metrics


def _train(trainer, last: str | None) -> TrainOutput:
    """``trainer.train()`` from ``last``, or, when ``last`` is the end of training, its final weights loaded."""
    finished = _finished_state(last) if last and not trainer.is_deepspeed_enabled else None
    if finished is None:
        return trainer.train(resume_from_checkpoint=last)
    # killed after the last checkpoint but before the stage was marked done: resuming would train
    # a step past max_steps, so load the final weights instead
    compat.load_final_checkpoint(trainer, last, finished)
    losses = [e["loss"] for e in finished.log_history if "loss" in e]
    return TrainOutput(finished.global_step, sum(losses) / len(losses) if losses else float("nan"), {})


def _save(trainer, ctx, base: str | None) -> dict[str, int]:
    """Write the model, its tokenizer and the log history to the stage directory, hand the model on as the
    stage's ``model`` output; returns the parameter counts."""
    model_dir = ctx.stage_dir / "model"
    partial = ctx.stage_dir / ".model.partial"  # renamed into place once complete: a kill never leaves half a model
    trainer.save_model(str(partial))  # gathers ZeRO-3 / FSDP shards; adapters only for PEFT models
    if ctx.is_main:
        trainer.processing_class.save_pretrained(str(partial))
        compat.drop_ref_adapter_copy(partial)  # DPO on a PeftModel saves TRL's frozen reference adapter too
        replace_dir(partial, model_dir)
        write_json_atomic(ctx.stage_dir / "log_history.json", trainer.state.log_history)
    ctx.wait()
    ctx.outputs["model"] = modeling.saved_ref(trainer.model, model_dir, base or ctx.recipe.model.name_or_path).as_dict()
    return modeling.trainable_summary(trainer.model)


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
