"""Tokenizer and model loading: dtype, 4-bit/8-bit bitsandbytes, LoRA, adapter hand-off, saving.

The only module that touches peft and bitsandbytes, so every stage loads models the same way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import BUILTIN_TINY_MODEL, LoraConfig, ModelConfig
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# What a training stage hands to the next: saved in the manifest as the stage's "model" output
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A saved model: a full model directory, or a LoRA adapter on a base."""

    path: str
    kind: str  # "full" | "adapter"
    base: str | None = None  # for adapters: the base model path or Hub id

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "base": self.base}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelRef":
        return cls(path=data["path"], kind=data["kind"], base=data.get("base"))


def resolve_name(name_or_path: str) -> str:
    if name_or_path == BUILTIN_TINY_MODEL:
        from pipeline.tinymodel import tiny_model_path

        return str(tiny_model_path())
    if name_or_path.startswith("builtin:"):
        from pipeline import replicas

        if replicas.family_of(name_or_path) is not None:
            return str(replicas.replica_path(name_or_path))
        known = ", ".join([BUILTIN_TINY_MODEL, *replicas.builtin_names()])
        raise PipelineError(f"model.name_or_path: unknown built-in model {name_or_path!r}; the built-ins are: {known}")
    return name_or_path


def has_cuda() -> bool:
    return torch.cuda.is_available()


def torch_dtype(cfg: ModelConfig) -> torch.dtype:
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    if has_cuda():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def load_tokenizer(cfg: ModelConfig, path: str | None = None, padding_side: str = "right"):
    from transformers import AutoTokenizer

    source = path or resolve_name(cfg.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=None if path else cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise PipelineError(f"cannot load the tokenizer of {source!r}: {exc}") from None
    if tok.pad_token is None:
        # Padding positions are masked out of the loss and attention, so reusing EOS is safe.
        tok.pad_token = tok.eos_token or tok.unk_token
        if tok.pad_token is None:
            raise PipelineError(f"the tokenizer of {source!r} has no pad, eos or unk token to pad with")
    tok.padding_side = padding_side
    return tok


def token_length(tokenizer, text_or_messages) -> int:
    """Tokens of a prompt or response as the trainers tokenize it (chat messages through the template)."""
    if isinstance(text_or_messages, list):
        ids = tokenizer.apply_chat_template(text_or_messages, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return len(tokenizer(text_or_messages)["input_ids"])


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def _quantization_config(cfg: ModelConfig):
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = _DTYPES[cfg.quant.compute_dtype] if cfg.quant.compute_dtype else torch_dtype(cfg)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant.quant_type,
        bnb_4bit_use_double_quant=cfg.quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,  # lets FSDP / ZeRO-3 shard the packed weights with the rest
    )


def _device_map(cfg: ModelConfig):
    if cfg.quantization == "none":
        return None  # the trainer / accelerate places the model
    if has_cuda():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}  # one full copy per process (DDP)
    return {"": "cpu"}


def load_base(cfg: ModelConfig, head: str = "causal_lm", path: str | None = None, quantize: bool = True):
    """Load a base model. ``head``: causal_lm, or reward (a sequence classifier with one output)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    source = path or resolve_name(cfg.name_or_path)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(cfg),
        "trust_remote_code": cfg.trust_remote_code,
        "revision": None if path else cfg.revision,
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quantize and cfg.quantization != "none":
        kwargs["quantization_config"] = _quantization_config(cfg)
        kwargs["device_map"] = _device_map(cfg)
    auto = AutoModelForSequenceClassification if head == "reward" else AutoModelForCausalLM
    if head == "reward":
        kwargs["num_labels"] = 1
    try:
        if head == "reward":
            # a causal LM has no score head: transformers reports it "MISSING"; a new head is the point here
            from transformers.utils import logging as hf_logging

            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                model = auto.from_pretrained(source, **kwargs)
            finally:
                hf_logging.set_verbosity(level)
        else:
            model = auto.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise PipelineError(f"cannot load model {source!r}: {exc}") from None
    if head == "reward" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    fix_cpu_4bit(model)
    return model


def fix_cpu_4bit(model) -> int:
    """Keep 4-bit layers trainable on CPU; returns how many layers were patched.

    bitsandbytes repacks 4-bit weights for an AVX512-BF16 inference kernel on the first no-grad eval
    forward; that kernel has no backward, so from then on LoRA gradients through those layers are
    silently zero (STACK_NOTES: a gradient norm went 1.31 -> 0.0). Disabling the repack keeps them.
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


def peft_config(lora: LoraConfig, task: str = "CAUSAL_LM"):
    import peft

    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        bias=lora.bias,
        task_type=task,  # SEQ_CLS also trains the reward head (modules_to_save)
    )


def add_lora(model, cfg: ModelConfig, lora: LoraConfig, task: str = "CAUSAL_LM"):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return get_peft_model(model, peft_config(lora, task))


def load_policy(cfg: ModelConfig, lora: LoraConfig | None, init: ModelRef | None = None, trainable: bool = True):
    """The causal LM a stage trains or samples from.

    - init None: the recipe's base model, with a fresh LoRA adapter when the recipe has a lora block;
    - init is an adapter: its base (quantized as the recipe says) with that adapter, trainable or frozen;
    - init is a full model: that model, with a fresh LoRA adapter when the recipe has a lora block.
    """
    from peft import PeftModel, prepare_model_for_kbit_training

    if init is not None and init.kind == "adapter":
        model = load_base(cfg, path=_base_path(init))
        if trainable and cfg.quantization != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        model = PeftModel.from_pretrained(model, init.path, is_trainable=trainable)
        fix_cpu_4bit(model)
        return model
    model = load_base(cfg, path=init.path if init else None)
    if trainable and lora is not None:
        model = add_lora(model, cfg, lora)
    elif trainable and cfg.quantization != "none":
        raise PipelineError("a quantized model can only be trained through a LoRA adapter; add a 'lora:' block")
    return model


def load_reward_model(cfg: ModelConfig, lora: LoraConfig | None, init: ModelRef | None = None, work_dir: Path | None = None):
    """A sequence classifier with one output (a fresh score head) to train as a reward model.

    Starts from the recipe's base model or an earlier stage's model; an SFT adapter is first merged
    into its base (written under ``work_dir``), since a reward model needs the whole network.
    """
    path = None
    if init is not None:
        path = init.path if init.kind == "full" else str(merge_to_full(init, cfg, (work_dir or Path(init.path).parent) / "merged_init"))
    model = load_base(cfg, head="reward", path=path)
    if lora is not None:
        return add_lora(model, cfg, lora, task="SEQ_CLS")  # SEQ_CLS also trains the new score head
    if cfg.quantization != "none":
        raise PipelineError("a quantized reward model can only be trained through a LoRA adapter; add a 'lora:' block")
    return model


def load_trained_reward_model(cfg: ModelConfig, ref: ModelRef):
    """A reward model a reward stage saved (full classifier, or adapter + score head on its base), frozen."""
    from peft import PeftModel

    if ref.kind == "adapter":
        model = PeftModel.from_pretrained(load_base(cfg, head="reward", path=_base_path(ref)), ref.path)
    else:
        model = load_base(cfg, head="reward", path=ref.path)
    fix_cpu_4bit(model)
    return model.eval()


def merge_to_full(ref: ModelRef, cfg: ModelConfig, out_dir: Path) -> Path:
    """Merge an adapter into its base in full precision (a 4-bit base is loaded unquantized, i.e.
    dequantized) and save a standalone model + tokenizer. Reused if already written."""
    if (out_dir / "config.json").is_file():
        return out_dir
    merged = load_merged(cfg, ref)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    merged.save_pretrained(tmp)
    load_tokenizer(cfg, path=ref.path).save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def _base_path(ref: ModelRef) -> str:
    if ref.base is None:
        raise PipelineError(f"adapter {ref.path} does not say which base model it belongs to")
    return resolve_name(ref.base)


def saved_ref(model, model_dir: Path, base: str) -> ModelRef:
    """How a model saved to ``model_dir`` (by the trainer) is handed to later stages."""
    from peft import PeftModel

    unwrapped = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    if isinstance(unwrapped, PeftModel):
        return ModelRef(path=str(model_dir), kind="adapter", base=base)
    return ModelRef(path=str(model_dir), kind="full")


def trainable_summary(model) -> dict[str, int]:
    # ds_numel: the full size of a parameter DeepSpeed ZeRO-3 has sharded across ranks
    size = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731
    total = sum(size(p) for p in model.parameters())
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    return {"parameters": int(total), "trainable_parameters": int(trainable)}


# --- DPO reference and export helpers ---


@dataclass
class DPOModels:
    """What DPOTrainer is handed: the policy, its frozen reference, and a LoRA for TRL to add."""

    model: Any  # the policy (a PeftModel when it continues an SFT adapter)
    ref_model: Any  # a separate frozen model, or None: TRL derives the reference from the policy
    peft_config: Any  # a fresh LoRA that TRL puts on the policy, or None
    reference: str  # which reference, for the stage metrics


def load_dpo_models(cfg: ModelConfig, lora: LoraConfig | None, sft: ModelRef, precompute: bool = False) -> DPOModels:
    """The DPO policy and its reference. The reference is always the SFT policy ``sft``, frozen.

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
    if sft.kind == "adapter":
        return DPOModels(load_policy(cfg, lora, init=sft, trainable=True), None, None, "frozen sft adapter")
    if lora is not None:
        from peft import prepare_model_for_kbit_training

        model = load_base(cfg, path=sft.path)
        if cfg.quantization != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        return DPOModels(model, None, peft_config(lora), "adapter disabled")
    policy = load_policy(cfg, None, init=sft, trainable=True)
    if precompute:
        return DPOModels(policy, None, None, "precomputed")
    return DPOModels(policy, frozen(load_policy(cfg, None, init=sft, trainable=False)), None, "frozen copy")


def frozen(model):
    """No gradients, eval mode (no dropout): a reference model."""
    model.requires_grad_(False)
    model.eval()
    return model


def load_merged(cfg: ModelConfig, ref: ModelRef, head: str = "causal_lm"):
    """A standalone full-precision model from a stage's output.

    A full model loads as saved. An adapter is applied to its base loaded in full precision (a 4-bit or
    8-bit recipe's base is loaded unquantized: the original weights, not the rounded ones the adapter
    was trained against) and merged into it (``merge_and_unload``).
    """
    from peft import PeftModel

    if ref.kind == "full":
        return load_base(cfg, head=head, path=ref.path, quantize=False)
    base = load_base(cfg, head=head, path=_base_path(ref), quantize=False)
    try:
        model = PeftModel.from_pretrained(base, ref.path)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot load the adapter {ref.path} on its base {ref.base}: {exc}") from None
    return model.merge_and_unload()
