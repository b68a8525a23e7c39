"""DPO: preference pairs -> TRL's DPOTrainer, against the SFT policy frozen as the reference.

Which reference each SFT output gets is decided in one place, ``modeling.load_dpo_models`` (a table in
its docstring); the stage records the case in its metrics as ``reference``. With
``precompute_ref_log_probs`` the pairs are stored as Arrow files under ``<stage_dir>/ref_cache`` so that
TRL's on-disk cache of reference log-probs lands there and a rerun on the same data and reference reuses
it (``ref_logp_batches_computed`` is 0 then).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import modeling, training
from pipeline.artifacts import write_json_atomic
from pipeline.data.preference import prepare_pairs
from pipeline.errors import PipelineError, RecipeError

log = logging.getLogger(__name__)

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


def run(ctx) -> dict[str, Any]:
    trainer, summary, setup = build_trainer(ctx)
    policy = ctx.model_of(ctx.cfg.policy_from)
    # an adapter continued from SFT keeps SFT's base; a new adapter on a full SFT model belongs to that model
    metrics = training.fit(trainer, ctx, base=policy.base if policy.kind == "adapter" else policy.path)
    history = trainer.state.log_history
    metrics.update(heldout_metrics(history))
    metrics.update(train_metrics(history))
    metrics.update(
        reference=setup.reference,
        ref_log_probs="precomputed" if ctx.cfg.precompute_ref_log_probs else "every step",
        ref_logp_batches_computed=trainer.ref_logp_batches,
        train_pairs=summary["train"]["kept"],
        eval_pairs=summary["eval"]["kept"] if summary.get("eval") else 0,
    )
    if ctx.is_main:
        write_json_atomic(ctx.stage_dir / "margins.json", margins_series(history))
        _drop_ref_adapter_copy(ctx.stage_dir / "model")
    return metrics


def build_trainer(ctx):
    """(DPOTrainer, data summary, modeling.DPOModels) for the stage ``ctx``."""
    from trl import DPOConfig

    cfg, recipe = ctx.cfg, ctx.recipe
    losses = check_losses(cfg, ctx.name, DPOConfig)
    policy = ctx.model_of(cfg.policy_from)
    tokenizer = modeling.load_tokenizer(recipe.model, path=policy.path)
    train_ds, eval_ds, summary = prepare_data(ctx, tokenizer)
    # Args before the model: under DeepSpeed ZeRO-3 they make from_pretrained load sharded (zero3_init).
    try:
        args = training.trl_args(
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
    setup = modeling.load_dpo_models(recipe.model, recipe.lora, policy, precompute=cfg.precompute_ref_log_probs)
    trainer = _trainer_class()(
        model=setup.model, ref_model=setup.ref_model, peft_config=setup.peft_config, args=args,
        train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
    )
    if setup.reference == "frozen sft adapter" and "ref" not in trainer.model.peft_config:
        # TRL falls back to the adapter-disabled base for some PEFT versions: that is not the SFT policy.
        raise PipelineError(
            "TRL did not copy the SFT adapter into a frozen 'ref' adapter, so the DPO reference would be the bare "
            "base model; check the installed trl/peft versions"
        )
    # Every 4-bit layer was patched at load; TRL builds no new ones. Anything patched here existed unpatched
    # through TRL's no-grad forwards (precompute) and may have lost its gradients: say so.
    late = modeling.fix_cpu_4bit(trainer.model) + (modeling.fix_cpu_4bit(trainer.ref_model) if trainer.ref_model is not None else 0)
    if late:
        log.warning("%d 4-bit layer(s) were unpatched after DPOTrainer was built (CPU repack trap)", late)
    return trainer, summary, setup


_TRAINER = None


def _trainer_class():
    """DPOTrainer that counts its reference forwards (0 when the precomputed log-probs come from the cache)."""
    global _TRAINER
    if _TRAINER is None:
        from trl import DPOTrainer

        class PipelineDPOTrainer(DPOTrainer):
            ref_logp_batches = 0

            def compute_ref_log_probs(self, model, inputs):
                self.ref_logp_batches += 1
                return super().compute_ref_log_probs(model, inputs)

            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                # TRL's length filter is a lambda over the whole DPOConfig, so the prepared dataset's
                # fingerprint -- and with it the key of the precomputed reference log-probs -- changed with
                # every training setting (beta, learning rate, output_dir). Hand it only what shapes the
                # data and the reference log-probs: other settings then reuse the cache.
                return super()._prepare_dataset(dataset, processing_class, DataArgs.of(args), dataset_name)

        _TRAINER = PipelineDPOTrainer
    return _TRAINER


@dataclass(frozen=True)
class DataArgs:
    """The DPOConfig fields that TRL's dataset preparation reads (dataset_num_proc, max_length,
    truncation_mode), plus those that change reference log-probs (ld_alpha, autocast precision): what
    the precomputed reference log-probs are keyed on besides the data, the tokenizer and the reference
    weights. A field TRL starts to read that is missing here fails loudly (AttributeError)."""

    dataset_num_proc: int | None
    max_length: int | None
    truncation_mode: str
    ld_alpha: float | None
    bf16: bool
    fp16: bool

    @classmethod
    def of(cls, args) -> DataArgs:
        return cls(**{f: getattr(args, f) for f in cls.__dataclass_fields__})


def check_losses(cfg, stage: str, config_cls) -> list[str]:
    """The loss types as TRL's list; unknown names fail here, not at the first training step."""
    losses = [cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type)
    if not losses:
        raise RecipeError(f"stages.{stage}.loss_type: give at least one loss type, e.g. sigmoid")
    field = next(f for f in config_cls.__dataclass_fields__.values() if f.name == "loss_type")
    known = re.findall(r"`'(\w+)'`", field.metadata.get("help", ""))  # TRL lists them in the field's help
    unknown = [name for name in losses if known and name not in known]
    if unknown:
        import difflib

        hints = [f"{name!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(name, known, n=1)) else "") for name in unknown]
        raise RecipeError(f"stages.{stage}.loss_type: unknown DPO loss {', '.join(hints)}; TRL's DPO losses: {', '.join(known)}")
    return losses


def prepare_data(ctx, tokenizer):
    """Read, lint and split the pairs; save the summary; TRL-shaped datasets for train and eval."""
    data = ctx.cfg.data
    train_records, eval_records, summary = prepare_pairs(
        ctx.resolve_source(data.train, "pairs"),
        ctx.resolve_source(data.eval, "pairs"),
        data,
        count_tokens=lambda text: modeling.token_length(tokenizer, text),
        seed=ctx.seed,
    )
    summary["max_length"] = data.max_length
    if ctx.is_main:
        write_json_atomic(ctx.stage_dir / "data_summary.json", summary)
        ctx.say(_summary_line(ctx.name, summary))
    if ctx.cfg.precompute_ref_log_probs:
        cache = ctx.stage_dir / "ref_cache"
        to_ds = lambda records: file_backed(records, cache, ctx)  # noqa: E731
    else:
        import datasets

        to_ds = datasets.Dataset.from_list
    return to_ds(train_records), (to_ds(eval_records) if eval_records else None), summary


def file_backed(records: list[dict], directory: Path, ctx):
    """The records as an Arrow dataset on disk, written once per content.

    TRL caches precomputed reference log-probs next to a dataset's files, keyed by the dataset's
    fingerprint (which follows from its file and each ``map`` applied to it) and a hash of the reference
    model's weights (dpo_trainer.py ``_precompute_ref_logps``). An in-memory dataset has no files, so its
    cache goes to a temporary directory under a random name and is never found again. Written once per
    content (never rewritten: a new mtime would be a new fingerprint), the same pairs give the same files.
    """
    import datasets

    blob = json.dumps(records, sort_keys=True, ensure_ascii=False)
    path = directory / f"pairs-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    if ctx.is_main and not (path / "state.json").is_file():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        datasets.Dataset.from_list(records).save_to_disk(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    ctx.wait()
    return datasets.load_from_disk(str(path))


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
        for h in history if "rewards/margins" in h
    ]
    heldout = [
        {"step": h["step"], "margin": h["eval_rewards/margins"], "accuracy": h.get("eval_rewards/accuracies")}
        for h in history if "eval_rewards/margins" in h
    ]
    return {"train": train, "heldout": heldout}


def _drop_ref_adapter_copy(model_dir: Path) -> None:
    """PeftModel.save_pretrained also writes TRL's frozen 'ref' adapter (a copy of the SFT adapter) to ref/."""
    ref = model_dir / "ref"
    if (ref / "adapter_config.json").is_file():
        shutil.rmtree(ref)


def _summary_line(name: str, summary: dict[str, Any]) -> str:
    parts = []
    for split in ("train", "eval"):
        rep = summary.get(split)
        if rep:
            parts.append(f"{split} {rep['kept']} pairs ({rep['dropped']} dropped)")
    warnings = list(dict.fromkeys(w for split in ("train", "eval") for w in (summary.get(split) or {}).get("warnings", [])))
    return f"[{name}] preference data: " + ", ".join(parts) + (f"; warnings: {'; '.join(warnings)}" if warnings else "")
