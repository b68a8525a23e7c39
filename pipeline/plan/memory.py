"""Will a stage fit on the GPU? Its peak memory, term by term, from its ``Setup`` and the model's exact shape.

Bytes follow what this stack does with the parameters:

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

What a stage runs comes from its kind's ``memory`` hook in the registry (``stage_setup``), which builds a
``Setup`` with ``training_setup`` or ``generation_setup``. The estimate is for a CUDA GPU (``dtype: auto``
and ``precision: auto`` are taken as bf16) and adds a fixed allowance, CUDA_CONTEXT_BYTES, for the CUDA
context, cuBLAS workspaces and allocator fragmentation. No torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.config import Recipe, registry
from pipeline.config.model import liger_installed
from pipeline.plan.launch import Distribution
from pipeline.plan.optimizers import Tensor, optim_spec, optimizer_state_bytes
from pipeline.plan.shapes import CAUSAL_LM, REWARD_HEAD, Linear, ModelShape
from pipeline.plan.units import GIB, count
from pipeline.util.errors import PipelineError

# CUDA context (~0.5 GiB with cuBLAS/cuDNN loaded) + allocator fragmentation slack: not in
# torch.cuda.max_memory_allocated, but part of what nvidia-smi shows and what an OOM is measured against.
CUDA_CONTEXT_BYTES = 1 * GIB
# Prompt length assumed for generation stages when not given (prompts have no length limit in a recipe).
DEFAULT_PROMPT_TOKENS = 256
# TRL's chunked log-prob head (trl/kernels/chunked_logprob.py): tiles of 4096 tokens x 32768 vocabulary.
FUSED_TOKEN_TILE, FUSED_VOCAB_TILE = 4096, 32768
NF4_BLOCK = 64  # bitsandbytes 4-bit block size (one absmax per 64 weights)
DQ_BLOCK = 256  # double quantization: one fp32 constant per 256 absmax values
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}


# ------------------------------------------------------------------------------------------------
# What a stage runs: built by its kind's memory hook
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """Everything the memory model needs about one stage."""

    kind: str  # the stage's kind, for the record (nothing here switches on it)
    head: str  # causal_lm | reward
    weight_bytes: int  # bytes per weight of the model dtype
    act_bytes: int  # activation bytes (2 under bf16/fp16 compute)
    quantization: str
    quant_double: bool
    lora: Any  # pipeline.config.LoraConfig or None
    checkpointing: bool
    kernels: str = "none"  # model.kernels as planned: none | liger | auto (auto: liger-kernel not installed here)
    training: bool = False  # one optimizer step is planned; otherwise generation (and scoring)
    optim: str = "adamw_torch"
    sequences: int = 0  # per micro-batch and process (with pairs: chosen + rejected)
    pairs: bool = False  # chosen and rejected of each pair go through one forward
    length: int = 0
    grad_accum: int = 1
    reference: str = "none"  # none | copy | adapter: a frozen reference policy held while training
    reference_label: str | None = None  # the summary's words for reference "none"; None: nothing to say
    precompute_change: str | None = None  # a stage setting that, set true, drops the reference from training
    # generation
    gen_batch: int = 0  # sequences sampled at once (prompts x n)
    gen_prompts: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    sampling: bool = False
    top_p: float = 1.0
    kl_estimate: bool = False  # a full log-softmax over sampled sequences (the KL to the reference)
    scorer: bool = False  # a reward model resident next to the policy
    scorer_batch: int = 0
    extra_policies: int = 0  # further policies held at once (eval: the reference)


class NoMemoryModel(PipelineError):
    """The stage's kind registered no ``memory`` hook: plan cannot estimate it."""


def stage_setup(recipe: Recipe, name: str, prompt_tokens: int | None = None) -> Setup:
    """The stage's Setup, from its kind's ``memory(recipe, name, prompt_tokens)`` hook."""
    kind = recipe.stage(name).kind
    memory = registry.get(kind).memory
    if memory is None:
        raise NoMemoryModel(f"stage {name!r}: kind {kind!r} has no memory model for plan")
    return memory(recipe, name, prompt_tokens)


def _model_fields(recipe: Recipe) -> dict[str, Any]:
    model = recipe.model
    return dict(
        weight_bytes=_DTYPE_BYTES[model.dtype],
        quantization=model.quantization,
        quant_double=model.quant.double_quant,
        lora=recipe.lora,
        checkpointing=model.gradient_checkpointing,
        # plan is for a CUDA GPU: auto is Liger there when liger-kernel is installed (looked up, not imported)
        kernels="liger"
        if model.kernels == "liger" or (model.kernels == "auto" and liger_installed())
        else model.kernels,
    )


def training_setup(
    recipe: Recipe,
    name: str,
    *,
    pairs: bool = False,
    group: int = 1,
    length: int | None = None,
    reference: bool = False,
    reference_label: str | None = None,
    precompute_change: str | None = None,
) -> Setup:
    """A training stage's Setup: ``train.batch_size`` rows (x2 with ``pairs``, x ``group`` completions each) of
    ``length`` tokens (default ``data.max_length``), the kind's registered model head, and with ``reference``
    a frozen reference policy (a copy of the model, or of the adapter under LoRA)."""
    stage, fields = recipe.stage(name), _model_fields(recipe)
    train = stage.train
    # fp32 weights without autocast compute in fp32; otherwise matmul outputs are bf16/fp16
    act = 4 if (train.precision == "fp32" and fields["weight_bytes"] == 4) else 2
    return Setup(
        kind=stage.kind,
        head=registry.get(stage.kind).model_head or CAUSAL_LM,
        act_bytes=act,
        training=True,
        optim=train.optim,
        sequences=(2 if pairs else 1) * group * train.batch_size,
        pairs=pairs,
        length=length or stage.data.max_length,
        grad_accum=train.gradient_accumulation_steps,
        reference=("adapter" if recipe.lora is not None else "copy") if reference else "none",
        reference_label=reference_label,
        precompute_change=precompute_change,
        **fields,
    )


def generation_setup(recipe: Recipe, name: str, prompt_tokens: int | None = None, **generation: Any) -> Setup:
    """A generation stage's Setup: the policy (a causal LM) sampling with ``generation`` (Setup's generation
    fields), prompts of ``prompt_tokens`` (default DEFAULT_PROMPT_TOKENS)."""
    fields = _model_fields(recipe)
    return Setup(
        kind=recipe.stage(name).kind,
        head=CAUSAL_LM,
        act_bytes=2 if fields["weight_bytes"] == 2 else 4,
        prompt_tokens=prompt_tokens or DEFAULT_PROMPT_TOKENS,
        **generation,
        **fields,
    )


# ------------------------------------------------------------------------------------------------
# Terms
# ------------------------------------------------------------------------------------------------


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
    if s.head == REWARD_HEAD or names & {"lm_head", "score"}:
        out.append(Tensor(shape.head, shape.vocab if s.head != REWARD_HEAD else 1, s.weight_bytes))
    if names & {"embed_tokens", "wte", "word_embeddings"}:
        out.append(Tensor(shape.embedding, shape.vocab, s.weight_bytes, embedding=True))
    return out


def trainable_tensors(shape: ModelShape, s: Setup, dist: Distribution) -> list[Tensor]:
    if s.lora is not None:
        return lora_tensors(shape, s.lora) + saved_module_tensors(shape, s.lora, s)
    # FSDP2 (accelerate) upcasts trainable parameters to fp32 master weights before sharding
    b = 4 if dist.strategy == "fsdp" else s.weight_bytes
    tensors = [Tensor(x.in_features * x.out_features, x.out_features, b) for x in shape.linears]
    tensors.append(Tensor(shape.embedding, shape.vocab, b, embedding=True))
    if shape.head:
        tensors.append(Tensor(shape.head, shape.vocab if s.head != REWARD_HEAD else 1, b))
    # norms and biases: many small tensors (below bitsandbytes' 8-bit threshold)
    tensors.append(Tensor(shape.norms + shape.other, 1, b))
    return tensors


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
    if s.head == REWARD_HEAD:
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


def kernel_notes(s: Setup, trl_fused: bool) -> list[str]:
    """What ``model.kernels`` changes in the plan, in one line (nothing for kernels: none)."""
    if s.kernels == "auto":  # only where Liger would change the figure (a TRL without its chunked LM head)
        return [] if trl_fused else ["model.kernels: auto: liger-kernel is not installed here, planned without Liger"]
    if s.kernels != "liger" or s.head == REWARD_HEAD:
        return []
    if trl_fused:
        return [
            "model.kernels: liger: no logits saving planned: TRL applies Liger's layer kernels only (it switches "
            "Liger's fused linear cross-entropy off) and its chunked LM head already holds no full logits"
        ]
    return ["model.kernels: liger: Liger's fused linear cross-entropy scores tokens in chunks, no full logits"]


@lru_cache(maxsize=1)
def trl_fuses_lm_head() -> bool:
    """Whether the installed TRL scores tokens through its chunked LM head (checked without importing trl)."""
    import importlib.util

    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return True  # the trl this package pins does
    utils = Path(list(spec.submodule_search_locations)[0]) / "trainer" / "utils.py"
    return utils.is_file() and "def add_fused_lm_head" in utils.read_text(errors="ignore")


def _shard(terms: dict[str, int], n: int, what: str) -> dict[str, int]:
    return {f"{k} / {n} ({what})": v // n for k, v in terms.items()}


# ------------------------------------------------------------------------------------------------
# One stage's peak
# ------------------------------------------------------------------------------------------------


def training_weight_terms(shape: ModelShape, s: Setup, dist: Distribution) -> dict[str, int]:
    """The weights a training stage holds: the (quantized) model, LoRA, modules_to_save, DPO's reference."""
    weights = weight_terms(shape, s, training=True)
    if s.lora is not None:
        weights["LoRA adapter (fp32)"] = sum(t.numel * t.bytes for t in lora_tensors(shape, s.lora))
        saved = sum(t.numel * t.bytes for t in saved_module_tensors(shape, s.lora, s))
        weights["trainable copies of modules_to_save"] = saved
    elif dist.strategy == "fsdp":  # trainable weights were upcast to fp32
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
    n, deepspeed = dist.processes, dist.strategy.startswith("zero")
    grads = sum(t.numel * t.bytes for t in tensors)
    n_train = sum(t.numel for t in tensors)
    notes: list[str] = []
    weights = training_weight_terms(shape, s, dist)
    master = deepspeed and s.weight_bytes < 4  # DeepSpeed's optimizer steps an fp32 master copy
    fixed: dict[str, int] = {}
    states = optimizer_state_bytes(spec, tensors, master_fp32=master or dist.strategy == "fsdp")
    opt_label = f"optimizer states ({s.optim}, {count(n_train)} trainable)"
    if master:
        fixed["fp32 master weights (DeepSpeed)"] = 4 * n_train
    fixed[opt_label] = states
    step_temp = states // max(spec.states, 1) if spec.foreach_temp and not deepspeed else 0
    gathered = 0
    if deepspeed or dist.strategy == "fsdp":
        fixed = _shard(fixed, n, "sharded") if not dist.offload_optimizer else {}
        if dist.offload_optimizer:
            notes.append("optimizer states and fp32 master weights live in CPU RAM (offload)")
        if dist.strategy in ("zero3", "fsdp"):
            weights = {} if dist.offload_params else _shard(weights, n, "sharded")
            # the layer being computed and the next one, gathered in 16 bits
            gathered = 2 * shape.layer_params * 2
        if dist.strategy != "zero1":
            grads //= n
        step_temp //= n
    fixed.update(weights)
    if gathered:
        fixed["gathered parameters: current + prefetched layer (bf16)"] = gathered
    if dist.strategy == "ddp":
        fixed["DDP gradient buckets (a copy of the gradients)"] = grads
    fixed["CUDA context + allocator allowance"] = CUDA_CONTEXT_BYTES
    fwd_bwd = activation_terms(shape, s)
    fused = trl_fuses_lm_head()
    liger_head = s.kernels == "liger" and s.head != REWARD_HEAD and not fused
    head = head_terms(shape, s, head_trainable=s.lora is None, fused=fused or liger_head)
    if liger_head:  # a TRL without its chunked head leaves Liger's fused linear cross-entropy on: chunked too
        head = {k.replace("TRL chunked log-probs", "Liger fused linear cross-entropy"): v for k, v in head.items()}
    fwd_bwd.update(head)
    notes.extend(kernel_notes(s, fused))
    step = {
        "gradients"
        + (f" / {n} (sharded)" if (deepspeed and dist.strategy != "zero1") or dist.strategy == "fsdp" else ""): grads
    }
    if step_temp:
        step["AdamW foreach temporary (one state-sized buffer during the step)"] = step_temp
    if master and dist.strategy != "zero3":
        step["fp32 gradient partition (DeepSpeed step)"] = 4 * n_train // (n if dist.strategy != "zero1" else 1)
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
    if s.kl_estimate:
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
