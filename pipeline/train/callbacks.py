"""Trainer callbacks: our progress line in place of the Trainer's printed logs, and the step-0 eval loss kept
for a resumed run."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from pipeline.util import console, signals
from pipeline.util.files import write_json_atomic


class KeepInitialEval(TrainerCallback):
    """Saves the step-0 eval loss as soon as it exists, so a resumed run still reports 'before' correctly."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main = path, is_main

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.is_main and state.global_step == 0 and metrics and "eval_loss" in metrics:
            write_json_atomic(self.path, {"eval_loss": metrics["eval_loss"]})


class CheckpointOnSignal(TrainerCallback):
    """A SIGTERM held by ``pipeline.util.signals`` (the job is about to be killed): save a checkpoint at the end
    of this optimizer step, then raise it, naming the checkpoint -- the rerun resumes from this step."""

    def on_step_end(self, args, state, control, **kwargs):
        if signals.pending() is not None:
            signals.saving()
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        held = signals.take() if signals.pending() is not None else None
        if held is not None:
            held.checkpoint = f"checkpoint-{state.global_step}"
            raise held


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
