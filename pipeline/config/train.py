"""Training settings shared by the training stages (mapped onto TRL's configs by pipeline.train.args). No torch here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

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
    optim: str = Field("adamw_torch", description="Any transformers optimizer name, e.g. adamw_torch_fused on a GPU.")
    compile: bool = Field(
        False,
        description="torch.compile the model (transformers' torch_compile).",
        # left out of dumps at its default: the stage hashes of runs finished before the key existed stay cached
        exclude_if=lambda value: value is False,
    )
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
        "batch_size then counts max_length blocks); grouping skews SFT batches where length follows content (one "
        "task or style per batch). auto: SFT packed on a GPU and padded on CPU (where packing is slower); reward "
        "and DPO pairs grouped.",
    )
    # Escape hatch: extra fields of the TRL config class, checked against it at run time.
    trainer_extra: dict[str, Any] = {}

    @field_validator("trainer_extra")
    @classmethod
    def _switches_elsewhere(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, switch in _SWITCHES.items():
            if key in value:
                raise ValueError(f"{key} is set by {switch}, not here")
        return value


# TRL config fields the recipe sets through its own switches (pipeline.train.args maps them).
_SWITCHES = {
    "use_liger_kernel": "model.kernels (auto | none | liger)",
    "liger_kernel_config": "model.kernels (TRL 1.16's SFT/DPO/GRPO trainers refuse Liger's fused linear "
    "cross-entropy and apply only its layer kernels)",
    "torch_compile": "train.compile",
}
