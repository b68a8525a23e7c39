"""Optimizers: how many state tensors each keeps per trainable parameter, and their bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.util.errors import PipelineError
from pipeline.util.text import suggest

BNB_OPT_BLOCK = 256  # bitsandbytes 8-bit optimizer states: one fp32 absmax per 256 values
BNB_MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit states in bitsandbytes optimizers


@dataclass(frozen=True)
class Optim:
    states: int  # state tensors per parameter (Adam: 2)
    bits: int | None  # None: same dtype as the parameter (torch optimizers); 8 or 32: bitsandbytes
    foreach_temp: bool = False  # torch foreach AdamW allocates one state-sized buffer during the step
    factored: bool = False  # Adafactor: row + column second moments for matrices


OPTIMIZERS: dict[str, Optim] = {
    "adamw_torch": Optim(2, None, foreach_temp=True),
    "adamw_torch_fused": Optim(2, None),
    "adamw_anyprecision": Optim(2, None),
    "stable_adamw": Optim(2, None, foreach_temp=True),
    "ademamix": Optim(3, None),
    "adamw_torch_8bit": Optim(2, 8),
    "adamw_torch_4bit": Optim(2, 4),
    "adamw_bnb_8bit": Optim(2, 8),
    "adamw_8bit": Optim(2, 8),
    "paged_adamw_8bit": Optim(2, 8),
    "paged_adamw_32bit": Optim(2, 32),
    "ademamix_8bit": Optim(3, 8),
    "paged_ademamix_8bit": Optim(3, 8),
    "paged_ademamix_32bit": Optim(3, 32),
    "lion_8bit": Optim(1, 8),
    "paged_lion_8bit": Optim(1, 8),
    "lion_32bit": Optim(1, 32),
    "paged_lion_32bit": Optim(1, 32),
    "rmsprop": Optim(1, None),
    "rmsprop_bnb": Optim(1, 32),
    "rmsprop_bnb_8bit": Optim(1, 8),
    "rmsprop_bnb_32bit": Optim(1, 32),
    "adagrad": Optim(1, None),
    "adafactor": Optim(1, None, factored=True),
    "sgd": Optim(0, None),  # HF Trainer's sgd: no momentum, no state
}


def optim_spec(name: str) -> Optim:
    if name not in OPTIMIZERS:
        raise PipelineError(
            f"train.optim: unknown optimizer {name!r}{suggest(name, OPTIMIZERS)}; plan knows: {', '.join(OPTIMIZERS)}"
        )
    return OPTIMIZERS[name]


@dataclass(frozen=True)
class Tensor:
    """A trainable parameter tensor: what its gradient and optimizer states are sized by."""

    numel: int
    rows: int  # first dimension (Adafactor factors matrices into rows + columns)
    bytes: int  # bytes per element of the parameter (and of its gradient)
    embedding: bool = False  # HF Trainer keeps 32-bit bitsandbytes states for nn.Embedding weights


def optimizer_state_bytes(spec: Optim, tensors: list[Tensor], master_fp32: bool) -> int:
    """States per tensor. Torch optimizers keep states in the parameter dtype (fp32 under a DeepSpeed
    master copy); bitsandbytes keeps 8-bit blockwise states for tensors of >= 4096 elements."""
    total = 0
    for t in tensors:
        pbytes = 4 if master_fp32 else t.bytes
        if spec.factored:
            # Adafactor (no first moment by default): row and column second moments for a matrix
            total += (t.rows + t.numel // max(t.rows, 1)) * pbytes if t.rows > 1 else t.numel * pbytes
        elif spec.bits is None:
            total += spec.states * t.numel * pbytes
        elif spec.bits < 32 and t.numel >= BNB_MIN_8BIT_SIZE and not t.embedding:
            total += spec.states * (t.numel * spec.bits // 8 + 4 * math.ceil(t.numel / BNB_OPT_BLOCK))
        else:
            total += spec.states * t.numel * 4
    return total
