"""Models: loading (dtype, 4-bit/8-bit, LoRA, adapter hand-off), reward models, the DPO reference, merging adapters.

The only package that touches peft and bitsandbytes (besides the workarounds in ``pipeline.compat``),
so every stage loads models the same way.
"""

from pipeline.modeling.loading import (
    ModelRef,
    add_lora,
    base_path,
    has_cuda,
    load_base,
    load_frozen_policy,
    load_policy,
    load_tokenizer,
    peft_config,
    resolve_name,
    saved_ref,
    token_length,
    torch_dtype,
    trainable_summary,
)
from pipeline.modeling.merge import load_merged, merge_to_full
from pipeline.modeling.reference import DPOModels, frozen, load_dpo_models
from pipeline.modeling.reward import load_reward_model, load_trained_reward_model

__all__ = [
    "DPOModels",
    "ModelRef",
    "add_lora",
    "base_path",
    "frozen",
    "has_cuda",
    "load_base",
    "load_dpo_models",
    "load_frozen_policy",
    "load_merged",
    "load_policy",
    "load_reward_model",
    "load_tokenizer",
    "load_trained_reward_model",
    "merge_to_full",
    "peft_config",
    "resolve_name",
    "saved_ref",
    "token_length",
    "torch_dtype",
    "trainable_summary",
]
