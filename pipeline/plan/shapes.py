"""Model shapes, exact: the model class instantiated on the ``meta`` device from its config.json (no weights
are read), its parameters counted by the module that owns them."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline import builtin
from pipeline.util.errors import PipelineError

# Model heads (the registry's StageKind.model_head): a causal LM, or a one-output sequence classifier ("score").
CAUSAL_LM = "causal_lm"
REWARD_HEAD = "reward"


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelShape:
    arch: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    embedding: int  # nn.Embedding parameters
    head: int  # output head (lm_head, or the reward model's score) parameters not shared with the embedding
    norms: int
    other: int  # biases and anything else
    linears: tuple[Linear, ...]  # every nn.Linear except the output head
    total: int
    tied: bool

    @property
    def linear_weights(self) -> int:
        return sum(x.in_features * x.out_features for x in self.linears)

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (what ZeRO-3 / FSDP gather at a time)."""
        return (self.total - self.embedding - self.head) // max(self.layers, 1)


def config_source(name_or_path: str) -> str:
    """Where the config.json is read from: a built-in model's directory (built on first use), or as given."""
    if builtin.is_builtin(name_or_path):
        return str(builtin.resolve(name_or_path))
    if Path(name_or_path).is_dir() and not (Path(name_or_path) / "config.json").is_file():
        raise PipelineError(f"model.name_or_path: {name_or_path} is a directory without config.json")
    return name_or_path


def load_model_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's transformers config, offline: a local directory, a built-in, or the HF cache."""
    from transformers import AutoConfig

    source = config_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(
            f"model.name_or_path: cannot read the config.json of {name_or_path!r} offline ({reason[:200]}); "
            "give a local directory with config.json (--set model.name_or_path=DIR), or pre-download it into the "
            f"Hugging Face cache (huggingface-cli download {name_or_path} config.json)"
        ) from None


@lru_cache(maxsize=16)
def model_shape(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, head: str = CAUSAL_LM
) -> ModelShape:
    """Exact parameter counts by category. ``head``: causal_lm, or reward (a one-output sequence classifier)."""
    return shape_of_config(load_model_config(name_or_path, revision, trust_remote_code), head)


def shape_of_config(cfg, head: str = CAUSAL_LM) -> ModelShape:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if head == REWARD_HEAD:
            cfg = copy.deepcopy(cfg)
            cfg.num_labels = 1  # a reward model: one output
            model = AutoModelForSequenceClassification.from_config(cfg)
        else:
            model = AutoModelForCausalLM.from_config(cfg)
    return shape_of_model(model, head)


def shape_of_model(model, head: str = CAUSAL_LM) -> ModelShape:
    """Counts every parameter once (a tied output head is the embedding) by the module that owns it."""
    import torch

    out_head = model.get_output_embeddings() if head != REWARD_HEAD else getattr(model, "score", None)
    counts = {"embedding": 0, "head": 0, "norms": 0, "other": 0}
    linears, seen = [], set()
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            n = param.numel()
            if module is out_head:
                counts["head"] += n
            elif isinstance(module, torch.nn.Embedding):
                counts["embedding"] += n
            elif isinstance(module, torch.nn.Linear) and pname == "weight":
                linears.append(Linear(name, module.in_features, module.out_features))
            elif "norm" in type(module).__name__.lower():
                counts["norms"] += n
            else:
                counts["other"] += n
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    tied = out_head is not None and any(p is out_head.weight for p in model.get_input_embeddings().parameters())
    return ModelShape(
        arch=type(model).__name__,
        hidden=cfg.hidden_size,
        intermediate=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
        layers=cfg.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=cfg.vocab_size,
        linears=tuple(linears),
        total=sum(p.numel() for p in model.parameters()),
        tied=tied,
        **counts,
    )


@dataclass(frozen=True)
class ModuleInfo:
    name: str  # as named_modules() gives it, e.g. model.layers.0.self_attn.q_proj
    type: str  # its class name
    lora: bool  # a layer peft's LoRA can wrap (Linear, Embedding, Conv, transformers' Conv1D)


@lru_cache(maxsize=8)
def module_infos(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False
) -> tuple[ModuleInfo, ...]:
    """Every module of the causal LM, from its config.json on the ``meta`` device (no weights): what LoRA's
    ``target_modules`` and ``modules_to_save`` are matched against."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    cfg = load_model_config(name_or_path, revision, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    wrappable = (
        torch.nn.Linear,
        torch.nn.Embedding,
        torch.nn.Conv1d,
        torch.nn.Conv2d,
        torch.nn.Conv3d,
        torch.nn.MultiheadAttention,
        Conv1D,
    )
    return tuple(
        ModuleInfo(name, type(module).__name__, isinstance(module, wrappable))
        for name, module in model.named_modules()
        if name
    )
