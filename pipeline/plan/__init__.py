"""Will each stage fit on my GPU? A peak-memory estimate per stage, term by term (``pipeline plan``).

Parameter counts are exact: the model class is instantiated on the ``meta`` device from its config.json
(no weights are read). Bytes follow what this stack does with those parameters:

- weights by dtype; 4-bit NF4 packs two weights a byte plus one absmax per 64 weights (fp32, or 8-bit with
  fp32 second-level constants under double quantization); 8-bit keeps an fp32 scale per output row. Only
  the linear layers of the decoder are quantized; embeddings, the output head and norms stay in the model
  dtype, and peft's ``prepare_model_for_kbit_training`` casts those to fp32 for training;
- LoRA weights are fp32 (peft upcasts bf16/fp16 adapters), ``all-linear`` is every nn.Linear but the
  output head (peft's rule); a model loaded in bf16 keeps its gradients and torch AdamW states in bf16;
- activations of the decoder layers as saved for backward (or, with activation checkpointing, each
  layer's input plus one layer recomputed); TRL's SFT and DPO trainers score tokens through a chunked
  "fused" LM head, so the full (tokens x vocabulary) logits are never materialised there: what they cost is
  a tile buffer and fp32 gradient accumulators; generation keeps one step's logits over the vocabulary;
- DeepSpeed ZeRO / FSDP divide what they shard by the number of processes.

The estimate is for a CUDA GPU (``dtype: auto`` and ``precision: auto`` are taken as bf16) and adds a fixed
allowance, CUDA_CONTEXT_BYTES, for the CUDA context, cuBLAS workspaces and allocator fragmentation.
torch and transformers are imported only inside the functions that need them.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.config import BUILTIN_TINY_MODEL, Recipe, apply_override, recipe_from_dict
from pipeline.util.errors import PipelineError
from pipeline.util.text import suggest

GIB = 1024**3
MIB = 1024**2
# CUDA context (~0.5 GiB with cuBLAS/cuDNN loaded) + allocator fragmentation slack: not in
# torch.cuda.max_memory_allocated, but part of what nvidia-smi shows and what an OOM is measured against.
CUDA_CONTEXT_BYTES = 1 * GIB
# Prompt length assumed for best-of-n and eval when not given (prompts have no length limit in a recipe).
DEFAULT_PROMPT_TOKENS = 256
# TRL's chunked log-prob head (trl/kernels/chunked_logprob.py): tiles of 4096 tokens x 32768 vocabulary.
FUSED_TOKEN_TILE, FUSED_VOCAB_TILE = 4096, 32768
NF4_BLOCK = 64  # bitsandbytes 4-bit block size (one absmax per 64 weights)
DQ_BLOCK = 256  # double quantization: one fp32 constant per 256 absmax values
BNB_OPT_BLOCK = 256  # bitsandbytes 8-bit optimizer states: one fp32 absmax per 256 values
BNB_MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit states in bitsandbytes optimizers


# ------------------------------------------------------------------------------------------------
# Optimizers: bytes of state per trainable parameter
# ------------------------------------------------------------------------------------------------


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


def parse_gpu_memory(text: str | int | float | None) -> int | None:
    """'24GiB', '24GB', '80G', '24' (GiB), '16384MiB' -> bytes. GB and G are read as GiB: GPU memory sizes
    on spec sheets ('24 GB', '80 GB') are binary."""
    if text is None or text == "":
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*", str(text).lower())
    if not match or float(match.group(1)) <= 0:
        raise PipelineError(f"--gpu-memory {text!r}: not a memory size; give e.g. 24GiB, 24GB, 80G or 24 (GiB)")
    unit = (match.group(2) or "g")[0]
    return int(float(match.group(1)) * {"m": MIB, "g": GIB, "t": 1024 * GIB}[unit])


def gib(n: float) -> str:
    return f"{n / GIB:.2f}" if abs(n) >= 0.1 * GIB or n == 0 else f"{n / GIB:.3f}"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


# ------------------------------------------------------------------------------------------------
# Model shapes, exact: the class instantiated on the meta device
# ------------------------------------------------------------------------------------------------


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
    if name_or_path == BUILTIN_TINY_MODEL:
        from pipeline.builtin.tiny_model import tiny_model_path

        return str(tiny_model_path())
    if name_or_path.startswith("builtin:"):
        raise PipelineError(
            f"model.name_or_path: unknown built-in model {name_or_path!r}; the built-in is {BUILTIN_TINY_MODEL!r}"
        )
    if Path(name_or_path).is_dir() and not (Path(name_or_path) / "config.json").is_file():
        raise PipelineError(f"model.name_or_path: {name_or_path} is a directory without config.json")
    return name_or_path


def load_model_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's transformers config, offline: a local directory, the built-in, or the HF cache."""
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
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, head: str = "causal_lm"
) -> ModelShape:
    """Exact parameter counts by category. ``head``: causal_lm, or reward (a one-output sequence classifier)."""
    return shape_of_config(load_model_config(name_or_path, revision, trust_remote_code), head)


def shape_of_config(cfg, head: str = "causal_lm") -> ModelShape:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if head == "reward":
            cfg = copy.deepcopy(cfg)
            cfg.num_labels = 1  # a reward model: one output
            model = AutoModelForSequenceClassification.from_config(cfg)
        else:
            model = AutoModelForCausalLM.from_config(cfg)
    return shape_of_model(model, head)


def shape_of_model(model, head: str = "causal_lm") -> ModelShape:
    """Counts every parameter once (a tied output head is the embedding) by the module that owns it."""
    import torch

    out_head = model.get_output_embeddings() if head != "reward" else getattr(model, "score", None)
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


# ------------------------------------------------------------------------------------------------
# What a stage runs: resolved from the recipe
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distribution:
    kind: str = "single"  # single | ddp | zero1 | zero2 | zero3 | fsdp
    processes: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    source: str | None = None

    def describe(self) -> str:
        extra = " + optimizer offload" if self.offload_optimizer else ""
        extra += " + parameter offload" if self.offload_params else ""
        return f"{self.kind} x{self.processes}{extra}" if self.kind != "single" else "1 process"


def read_launch(path: str | None, processes: int | None = None) -> Distribution:
    """How a stage is launched: the accelerate config (``launch:`` or --launch), --num-processes overriding it."""
    if not path:
        return Distribution(kind="ddp" if (processes or 1) > 1 else "single", processes=processes or 1)
    import yaml

    if not Path(path).is_file():
        raise PipelineError(f"launch: accelerate config file not found: {path}")
    settings = yaml.safe_load(Path(path).read_text()) or {}
    n = processes or int(settings.get("num_processes", 1) or 1)
    kind = str(settings.get("distributed_type", "NO")).upper()
    ds = settings.get("deepspeed_config") or {}
    fsdp = settings.get("fsdp_config") or {}
    if kind == "DEEPSPEED":
        return Distribution(
            f"zero{int(ds.get('zero_stage', 2))}",
            n,
            str(ds.get("offload_optimizer_device", "none")) != "none",
            str(ds.get("offload_param_device", "none")) != "none",
            path,
        )
    if kind == "FSDP":
        return Distribution(
            "fsdp", n, bool(fsdp.get("fsdp_offload_params")), bool(fsdp.get("fsdp_offload_params")), path
        )
    return Distribution("ddp" if n > 1 else "single", n, source=path)


@dataclass(frozen=True)
class Setup:
    """Everything the memory model needs about one stage."""

    kind: str
    head: str  # causal_lm | reward
    weight_bytes: int  # bytes per weight of the model dtype
    act_bytes: int  # activation bytes (2 under bf16/fp16 compute)
    quantization: str
    quant_double: bool
    lora: Any  # pipeline.config.LoraConfig or None
    checkpointing: bool
    optim: str = "adamw_torch"
    sequences: int = 0  # per micro-batch and process (DPO / reward: chosen + rejected)
    length: int = 0
    grad_accum: int = 1
    reference: str = "none"  # none | copy | adapter (DPO)
    # generation
    gen_batch: int = 0  # sequences sampled at once (prompts x n)
    gen_prompts: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    sampling: bool = False
    top_p: float = 1.0
    scorer: bool = False  # a reward model resident next to the policy
    scorer_batch: int = 0
    extra_policies: int = 0  # eval: the reference and a policy at once


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
TRAINING_KINDS = ("sft", "reward", "dpo", "grpo")


def stage_setup(recipe: Recipe, name: str, prompt_tokens: int | None = None) -> Setup:
    stage, model = recipe.stage(name), recipe.model
    if stage.kind not in ("sft", "reward", "dpo", "grpo", "bon", "eval"):  # the kinds this memory model knows
        raise PipelineError(f"stage {name!r}: plan has no memory model for stage kind {stage.kind!r}")
    wb = _DTYPE_BYTES[model.dtype]
    common = dict(
        weight_bytes=wb,
        quantization=model.quantization,
        quant_double=model.quant.double_quant,
        lora=recipe.lora,
        checkpointing=model.gradient_checkpointing,
    )
    if stage.kind in TRAINING_KINDS:
        train = stage.train
        # fp32 weights without autocast compute in fp32; otherwise matmul outputs are bf16/fp16
        act = 4 if (train.precision == "fp32" and wb == 4) else 2
        pair = 2 if stage.kind in ("reward", "dpo") else 1  # chosen and rejected in one forward
        reference = "none"
        if (stage.kind == "dpo" and not stage.precompute_ref_log_probs) or (stage.kind == "grpo" and stage.beta > 0):
            reference = "adapter" if recipe.lora is not None else "copy"
        # GRPO trains on batch_size prompts x num_generations completions of prompt + max_new_tokens tokens
        group = stage.num_generations if stage.kind == "grpo" else 1
        length = (prompt_tokens or DEFAULT_PROMPT_TOKENS) + stage.max_new_tokens if stage.kind == "grpo" else None
        return Setup(
            kind=stage.kind,
            head="reward" if stage.kind == "reward" else "causal_lm",
            act_bytes=act,
            optim=train.optim,
            sequences=pair * group * train.batch_size,
            length=length or stage.data.max_length,
            grad_accum=train.gradient_accumulation_steps,
            reference=reference,
            **common,
        )
    prompt = prompt_tokens or DEFAULT_PROMPT_TOKENS
    if stage.kind == "bon":
        return Setup(
            kind="bon",
            head="causal_lm",
            act_bytes=2 if wb == 2 else 4,
            gen_batch=stage.batch_size * stage.n,
            gen_prompts=stage.batch_size,
            prompt_tokens=prompt,
            new_tokens=stage.max_new_tokens,
            sampling=stage.temperature > 0,
            top_p=stage.top_p,
            scorer=stage.scorer.reward_from is not None,
            scorer_batch=stage.scorer.batch_size,
            **common,
        )
    # eval: greedy decoding of batch_size prompts; KL samples score batch_size sequences with full logits
    return Setup(
        kind="eval",
        head="causal_lm",
        act_bytes=2 if wb == 2 else 4,
        gen_batch=stage.batch_size,
        gen_prompts=stage.batch_size,
        prompt_tokens=prompt,
        new_tokens=stage.max_new_tokens,
        sampling=stage.kl_samples > 0,
        scorer=stage.reward_from is not None,
        scorer_batch=stage.batch_size,
        extra_policies=1,
        **common,
    )


# ------------------------------------------------------------------------------------------------
# Terms
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """A trainable parameter tensor: what its gradient and optimizer states are sized by."""

    numel: int
    rows: int  # first dimension (Adafactor factors matrices into rows + columns)
    bytes: int  # bytes per element of the parameter (and of its gradient)
    embedding: bool = False  # HF Trainer keeps 32-bit bitsandbytes states for nn.Embedding weights


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """Packed 4-bit weights + their absmax constants (bitsandbytes blockwise, blocksize 64)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    absmax = blocks + 4 * math.ceil(blocks / DQ_BLOCK) if double_quant else 4 * blocks
    return math.ceil(numel / 2) + absmax


def lora_targets(shape: ModelShape, lora) -> list[Linear]:
    """The linear layers peft puts LoRA on: all-linear is every nn.Linear except the output head."""
    if lora.target_modules == "all-linear":
        return list(shape.linears)
    names = lora.target_modules
    return [x for x in shape.linears if any(x.name == t or x.name.endswith("." + t) for t in names)]


def lora_tensors(shape: ModelShape, lora) -> list[Tensor]:
    """LoRA A (r x in) and B (out x r) per target, fp32 (peft upcasts adapters of bf16/fp16 models)."""
    out = []
    for x in lora_targets(shape, lora):
        out += [Tensor(lora.r * x.in_features, lora.r, 4), Tensor(lora.r * x.out_features, x.out_features, 4)]
    return out


def saved_module_tensors(shape: ModelShape, lora, s: Setup) -> list[Tensor]:
    """modules_to_save: trainable full copies (the reward model's score head is always one, task SEQ_CLS)."""
    names = set(lora.modules_to_save or [])
    out = []
    if s.head == "reward" or names & {"lm_head", "score"}:
        out.append(Tensor(shape.head, shape.vocab if s.head != "reward" else 1, s.weight_bytes))
    if names & {"embed_tokens", "wte", "word_embeddings"}:
        out.append(Tensor(shape.embedding, shape.vocab, s.weight_bytes, embedding=True))
    return out


def trainable_tensors(shape: ModelShape, s: Setup, dist: Distribution) -> list[Tensor]:
    if s.lora is not None:
        return lora_tensors(shape, s.lora) + saved_module_tensors(shape, s.lora, s)
    # FSDP2 (accelerate) upcasts trainable parameters to fp32 master weights before sharding
    b = 4 if dist.kind == "fsdp" else s.weight_bytes
    tensors = [Tensor(x.in_features * x.out_features, x.out_features, b) for x in shape.linears]
    tensors.append(Tensor(shape.embedding, shape.vocab, b, embedding=True))
    if shape.head:
        tensors.append(Tensor(shape.head, shape.vocab if s.head != "reward" else 1, b))
    # norms and biases: many small tensors (below bitsandbytes' 8-bit threshold)
    tensors.append(Tensor(shape.norms + shape.other, 1, b))
    return tensors


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


def weight_terms(shape: ModelShape, s: Setup, training: bool, label: str = "weights") -> dict[str, int]:
    """The model's own weights. Quantized: linear layers packed, the rest kept in the model dtype -- in fp32
    when trained through LoRA (peft's prepare_model_for_kbit_training casts them)."""
    dtype = {4: "fp32", 2: "bf16"}[s.weight_bytes]
    if s.quantization == "none":
        return {f"{label} ({dtype}, {count(shape.total)} params)": shape.total * s.weight_bytes}
    kept = shape.embedding + shape.head + shape.norms + shape.other
    kept_bytes = 4 if (training and s.lora is not None) else s.weight_bytes
    if s.quantization == "4bit":
        packed = sum(nf4_bytes(x.in_features * x.out_features, s.quant_double) for x in shape.linears)
        what = "NF4 + double-quant constants" if s.quant_double else "NF4 + fp32 absmax"
    else:
        packed = sum(x.in_features * x.out_features + 4 * x.out_features for x in shape.linears)
        what = "int8 + fp32 row scales"
    return {
        f"{label}: linear layers ({what})": packed,
        f"{label}: embeddings, head, norms ({'fp32' if kept_bytes == 4 else dtype})": kept * kept_bytes,
    }


def per_layer_activation_bytes(shape: ModelShape, s: Setup) -> int:
    """Bytes per token that one decoder layer saves for backward (Llama-family layer, SDPA attention).

    RMSNorm x2: an fp32 copy of its input and its normalised output; attention: q, k, v after RoPE, the
    SDPA output and the contiguous copy o_proj reads, fp32 log-sum-exp per head (no seq x seq matrix with
    flash / memory-efficient SDPA); gated MLP: gate, act(gate), up and their product. LoRA with dropout
    adds, per target, the dropped-out input and its mask.
    """
    h, i = shape.hidden, shape.intermediate
    # A k-bit base prepared for LoRA training has fp32 embeddings and norms, so the residual stream, the norm
    # outputs and the (fp32) LoRA paths are fp32 inside each layer too (measured on an H100: planning them in
    # bf16 under-estimated QLoRA peaks by 14-26%).
    ab = residual_bytes(s) if s.quantization != "none" and s.lora is not None else s.act_bytes
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per = 2 * (4 * h + ab * h) + ab * (q + 2 * kv) + 2 * ab * q + 4 * shape.heads + 4 * ab * i
    if s.lora is not None:
        targets = lora_targets(shape, s.lora)
        per_layer_targets = [x for x in targets if ".layers." in f".{x.name}." or x.name.startswith("layers.")]
        share = len(per_layer_targets) / max(shape.layers, 1)
        width = sum(x.in_features for x in per_layer_targets) / max(shape.layers, 1)
        if s.lora.dropout > 0:
            per += int((ab + 1) * width)
        per += int(ab * s.lora.r * share)
    return per


def residual_bytes(s: Setup) -> int:
    """The residual stream is fp32 when the embeddings are (fp32 weights, or a k-bit base prepared for training)."""
    return 4 if s.weight_bytes == 4 or (s.quantization != "none" and s.lora is not None) else s.act_bytes


def activation_terms(shape: ModelShape, s: Setup) -> dict[str, int]:
    tokens = s.sequences * s.length
    per_layer = per_layer_activation_bytes(shape, s)
    rb = residual_bytes(s)
    grad_stream = 2 * tokens * shape.hidden * rb  # the gradient flowing down the residual stream (+ one in flight)
    desc = f"{s.sequences} seq x {s.length} tokens"
    if s.checkpointing:
        return {
            f"activations: layer inputs kept by checkpointing ({shape.layers} layers, {desc})": shape.layers
            * tokens
            * shape.hidden
            * rb,
            "activations: one layer recomputed in backward + residual gradients": tokens * per_layer + grad_stream,
        }
    return {
        f"activations: {shape.layers} layers ({desc}), no checkpointing": shape.layers * tokens * per_layer
        + grad_stream
    }


def head_terms(shape: ModelShape, s: Setup, head_trainable: bool, fused: bool) -> dict[str, int]:
    """What scoring the tokens costs: TRL's chunked LM head (no full logits), the full logits otherwise."""
    tokens, h, ab = s.sequences * s.length, shape.hidden, s.act_bytes
    if s.head == "reward":
        return {"reward head: final hidden states + scores": tokens * (h * ab + 4)}
    if not fused:
        # bf16 logits, their fp32 upcast, log-softmax output and its gradient
        return {
            f"logits: {tokens} tokens x {shape.vocab} vocab (bf16 + fp32 copies, gradient)": tokens
            * shape.vocab
            * (ab + 12)
        }
    tile = min(tokens, FUSED_TOKEN_TILE) * min(shape.vocab, FUSED_VOCAB_TILE) * ab
    total = tile + tokens * h * (ab + 4)  # hidden states it saves + the fp32 hidden-state gradient accumulator
    label = "LM head (TRL chunked log-probs): tile + fp32 hidden gradient"
    if head_trainable:
        # the fp32 weight-gradient accumulator, then its copy in the parameter dtype
        total += shape.vocab * h * (4 + s.weight_bytes)
        label += " + fp32 head-weight gradient"
    return {label: total}


@lru_cache(maxsize=1)
def trl_fuses_lm_head() -> bool:
    """Whether the installed TRL scores tokens through its chunked LM head (checked without importing trl)."""
    import importlib.util

    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return True  # the trl this package pins does
    utils = Path(list(spec.submodule_search_locations)[0]) / "trainer" / "utils.py"
    return utils.is_file() and "def add_fused_lm_head" in utils.read_text(errors="ignore")


# ------------------------------------------------------------------------------------------------
# One stage's peak
# ------------------------------------------------------------------------------------------------


@dataclass
class StagePlan:
    name: str
    kind: str
    summary: str  # one line: model, method, batch, launch
    terms: dict[str, int]  # held at the peak; they add up to peak_bytes
    other_terms: dict[str, int]  # held at another time of the step (not at the peak)
    phase: str
    gpu_memory: int | None = None
    notes: list[str] = field(default_factory=list)
    suggestions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.peak_bytes <= self.gpu_memory

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "summary": self.summary,
            "peak_bytes": self.peak_bytes,
            "peak_gib": round(self.peak_bytes / GIB, 3),
            "phase": self.phase,
            "terms": dict(_largest_first(self.terms)),
            "other_terms": dict(_largest_first(self.other_terms)),
            "fits": self.fits,
            "gpu_memory_bytes": self.gpu_memory,
            "notes": self.notes,
            "suggestions": self.suggestions,
        }


def _largest_first(terms: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(((k, int(v)) for k, v in terms.items() if v), key=lambda kv: -kv[1])


def _shard(terms: dict[str, int], n: int, what: str) -> dict[str, int]:
    return {f"{k} / {n} ({what})": v // n for k, v in terms.items()}


def training_weight_terms(shape: ModelShape, s: Setup, dist: Distribution) -> dict[str, int]:
    """The weights a training stage holds: the (quantized) model, LoRA, modules_to_save, DPO's reference."""
    weights = weight_terms(shape, s, training=True)
    if s.lora is not None:
        weights["LoRA adapter (fp32)"] = sum(t.numel * t.bytes for t in lora_tensors(shape, s.lora))
        saved = sum(t.numel * t.bytes for t in saved_module_tensors(shape, s.lora, s))
        weights["trainable copies of modules_to_save"] = saved
    elif dist.kind == "fsdp":  # trainable weights were upcast to fp32
        weights = {"weights (fp32 master, upcast by FSDP)": shape.total * 4}
    if s.reference == "copy":
        weights["reference model (frozen full copy)"] = shape.total * s.weight_bytes
    elif s.reference == "adapter":
        adapter = sum(t.numel * t.bytes for t in lora_tensors(shape, s.lora))
        weights["reference adapter (frozen copy of the SFT adapter)"] = adapter
    return weights


def training_plan(shape: ModelShape, s: Setup, dist: Distribution) -> tuple[dict, dict, str, list[str]]:
    """(terms at the peak, other terms, peak phase, notes) of one optimizer step of a training stage."""
    spec = optim_spec(s.optim)
    tensors = trainable_tensors(shape, s, dist)
    n, deepspeed = dist.processes, dist.kind.startswith("zero")
    grads = sum(t.numel * t.bytes for t in tensors)
    n_train = sum(t.numel for t in tensors)
    notes: list[str] = []
    weights = training_weight_terms(shape, s, dist)
    master = deepspeed and s.weight_bytes < 4  # DeepSpeed's optimizer steps an fp32 master copy
    fixed: dict[str, int] = {}
    states = optimizer_state_bytes(spec, tensors, master_fp32=master or dist.kind == "fsdp")
    opt_label = f"optimizer states ({s.optim}, {count(n_train)} trainable)"
    if master:
        fixed["fp32 master weights (DeepSpeed)"] = 4 * n_train
    fixed[opt_label] = states
    step_temp = states // max(spec.states, 1) if spec.foreach_temp and not deepspeed else 0
    gathered = 0
    if deepspeed or dist.kind == "fsdp":
        fixed = _shard(fixed, n, "sharded") if not dist.offload_optimizer else {}
        if dist.offload_optimizer:
            notes.append("optimizer states and fp32 master weights live in CPU RAM (offload)")
        if dist.kind in ("zero3", "fsdp"):
            weights = {} if dist.offload_params else _shard(weights, n, "sharded")
            # the layer being computed and the next one, gathered in 16 bits
            gathered = 2 * shape.layer_params * 2
        if dist.kind != "zero1":
            grads //= n
        step_temp //= n
    fixed.update(weights)
    if gathered:
        fixed["gathered parameters: current + prefetched layer (bf16)"] = gathered
    if dist.kind == "ddp":
        fixed["DDP gradient buckets (a copy of the gradients)"] = grads
    fixed["CUDA context + allocator allowance"] = CUDA_CONTEXT_BYTES
    fwd_bwd = activation_terms(shape, s)
    fwd_bwd.update(head_terms(shape, s, head_trainable=s.lora is None, fused=trl_fuses_lm_head()))
    step = {
        "gradients"
        + (f" / {n} (sharded)" if (deepspeed and dist.kind != "zero1") or dist.kind == "fsdp" else ""): grads
    }
    if step_temp:
        step["AdamW foreach temporary (one state-sized buffer during the step)"] = step_temp
    if master and dist.kind != "zero3":
        step["fp32 gradient partition (DeepSpeed step)"] = 4 * n_train // (n if dist.kind != "zero1" else 1)
    step_grads = {k: v for k, v in step.items() if k.startswith("gradients")}
    if s.grad_accum > 1:  # accumulated gradients are held through the next micro-batch's forward and backward
        fwd_bwd.update(step_grads)
    else:  # gradients are set to None after each optimizer step, so none exist at the activation peak
        step_grads = {}
    phases = {"forward/backward": fwd_bwd, "optimizer step": step}
    if s.reference != "none":
        # the reference log-probs are computed (without gradients) before the policy's forward, so their
        # transient memory is freed before the policy's activations exist (measured: the peaks do not add)
        phases["reference forward"] = {
            "reference forward (no grad, transient)": _no_grad_forward_bytes(shape, s, s.sequences * s.length)
        }
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    at_peak = phases[phase]
    other = {
        k: v
        for name, terms in phases.items()
        if name != phase
        for k, v in terms.items()
        if k not in at_peak and k not in step_grads
    }
    return {**fixed, **at_peak}, other, phase, notes


def _no_grad_forward_bytes(shape: ModelShape, s: Setup, tokens: int) -> int:
    """Transient memory of a forward without autograd: one layer's MLP intermediates and q/k/v at a time,
    plus the LM-head tile."""
    q = shape.heads * shape.head_dim
    per_token = s.act_bytes * (3 * shape.intermediate + 3 * q) + shape.hidden * residual_bytes(s)
    return tokens * per_token + min(tokens, FUSED_TOKEN_TILE) * min(shape.vocab, FUSED_VOCAB_TILE) * s.act_bytes


def generation_plan(shape: ModelShape, s: Setup, scorer: ModelShape | None) -> tuple[dict, dict, str, list[str]]:
    """Best-of-n / eval: the resident models, then the largest of prefill, decoding (KV cache + one step's
    logits), the eval KL estimate's full log-softmax, and reward-model scoring."""
    fixed = weight_terms(shape, s, training=False, label="policy weights")
    if s.extra_policies:
        fixed.update(weight_terms(shape, s, training=False, label="reference policy weights"))
    if scorer is not None:
        fixed.update(weight_terms(scorer, s, training=False, label="reward model weights"))
    if s.lora is not None:
        adapters = 1 + s.extra_policies + (scorer is not None)
        fixed["LoRA adapters (fp32)"] = adapters * sum(t.numel * t.bytes for t in lora_tensors(shape, s.lora))
    fixed["CUDA context + allocator allowance"] = CUDA_CONTEXT_BYTES
    ab, seq = s.act_bytes, s.prompt_tokens + s.new_tokens
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * ab
    kv = kv_per_token * s.gen_batch * seq
    sample_bytes = (8 if s.sampling else 0) + (21 if s.top_p < 1 else 0)  # fp32 softmax (+ top-p sort, cumsum)
    phases: dict[str, dict[str, int]] = {
        "decoding": {
            f"KV cache: {s.gen_batch} sequences x {seq} tokens (+ one layer's growth copy)": kv
            + kv // max(shape.layers, 1),
            f"logits of one decoding step ({s.gen_batch} x {shape.vocab} vocab)": s.gen_batch
            * shape.vocab
            * (ab + sample_bytes),
        },
        "prefill": {
            f"prefill: KV cache of {s.gen_prompts} prompts x {s.prompt_tokens} tokens, repeated": kv_per_token
            * s.gen_prompts
            * s.prompt_tokens
            * 2,
            "prefill: one layer's intermediates + attention mask": _no_grad_forward_bytes(
                shape, s, s.gen_prompts * s.prompt_tokens
            )
            + s.gen_prompts * s.prompt_tokens**2,
        },
    }
    if s.kind == "eval" and s.sampling:
        # generation.completion_logprobs: log_softmax over the full logits of 64 sequences at a time
        phases["KL estimate"] = {
            f"KL estimate: full log-softmax of 64 sequences x {seq} tokens x {shape.vocab} vocab": 64
            * seq
            * shape.vocab
            * (ab + 8)
        }
    if scorer is not None:
        phases["scoring"] = {
            "reward-model scoring forward (no grad)": _no_grad_forward_bytes(scorer, s, s.scorer_batch * seq)
        }
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    other = {k: v for name, terms in phases.items() if name != phase for k, v in terms.items()}
    notes = [
        f"assumes prompts of {s.prompt_tokens} tokens (--prompt-tokens to change); every process holds whole models"
    ]
    return {**fixed, **phases[phase]}, other, phase, notes


def _describe(shape: ModelShape, s: Setup, dist: Distribution) -> str:
    quant = {"none": {4: "fp32", 2: "bf16"}[s.weight_bytes], "4bit": "4-bit NF4", "8bit": "8-bit"}[s.quantization]
    method = (
        f"{quant} + LoRA r={s.lora.r}"
        if s.lora is not None
        else (f"{quant} full" if s.kind in TRAINING_KINDS else quant)
    )
    parts = [f"{shape.arch} ({count(shape.total)} params)", method]
    if s.kind in TRAINING_KINDS:
        pair = " (chosen + rejected)" if s.kind in ("reward", "dpo") else ""
        parts += [
            f"{s.sequences} x {s.length} tokens{pair}",
            f"checkpointing {'on' if s.checkpointing else 'off'}",
            s.optim,
        ]
        if s.kind in ("dpo", "grpo"):
            parts.append(
                {
                    "none": "precomputed reference" if s.kind == "dpo" else "no reference (beta 0)",
                    "copy": "reference: full copy",
                    "adapter": "reference: frozen adapter",
                }[s.reference]
            )
    else:
        parts.append(f"{s.gen_batch} sequences x ({s.prompt_tokens} + {s.new_tokens}) tokens")
    parts.append(dist.describe())
    return ", ".join(parts)


def plan_stage(
    recipe: Recipe,
    name: str,
    gpu_memory: int | None = None,
    dist: Distribution | None = None,
    prompt_tokens: int | None = None,
) -> StagePlan:
    dist = dist or read_launch(recipe.launch)
    stage = recipe.stage(name)
    s = stage_setup(recipe, name, prompt_tokens)
    m = recipe.model
    if s.kind in TRAINING_KINDS:
        shape = model_shape(m.name_or_path, m.revision, m.trust_remote_code, s.head)
        terms, other, phase, notes = training_plan(shape, s, dist)
        if s.quantization == "4bit" and dist.kind == "zero3":
            notes.append("4-bit QLoRA under ZeRO-3 is not supported by this pipeline (see README)")
        if s.optim.startswith("paged_"):
            notes.append(
                "paged optimizer states live in CUDA unified memory: counted here, not in torch.cuda.max_memory_allocated"
            )
    else:
        shape = model_shape(m.name_or_path, m.revision, m.trust_remote_code, "causal_lm")
        scorer = model_shape(m.name_or_path, m.revision, m.trust_remote_code, "reward") if s.scorer else None
        terms, other, phase, notes = generation_plan(shape, s, scorer)
    return StagePlan(name, stage.kind, _describe(shape, s, dist), terms, other, phase, gpu_memory, notes)


# ------------------------------------------------------------------------------------------------
# Suggestions: each change re-planned with the change applied
# ------------------------------------------------------------------------------------------------


def _changed(recipe: Recipe, overrides: list[str]) -> Recipe:
    raw = recipe.resolved_dict()
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw)


def candidate_changes(recipe: Recipe, name: str, dist: Distribution) -> list[tuple[str, list[str], Distribution]]:
    """Changes that lower a stage's peak, as (description, --set overrides, launch)."""
    stage, model, out = recipe.stage(name), recipe.model, []
    key = f"stages.{name}"
    if stage.kind in TRAINING_KINDS:
        b, ga = stage.train.batch_size, stage.train.gradient_accumulation_steps
        for smaller in sorted({max(1, b // 2), max(1, b // 4), 1}, reverse=True):
            if smaller < b:
                out.append(
                    (
                        f"batch_size {b} -> {smaller}, gradient_accumulation_steps {ga} -> {ga * b // smaller} (same effective batch)",
                        [
                            f"{key}.train.batch_size={smaller}",
                            f"{key}.train.gradient_accumulation_steps={ga * b // smaller}",
                        ],
                        dist,
                    )
                )
        if not model.gradient_checkpointing:
            out.append(("activation checkpointing", ["model.gradient_checkpointing=true"], dist))
        if model.quantization != "4bit":
            lora = [] if recipe.lora is not None else ["lora.r=16"]
            out.append(
                ("4-bit NF4 base + LoRA (QLoRA)" + (" r=16" if lora else ""), ["model.quantization=4bit", *lora], dist)
            )
        spec = optim_spec(stage.train.optim)
        if spec.bits is None and spec.states >= 2 and recipe.lora is None:
            out.append(("8-bit optimizer states (paged_adamw_8bit)", [f"{key}.train.optim=paged_adamw_8bit"], dist))
        if stage.kind == "dpo" and not stage.precompute_ref_log_probs and recipe.lora is None:
            out.append(
                (
                    "precompute_ref_log_probs (no reference model during training)",
                    [f"{key}.precompute_ref_log_probs=true"],
                    dist,
                )
            )
        if dist.kind != "zero3" and model.quantization == "none":
            n = dist.processes if dist.processes > 1 else 8
            out.append(
                (
                    f"DeepSpeed ZeRO-3 over {n} GPUs (launch/zero3.yaml, --num-processes {n})",
                    [],
                    Distribution("zero3", n),
                )
            )
    else:
        b = stage.batch_size
        for smaller in sorted({max(1, b // 2), max(1, b // 4), max(1, b // 8)}, reverse=True):
            if smaller < b:
                out.append(
                    (f"batch_size {b} -> {smaller} prompts per generation batch", [f"{key}.batch_size={smaller}"], dist)
                )
    return out


def suggest_changes(
    recipe: Recipe, name: str, plan: StagePlan, dist: Distribution, prompt_tokens: int | None
) -> list[dict[str, Any]]:
    """Each change re-planned; when none fits alone, all of them together."""
    found = []
    changes = candidate_changes(recipe, name, dist)
    for description, overrides, new_dist in changes:
        try:
            peak = plan_stage(_changed(recipe, overrides), name, plan.gpu_memory, new_dist, prompt_tokens).peak_bytes
        except PipelineError:
            continue
        found.append({"change": description, "set": overrides, "peak_bytes": peak, "fits": peak <= plan.gpu_memory})
    if found and not any(f["fits"] for f in found):
        # on the same GPUs: the smallest batch and every other recipe change at once
        same = [c for c in changes if c[2] is dist]
        keep = [c for c in same if not c[0].startswith("batch_size")] + [
            c for c in same if c[0].startswith("batch_size")
        ][-1:]
        overrides = [o for c in keep for o in c[1]]
        try:
            peak = plan_stage(_changed(recipe, overrides), name, plan.gpu_memory, dist, prompt_tokens).peak_bytes
            found.append(
                {
                    "change": "all recipe changes above together",
                    "set": overrides,
                    "peak_bytes": peak,
                    "fits": peak <= plan.gpu_memory,
                }
            )
        except PipelineError:
            pass
    return sorted(found, key=lambda f: (not f["fits"], f["peak_bytes"]))


# ------------------------------------------------------------------------------------------------
# Whole recipe, text, JSON, headline
# ------------------------------------------------------------------------------------------------


def plan_recipe(
    recipe: Recipe,
    stages: list[str] | None = None,
    gpu_memory: int | None = None,
    launch: str | None = None,
    num_processes: int | None = None,
    prompt_tokens: int | None = None,
    with_suggestions: bool = True,
) -> dict[str, StagePlan]:
    dist = read_launch(launch or recipe.launch, num_processes)
    plans = {}
    for name in stages or list(recipe.stages):
        plan = plan_stage(recipe, name, gpu_memory, dist, prompt_tokens)
        if with_suggestions and plan.fits is False:
            plan.suggestions = suggest_changes(recipe, name, plan, dist, prompt_tokens)
        plans[name] = plan
    return plans


def format_plan(plan: StagePlan) -> str:
    lines = [
        f"[{plan.name}] {plan.kind}: {plan.summary}",
        f"  peak {gib(plan.peak_bytes)} GiB, during the {plan.phase}:",
    ]
    lines += [f"  {gib(v):>8}  {k}" for k, v in _largest_first(plan.terms)]
    lines.append(f"  {gib(plan.peak_bytes):>8}  total (GiB)")
    if plan.other_terms:
        lines.append(
            "  not held at the peak: " + "; ".join(f"{k} {gib(v)}" for k, v in _largest_first(plan.other_terms))
        )
    lines += [f"  note: {n}" for n in plan.notes]
    if plan.gpu_memory is not None:
        spare = plan.gpu_memory - plan.peak_bytes
        if plan.fits:
            lines.append(f"  verdict: fits {gib(plan.gpu_memory)} GiB ({gib(spare)} GiB to spare)")
        else:
            lines.append(f"  verdict: does not fit {gib(plan.gpu_memory)} GiB (over by {gib(-spare)} GiB)")
            if plan.suggestions:
                lines.append("  to make it fit (each change re-planned):")
            for sug in plan.suggestions:
                sets = " ".join(f"--set {o}" for o in sug["set"])
                verdict = "fits" if sug["fits"] else "does not fit"
                lines.append(
                    f"    - {sug['change']}: {gib(sug['peak_bytes'])} GiB, {verdict}" + (f"   [{sets}]" if sets else "")
                )
    return "\n".join(lines)


def to_json(plans: dict[str, StagePlan], gpu_memory: int | None) -> str:
    return json.dumps(
        {
            "gpu_memory_bytes": gpu_memory,
            "cuda_context_bytes": CUDA_CONTEXT_BYTES,
            "stages": {name: plan.as_dict() for name, plan in plans.items()},
        },
        indent=1,
    )


def detected_gpu_memory() -> int | None:
    """Total memory of the current CUDA device, or None without CUDA (torch already imported by run)."""
    try:
        import torch

        return (
            int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
            if torch.cuda.is_available()
            else None
        )
    except Exception:  # noqa: BLE001 -- a headline never needs this badly enough to fail
        return None


def headline(recipe: Recipe, stage_name: str, gpu_memory: int | str | None = None) -> str:
    """One line for ``run`` to print before a stage: the estimated peak, its largest terms and, with a GPU
    size (given, or the current CUDA device's), the verdict."""
    memory = parse_gpu_memory(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    memory = memory if memory is not None else detected_gpu_memory()
    plan = plan_stage(recipe, stage_name, memory)
    largest = [(k, v) for k, v in _largest_first(plan.terms) if not k.startswith("CUDA context")][:3]
    top = ", ".join(f"{k.split(' (')[0].split(':')[0]} {gib(v)}" for k, v in largest)
    verdict = (
        ""
        if plan.fits is None
        else (
            f"; fits {gib(memory)} GiB" if plan.fits else f"; DOES NOT FIT {gib(memory)} GiB (pipeline plan for fixes)"
        )
    )
    return f"[{stage_name}] memory plan (CUDA GPU): peak ~{gib(plan.peak_bytes)} GiB ({top}){verdict}"


def main(args) -> int:
    """``pipeline plan``: the text report, or JSON on stdout with --json."""
    from pipeline.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    memory = parse_gpu_memory(args.gpu_memory)
    if args.num_processes is not None and args.num_processes < 1:
        raise PipelineError(f"--num-processes {args.num_processes}: must be at least 1")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    for name in stages or []:
        recipe.stage(name)
    plans = plan_recipe(recipe, stages, memory, args.launch, args.num_processes, args.prompt_tokens)
    if args.json:
        print(to_json(plans, memory))
        return 0
    print(
        f"memory plan for {args.recipe} (estimates for a CUDA GPU; CUDA context allowance {gib(CUDA_CONTEXT_BYTES)} GiB)\n"
    )
    print("\n\n".join(format_plan(p) for p in plans.values()))
    if memory is None:
        print("\n(give --gpu-memory, e.g. --gpu-memory 24GiB, for a verdict and suggestions)")
    return 0
