"""The model a recipe trains: name or path, dtype, quantization, LoRA. No torch here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from pipeline import builtin
from pipeline.config.base import Strict

BUILTIN_TINY_MODEL = builtin.TINY_MODEL
# The run's date (ISO) in chat_template_kwargs: put there by the run (pipeline.run.runner.with_run_date) so a stage's
# saved recipe records it; templates that print a date render it (pipeline.modeling.chat).
RUN_DATE_KEY = "_run_date"


LIGER_REQUIRED = "model.kernels: liger needs a CUDA GPU and `pip install .[gpu]` (liger-kernel)"


def liger_installed() -> bool:
    """Whether liger-kernel can be imported (looked up, not imported: importing it needs triton)."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


class QuantConfig(Strict):
    """bitsandbytes settings; used only when ``model.quantization`` is 4bit or 8bit."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    # None: bfloat16 on a GPU that supports it, float32 otherwise.
    compute_dtype: Literal["bfloat16", "float16", "float32"] | None = None


class ModelConfig(Strict):
    name_or_path: str = Field(
        BUILTIN_TINY_MODEL,
        description="Hub id, local directory, or 'builtin:tiny-llama' (built locally, offline).",
    )
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    quant: QuantConfig = QuantConfig()
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3"] | None = None
    gradient_checkpointing: bool = False
    kernels: Literal["auto", "none", "liger"] = Field(
        "auto",
        # left out of dumps at its default: the stage hashes of runs finished before the key existed stay cached
        exclude_if=lambda value: value == "auto",
        description="Fused training kernels. liger: Liger's Triton kernels (RMSNorm, RoPE, SwiGLU...) on the "
        "training stages through TRL's use_liger_kernel; needs a CUDA GPU and `pip install .[gpu]` (liger-kernel), "
        "refused at run time otherwise. auto: liger on a CUDA GPU when liger-kernel is installed, nothing on CPU. "
        "none: never.",
    )
    trust_remote_code: bool = False
    chat_template_kwargs: dict[str, str | int | float | bool | None] = Field(
        {},
        description="Variables the chat template reads, the same for every render in every stage (training, "
        "sampling, evaluation), e.g. {enable_thinking: false} for Qwen3 / SmolLM3 without thinking; "
        "{date_string: '26 Jul 2024'} fixes a date-stamped template's date (by default a run fixes the date it "
        "started on, so every stage renders the same prompt).",
    )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in value if not k.isidentifier() or (k.startswith("_") and k != RUN_DATE_KEY)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a template variable name (letters, digits, _; not starting with _)")
        return value

    @field_validator("name_or_path")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a Hub model id, a local directory, or 'builtin:tiny-llama'")
        return value

    @field_validator("name_or_path")
    @classmethod
    def _known_builtin(cls, value: str) -> str:
        if builtin.is_builtin(value) and value not in builtin.names():  # torch-free
            raise ValueError(builtin.unknown(value))
        return value


class LoraConfig(Strict):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear": every linear layer except the output head (peft's shorthand).
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    modules_to_save: list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one module name, or 'all-linear'")
        return value
