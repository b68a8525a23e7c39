"""Training settings shared by the training stages (mapped onto TRL's configs by pipeline.train.args). No torch here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pipeline.config.base import Strict


class TrainConfig(Strict):
    learning_rate: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Overrides epochs when set.")
    batch_size: int = Field(8, gt=0, description="Per device.")
    gradient_accumulation_steps: int = Field(1, gt=0)
    warmup: float = Field(0.0, ge=0, description="Fraction of training (< 1) or a number of steps.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optim: str = "adamw_torch"
    # auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="None: evaluate before and after training only.")
    save_steps: int = Field(200, gt=0, description="Checkpoint interval; a killed run resumes from the last one.")
    save_total_limit: int = Field(2, gt=0)
    eval_batch_size: int | None = Field(None, gt=0)
    batching: Literal["auto", "padded", "grouped", "packed"] = Field(
        "auto",
        description="How rows form batches. padded: random batches, padded to their longest row. grouped: rows of "
        "similar length batched together (sorted within large random buckets; every row once per epoch). packed: "
        "SFT rows packed into max_length sequences with no padding (position_ids keep attention within each row; "
        "batch_size then counts max_length blocks). auto: packed for SFT on a GPU, grouped otherwise (packing is "
        "slower on CPU).",
    )
    # Escape hatch: extra fields of the TRL config class, checked against it at run time.
    trainer_extra: dict[str, Any] = {}
