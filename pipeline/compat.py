"""Every place this project depends on a library's internals, in one module.

Each workaround says what it works around and which behaviour it relies on; ``tests/test_compat.py`` checks
that behaviour against the installed versions, so an upgrade that changes it fails a test instead of
silently changing results. Checked against trl 1.16, transformers 5.23, bitsandbytes 0.50 (the ranges
pinned in pyproject.toml).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------------------
# bitsandbytes: 4-bit layers on CPU
# ----------------------------------------------------------------------------------------------


def fix_cpu_4bit(model) -> int:
    """Keep 4-bit layers trainable on CPU; returns how many layers were patched.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit weights for an inference kernel on the first
    no-grad forward in eval mode (``Linear4bit.support_avx512bf16_for_cpu``). That kernel has no backward, so
    from then on no gradient reaches LoRA through those layers (a LoRA gradient norm went 1.31 -> 0.0) and
    the only sign is a UserWarning. Turning the flag off before any forward keeps training working.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    patched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            patched += 1
    return patched


# ----------------------------------------------------------------------------------------------
# transformers Trainer: resuming at the final checkpoint, eval before training
# ----------------------------------------------------------------------------------------------


def load_final_checkpoint(trainer, checkpoint: str, state) -> None:
    """Load a checkpoint's weights and its TrainerState without training.

    Resuming from a checkpoint taken at the last step would run one step past max_steps; the Trainer has
    no public "load and stop", so this uses ``Trainer._load_from_checkpoint`` and assigns ``trainer.state``.
    """
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = state


def set_eval_on_start(trainer, enabled: bool) -> None:
    """Evaluate before the first step, inside ``train()``.

    Under DeepSpeed ZeRO-1/2 an ``evaluate()`` before ``train()`` fails ("ZeRO inference only makes sense with
    ZeRO Stage 3"); ``eval_on_start`` runs it inside the training loop instead. Whether it is wanted is only
    known after the trainer exists (a resumed run already has its step-0 loss), and the Trainer reads the
    flag when ``train()`` starts, so it is set on the built trainer's args.
    """
    trainer.args.eval_on_start = enabled


# ----------------------------------------------------------------------------------------------
# transformers Trainer: length-grouped batches of pairs
# ----------------------------------------------------------------------------------------------


def sequence_length(row: dict[str, Any]) -> int:
    """Tokens a tokenized row occupies in a batch: SFT rows (input_ids); preference pairs, whose chosen and
    rejected are padded to the longer of the two (prompt_ids + chosen_ids / rejected_ids)."""
    if "input_ids" in row:
        return len(row["input_ids"])
    return len(row.get("prompt_ids") or []) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))


_GROUPED: dict[tuple[type, type], type] = {}


def length_grouped(trainer_cls: type, sampler_cls: type) -> type:
    """``trainer_cls`` whose ``train_sampling_strategy="group_by_length"`` sampler is
    ``sampler_cls(lengths, batch_size, seed=seed)`` over ``sequence_length`` (the caller's sampler, so this
    module needs nothing above ``pipeline.util``; ``pipeline.train.batching.length_grouped`` passes its own).

    The Trainer's own group_by_length reads a ``length`` column (which it drops with the other columns the model
    does not take before it builds the sampler) or ``input_ids`` (which TRL's preference datasets do not have), so
    pairs could not be grouped, and it groups evaluation batches the same way (failing on pairs). This overrides
    ``Trainer._get_train_sampler(train_dataset)`` and ``Trainer._get_eval_sampler(eval_dataset)``, which the
    Trainer calls with the dataset it is about to batch.
    """
    if (trainer_cls, sampler_cls) not in _GROUPED:

        class Grouped(trainer_cls):
            def _get_train_sampler(self, train_dataset=None):
                if self.args.train_sampling_strategy != "group_by_length":
                    return super()._get_train_sampler(train_dataset)
                dataset = train_dataset if train_dataset is not None else self.train_dataset
                # micro-batches are padded one by one: group at the size of one (per device)
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                return sampler_cls([sequence_length(row) for row in dataset], self.args.train_batch_size, seed=seed)

            def _get_eval_sampler(self, eval_dataset):
                # the Trainer groups eval batches too under group_by_length, but through input_ids only (which
                # pairs lack); evaluation keeps the dataset's order, so eval losses do not depend on batching
                if self.args.train_sampling_strategy != "group_by_length":
                    return super()._get_eval_sampler(eval_dataset)
                from torch.utils.data import SequentialSampler

                return SequentialSampler(eval_dataset)

        Grouped.__name__ = Grouped.__qualname__ = f"Grouped{trainer_cls.__name__}"
        _GROUPED[trainer_cls, sampler_cls] = Grouped
    return _GROUPED[trainer_cls, sampler_cls]


# ----------------------------------------------------------------------------------------------
# trl DPOTrainer: loss names, the frozen 'ref' adapter, the reference log-prob cache
# ----------------------------------------------------------------------------------------------

# The name DPOTrainer gives the frozen copy of a PeftModel's trained adapter (its reference policy).
TRL_REF_ADAPTER = "ref"


def dpo_loss_names() -> list[str]:
    """DPO loss types TRL accepts. TRL has no list of them; they are quoted in DPOConfig.loss_type's help."""
    from trl import DPOConfig

    field = DPOConfig.__dataclass_fields__["loss_type"]
    return re.findall(r"`'(\w+)'`", field.metadata.get("help", ""))


def has_frozen_ref_adapter(model) -> bool:
    """Did DPOTrainer copy the policy's adapter into a frozen reference adapter?"""
    return TRL_REF_ADAPTER in getattr(model, "peft_config", {})


def drop_ref_adapter_copy(model_dir: Path) -> None:
    """PeftModel.save_pretrained also writes TRL's frozen reference adapter (a copy of the SFT adapter)."""
    ref = Path(model_dir) / TRL_REF_ADAPTER
    if (ref / "adapter_config.json").is_file():
        shutil.rmtree(ref)


@dataclass(frozen=True)
class DPODataArgs:
    """The DPOConfig fields TRL's ``DPOTrainer._prepare_dataset`` reads (dataset_num_proc, max_length,
    truncation_mode), plus those that change reference log-probs (ld_alpha, autocast precision).

    TRL's length filter is a lambda over the whole DPOConfig, so the prepared dataset's fingerprint -- and
    with it the key of the precomputed reference log-probs -- changed with every training setting (beta,
    learning rate, output_dir). Handing ``_prepare_dataset`` only these fields lets other settings reuse the
    cache. A field TRL starts to read that is missing here fails loudly (AttributeError).
    """

    dataset_num_proc: int | None
    max_length: int | None
    truncation_mode: str
    ld_alpha: float | None
    bf16: bool
    fp16: bool

    @classmethod
    def of(cls, args) -> DPODataArgs:
        return cls(**{f: getattr(args, f) for f in cls.__dataclass_fields__})


_DPO_TRAINER = None


def dpo_trainer_class():
    """DPOTrainer with the data-args narrowing above, counting its reference forwards (0 when the
    precomputed reference log-probs came from the cache)."""
    global _DPO_TRAINER
    if _DPO_TRAINER is None:
        from trl import DPOTrainer

        class PipelineDPOTrainer(DPOTrainer):
            ref_logp_batches = 0

            def compute_ref_log_probs(self, model, inputs):
                self.ref_logp_batches += 1
                if getattr(self, "_ref_progress", None) is not None:
                    self._ref_progress.advance()
                return super().compute_ref_log_probs(model, inputs)

            def _precompute_ref_logps(self, dataset, name, batch_size):
                # our progress line in place of TRL's tqdm bar (silenced unless --verbose)
                from pipeline.util import console

                total = -(-len(dataset) // (batch_size * self.accelerator.num_processes))
                label = f"{console.stage_label()} reference log-probs ({name})".strip()
                self._ref_progress = console.Progress(label, total, "batches", self.accelerator.is_main_process)
                try:
                    out = super()._precompute_ref_logps(dataset, name, batch_size)
                finally:
                    progress, self._ref_progress = self._ref_progress, None
                progress.close("" if progress.done else "reused from the cache")
                return out

            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return super()._prepare_dataset(dataset, processing_class, DPODataArgs.of(args), dataset_name)

        _DPO_TRAINER = PipelineDPOTrainer
    return _DPO_TRAINER


def file_backed_dataset(records: list[dict[str, Any]], directory: Path, is_main: bool, wait):
    """The records as an Arrow dataset on disk, written once per content.

    TRL caches precomputed reference log-probs next to a dataset's files, keyed by the dataset's
    ``_fingerprint`` and a hash of the reference weights (``DPOTrainer._precompute_ref_logps``). An in-memory
    dataset has no files, so its cache goes to a temporary directory and is never found again. Written once
    per content (never rewritten: a new mtime would be a new fingerprint), the same pairs give the same files.
    ``wait``: a barrier, so other ranks read what the main process wrote.
    """
    import hashlib
    import json

    import datasets

    blob = json.dumps(records, sort_keys=True, ensure_ascii=False)
    path = Path(directory) / f"pairs-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    if is_main and not (path / "state.json").is_file():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        datasets.Dataset.from_list(records).save_to_disk(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    wait()
    return datasets.load_from_disk(str(path))


# ----------------------------------------------------------------------------------------------
# trl RewardTrainer: k-bit reward models
# ----------------------------------------------------------------------------------------------

# TRL casts a k-bit reward model's score head to bf16; training in fp32 then fails on a dtype mismatch.
KBIT_REWARD_PRECISION = "bf16"
