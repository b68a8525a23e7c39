"""Tokenizer and model loading: dtype, 4-bit/8-bit bitsandbytes, LoRA, adapter hand-off, saving.

``load_base`` builds either head (causal LM or reward classifier); reward models to train or to score with are
assembled in ``pipeline.modeling.reward``."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import builtin
from pipeline.compat import fix_cpu_4bit
from pipeline.config import LoraConfig, ModelConfig
from pipeline.util.errors import PipelineError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# What a training stage hands to the next: saved in the manifest as the stage's "model" output
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A saved model: a full model directory, or a LoRA adapter on a base."""

    path: str
    form: str  # "full" | "adapter" (not a stage kind)
    base: str | None = None  # for adapters: the base model path or Hub id

    def as_dict(self) -> dict[str, Any]:
        # the manifest keeps the key "kind" that run directories written before this name already hold
        return {"path": self.path, "kind": self.form, "base": self.base}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelRef:
        return cls(path=data["path"], form=data["kind"], base=data.get("base"))

    def lineage_base(self) -> str | None:
        """What a new adapter trained from this model is applied to: an adapter continued from here keeps
        this adapter's base; a new adapter on a full model belongs to that model."""
        return self.base if self.form == "adapter" else self.path


def resolve_name(name_or_path: str) -> str:
    """A built-in model's directory (built on first use); any other name as given."""
    return str(builtin.resolve(name_or_path)) if builtin.is_builtin(name_or_path) else name_or_path


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


def cannot_load(what: str, source: str, exc: OSError) -> str:
    """One message for a model or tokenizer that would not load; for a Hub id, how to run without the network."""
    if Path(source).exists():
        return f"cannot load the {what} of {source!r}: {exc}"
    if source.startswith(("/", "./", "../", "~")):  # a directory, not a Hub id
        return f"cannot load the {what} of {source!r}: no such directory (was it moved or deleted?)"
    from pipeline.util.network import offline_advice

    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return (
        f"cannot load the {what} of {source!r} from the Hugging Face Hub: {first.strip()} Check the id and "
        f"model.revision (a gated model needs `huggingface-cli login`). " + offline_advice(source)
    )


def load_tokenizer(cfg: ModelConfig, path: str | None = None, padding_side: str = "right"):
    """The tokenizer, its chat template reading the recipe's ``chat_template_kwargs`` (with the run's fixed date,
    see ``pipeline.run.context``) wherever a caller does not pass them."""
    from transformers import AutoTokenizer

    from pipeline.modeling.chat import RUN_DATE_KEY, with_template_defaults

    source = path or resolve_name(cfg.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(
            source, revision=None if path else cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as exc:
        raise PipelineError(cannot_load("tokenizer", source, exc)) from None
    if getattr(tok, "chat_template", None) and cfg.chat_template_kwargs:
        tok.chat_template = with_template_defaults(tok.chat_template, cfg.chat_template_kwargs, cfg.name_or_path)
    elif set(cfg.chat_template_kwargs) - {RUN_DATE_KEY}:
        raise PipelineError(f"model.chat_template_kwargs is set but the tokenizer of {source!r} has no chat template")
    if tok.pad_token is None:
        # Padding positions are masked out of the loss and attention, so reusing EOS is safe.
        tok.pad_token = tok.eos_token or tok.unk_token
        if tok.pad_token is None:
            raise PipelineError(f"the tokenizer of {source!r} has no pad, eos or unk token to pad with")
    tok.padding_side = padding_side
    return tok


def token_length(tokenizer, text_or_messages, prompt=None) -> int:
    """Tokens of a prompt or response as the trainers tokenize it (chat messages through the template).

    A message-list response is measured after its ``prompt`` (rendered together, minus the prompt with
    the generation prompt): strict templates refuse to render an assistant message alone."""
    from pipeline.modeling.chat import chat_ids, response_token_length

    if isinstance(text_or_messages, list):
        if isinstance(prompt, list) and text_or_messages and text_or_messages[0].get("role") == "assistant":
            return response_token_length(tokenizer, prompt, text_or_messages)
        return len(chat_ids(tokenizer, text_or_messages))
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
        raise PipelineError(cannot_load("model", source, exc)) from None
    if head == "reward":
        # The classifier reads the last token that is not pad_token_id, so it must be the id the tokenizer pads
        # with. Not config.eos_token_id: that is a list for Llama-3.1 ([128001, 128008, 128009]).
        model.config.pad_token_id = load_tokenizer(cfg, path=path).pad_token_id
    fix_cpu_4bit(model)
    return model


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

    if init is not None and init.form == "adapter":
        model = load_base(cfg, path=base_path(init))
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


def load_frozen_policy(cfg: ModelConfig, ref: ModelRef, device=None):
    """An earlier stage's policy for sampling or scoring: no adapter added, eval mode, on ``device``
    (a quantized model is placed by bitsandbytes when it loads)."""
    model = load_policy(cfg, None, init=ref, trainable=False)
    if cfg.quantization == "none" and device is not None:
        model.to(device)
    return model.eval()


def load_sampling_policy(cfg: ModelConfig, ref: ModelRef, device=None):
    """``load_frozen_policy`` for a policy that is only sampled (best-of-n, eval, label): an adapter is merged
    into this in-memory copy of its base (``merge_and_unload``), so each decoding step runs one matmul per
    layer instead of base + LoRA A + LoRA B. The adapter files on disk are only read.

    A quantized (4-bit / 8-bit) base keeps its adapter unmerged: merging would round base + delta back into
    4-bit blocks, so the model sampled would no longer be the one trained (the adapter learned against the
    rounded base, and its small delta is mostly lost to the rounding); dequantizing to merge instead would
    cost the full-precision memory the quantization is there to save."""
    from peft import PeftModel

    model = load_frozen_policy(cfg, ref, device)
    if ref.form == "adapter" and cfg.quantization == "none" and isinstance(model, PeftModel):
        model = model.merge_and_unload().eval()
    return model


def base_path(ref: ModelRef) -> str:
    if ref.base is None:
        raise PipelineError(f"adapter {ref.path} does not say which base model it belongs to")
    return resolve_name(ref.base)


def saved_ref(model, model_dir: Path, base: str) -> ModelRef:
    """How a model saved to ``model_dir`` (by the trainer) is handed to later stages."""
    from peft import PeftModel

    unwrapped = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    if isinstance(unwrapped, PeftModel):
        return ModelRef(path=str(model_dir), form="adapter", base=base)
    return ModelRef(path=str(model_dir), form="full")


def trainable_summary(model) -> dict[str, int]:
    # ds_numel: the full size of a parameter DeepSpeed ZeRO-3 has sharded across ranks
    size = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731
    total = sum(size(p) for p in model.parameters())
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    return {"parameters": int(total), "trainable_parameters": int(trainable)}
