"""The DPO policy and its frozen reference: which reference each SFT output gets, decided in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import LoraConfig, ModelConfig
from pipeline.modeling.loading import ModelRef, load_base, load_policy, peft_config


@dataclass
class DPOModels:
    """What DPOTrainer is handed: the policy, its frozen reference, and a LoRA for TRL to add."""

    model: Any  # the policy (a PeftModel when it continues an SFT adapter)
    ref_model: Any  # a separate frozen model, or None: TRL derives the reference from the policy
    peft_config: Any  # a fresh LoRA that TRL puts on the policy, or None
    reference: str  # which reference, for the stage metrics


def load_dpo_models(
    cfg: ModelConfig,
    lora: LoraConfig | None,
    sft: ModelRef,
    precompute: bool = False,
    reference: ModelRef | None = None,
) -> DPOModels:
    """The DPO policy and its reference. The reference is the policy's start ``sft`` (any policy stage's model:
    SFT, or an earlier DPO round), frozen -- or, when ``reference`` is given (``reference_from``), that policy,
    loaded a second time and frozen (``ref_model``; TRL then neither copies the adapter nor disables it).

    ======================  ===========  ============================  ==========================  =====================
    SFT output (``sft``)    recipe lora  policy                        handed to DPOTrainer        reference
    ======================  ===========  ============================  ==========================  =====================
    adapter (any base,      ignored      base (4-bit if the recipe     model=PeftModel,            "frozen sft adapter":
    also 4-bit)                          says) + the SFT adapter,      ref_model=None              TRL copies the loaded
                                         trainable                                                 adapter into a frozen
                                                                                                   'ref' adapter
    full                    none         the SFT model                 ref_model = the SFT model   "frozen copy"
                                                                       loaded a second time,
                                                                       frozen
    full, precompute        none         the SFT model                 ref_model=None              "precomputed": TRL
                                                                                                   runs the untrained
                                                                                                   policy over the pairs
                                                                                                   before any step
    full                    given        the SFT model (4-bit if the   peft_config = recipe lora,  "adapter disabled":
                                         recipe says); TRL adds a      ref_model=None              the policy with its
                                         fresh LoRA                                                new adapter switched
                                                                                                   off
    ======================  ===========  ============================  ==========================  =====================

    Never the bare base model, and never TRL's implicit reload from ``config._name_or_path`` (it names
    whatever path the config carries, bypasses this loader's settings, and misses in-memory changes).
    With a 4-bit recipe the reference is what the policy starts from: the 4-bit base (plus the SFT adapter).
    Every 4-bit layer is patched by ``fix_cpu_4bit`` (in ``load_base``) before TRL's first no-grad forward
    (precompute, eval_on_start); TRL's 'ref' adapter reuses those layers and creates none.
    """
    ref_model = _reference_model(cfg, reference) if reference is not None else None
    if sft.form == "adapter":
        policy = load_policy(cfg, lora, init=sft, trainable=True)
        return DPOModels(policy, ref_model, None, "frozen reference_from model" if ref_model else "frozen sft adapter")
    if lora is not None:
        from peft import prepare_model_for_kbit_training

        model = load_base(cfg, path=sft.path)
        if cfg.quantization != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        label = "frozen reference_from model" if ref_model else "adapter disabled"
        return DPOModels(model, ref_model, peft_config(lora), label)
    policy = load_policy(cfg, None, init=sft, trainable=True)
    if ref_model is not None:
        return DPOModels(policy, ref_model, None, "frozen reference_from model")
    if precompute:
        return DPOModels(policy, None, None, "precomputed")
    return DPOModels(policy, frozen(load_policy(cfg, None, init=sft, trainable=False)), None, "frozen copy")


def _reference_model(cfg: ModelConfig, reference: ModelRef):
    """``reference_from``'s policy loaded a second time, frozen, as TRL's ``ref_model`` (TRL then neither copies
    the policy's adapter nor disables it)."""
    ref_model = load_policy(cfg, None, init=reference, trainable=False)
    if hasattr(ref_model, "get_base_model"):
        # an adapter reference: TRL wants a plain transformers model (it patches its backbone and LM head);
        # PEFT injects the LoRA layers into the base model in place, so the base model computes with them
        ref_model = ref_model.get_base_model()
    return frozen(ref_model)


def frozen(model):
    """No gradients, eval mode (no dropout): a reference model."""
    model.requires_grad_(False)
    model.eval()
    return model
