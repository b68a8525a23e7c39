"""Measured GPU memory and speed of each stage against ``pipeline plan``'s estimate (CUDA only).

For each recipe in recipes/gpu/ (plus a Qwen2.5-0.5B QLoRA variant) it builds a randomly initialised model
from the real config in bench/configs/, loads it through the pipeline's own loader (pipeline.modeling:
dtype, 4-bit NF4, prepare_model_for_kbit_training, LoRA), and runs a few optimizer steps of

  sft     the recipe's sft stage: batch_size x max_length random tokens, all of them scored;
  reward  a one-output sequence classifier on chosen + rejected (2 x batch_size sequences);
  dpo     policy on chosen + rejected, reference forward without gradients (a frozen full copy for a
          full-weight policy, the adapter-disabled model for LoRA: same base, no extra weights);
  bon     one best-of-n generation batch through pipeline.rollout.generation.sample_batch (n=8, 64 new tokens);

with what the trainers do that moves memory: bf16 autocast, non-reentrant activation checkpointing, TRL's
chunked LM head (trl.trainer.utils.add_fused_lm_head, or trl.kernels directly when trl's trainer module
cannot import), the recipe's optimizer class. It prints, per case, torch.cuda.max_memory_allocated, the
plan's estimate without its CUDA-context allowance (and without paged optimizer states, which live in
unified memory outside the allocator), their ratio, tokens/s and MFU.

FLOPs (stated convention, per token): training 2N (forward) + 2N (backward to activations) + 2N_trainable
(backward to weights) + 12*L*h*s (attention, full-matrix convention), i.e. 6N + 12Lhs for full fine-tuning;
activation-checkpointing recomputation is not counted (MFU, not HFU). DPO adds the reference forward
2N + 4Lhs per token. Generation: 2N + 4*L*h*context per generated token. N = parameters in matmuls
(everything but the input embedding; a tied head counts as a matmul). MFU = FLOPs / s / bf16 dense peak
(H100 SXM / H200 989 TFLOP/s, H100 PCIe 756, A100 312, L40S 362).

    python bench/gpu_check.py --out gpu_check.json              # all cases, about 8 minutes on one H100
    python bench/gpu_check.py --only qwen0.5b-full --steps 3
    python bench/gpu_check.py --layers 8                        # truncated models (plan and measurement alike)
    python bench/gpu_check.py --device cpu --dry-run            # tiny shapes on CPU: checks the code runs
    python bench/gpu_check.py --only qwen0.5b-full --levers liger,compile,fused   # each speed lever on and off
    python bench/gpu_check.py --only qwen0.5b-full+all:sft      # every lever at once, one stage
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.config import recipe_from_dict  # noqa: E402
from pipeline.plan import launch, memory, shapes, stage_plan, units  # noqa: E402

CONFIGS = REPO / "bench" / "configs"
WORK = Path("/tmp/pipeline-gpu-check")
BF16_PEAK = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("4090", 165e12),
]

# name -> (recipe, config dir, extra --set overrides)
CASES = {
    "qwen0.5b-full": ("recipes/gpu/qwen2.5-0.5b-full.yaml", "Qwen2.5-0.5B", []),
    "qwen0.5b-qlora": (
        "recipes/gpu/qwen2.5-0.5b-full.yaml",
        "Qwen2.5-0.5B",
        [
            "model.quantization=4bit",
            "model.quant.compute_dtype=bfloat16",
            "lora.r=16",
            "lora.target_modules=all-linear",
            "stages.sft.train.optim=paged_adamw_8bit",
        ],
    ),
    "llama8b-qlora": ("recipes/gpu/llama3.1-8b-qlora.yaml", "Llama-3.1-8B", []),
}
STAGES = ("sft", "reward", "dpo", "bon")
# The speed levers of issue 22, each a case variant `<case>+<lever>` (--levers, or --only qwen0.5b-full+liger):
# the pipeline's own switches, applied here as the trainers apply them.
LEVERS = {
    "liger": ["model.kernels=liger"],  # Liger's layer kernels (its fused linear cross-entropy off, as TRL 1.16)
    "compile": ["stages.sft.train.compile=true"],  # torch.compile of the model (transformers' torch_compile)
    "fused": ["stages.sft.train.optim=adamw_torch_fused"],  # one-kernel AdamW step
    "all": ["model.kernels=liger", "stages.sft.train.compile=true", "stages.sft.train.optim=adamw_torch_fused"],
}


# ------------------------------------------------------------------------------------------------
# Recipes: the gpu recipe's model and sft training settings, reused for reward, dpo and bon
# ------------------------------------------------------------------------------------------------


def config_dir(name: str, layers: int | None) -> Path:
    """The reference config, or a copy truncated to ``layers`` decoder layers."""
    src = CONFIGS / name
    if not layers:
        return src
    out = WORK / "configs" / f"{name}-L{layers}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    cfg.pop("max_window_layers", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def case_recipe(case: str, layers: int | None, dry_run: bool = False):
    """The case's recipe with sft, reward, dpo and bon stages sharing the sft stage's train settings."""
    base_case, *levers = case.split("+")
    recipe_path, cfg_name, overrides = CASES[base_case]
    overrides = [*overrides, *(o for lever in levers for o in LEVERS[lever])]
    raw = yaml.safe_load((REPO / recipe_path).read_text())
    raw["model"]["name_or_path"] = str(config_dir(cfg_name, layers))
    raw["tracking"] = {"report_to": "none"}
    raw.pop("launch", None)  # measured on one GPU, planned for one
    if any(o.startswith("lora.") for o in overrides) and "lora" not in raw:
        raw["lora"] = {}
    from pipeline.config import apply_override

    for item in overrides:
        apply_override(raw, item)
    sft = raw["stages"]["sft"]
    train = dict(sft["train"])
    if dry_run:  # tiny and fp32 on CPU
        train.update(batch_size=2, precision="fp32", optim="adamw_torch")
        sft["data"]["max_length"] = 64
        raw["model"].update(dtype="float32", quantization="none", gradient_checkpointing=True)
        raw.pop("lora", None)
    length = sft["data"]["max_length"]
    pairs = {"train": {"path": "pairs.jsonl"}, "max_length": length}
    raw["stages"] = {
        "sft": {**sft, "train": train},
        "reward": {"kind": "reward", "data": pairs, "train": train},
        "dpo": {"kind": "dpo", "policy_from": "sft", "data": pairs, "train": train},
        "bon": {
            "kind": "bon",
            "policy_from": "sft",
            "prompts": {"path": "prompts.jsonl"},
            "n": 8,
            "max_new_tokens": 16 if dry_run else 64,
            "batch_size": 2 if dry_run else 8,
            "scorer": {"checker": "pipeline.builtin.tasks:preferred"},
        },
    }
    return recipe_from_dict(raw)


# ------------------------------------------------------------------------------------------------
# FLOPs and peaks
# ------------------------------------------------------------------------------------------------


def matmul_params(shape: shapes.ModelShape) -> int:
    """Parameters that take part in matmuls: all but the input embedding (a tied head is a matmul)."""
    head = shape.vocab * shape.hidden if shape.tied else shape.head
    return shape.total - shape.embedding + head


def train_flops_per_token(shape: shapes.ModelShape, trainable: int, seq: int, reference: bool) -> float:
    n = matmul_params(shape)
    attention = 12 * shape.layers * shape.hidden * seq
    flops = 4 * n + 2 * trainable + attention
    if reference:
        flops += 2 * n + attention / 3
    return flops


def generation_flops(shape: shapes.ModelShape, tokens: int, context: float) -> float:
    return tokens * (2 * matmul_params(shape) + 4 * shape.layers * shape.hidden * context)


def bf16_peak(device_name: str) -> float | None:
    for key, peak in BF16_PEAK:
        if all(part in device_name for part in key.split()):
            return peak
    return None


# ------------------------------------------------------------------------------------------------
# Models through the pipeline's loader
# ------------------------------------------------------------------------------------------------


def saved_base(recipe, device: str) -> str:
    """A randomly initialised checkpoint of the recipe's config, written once (bf16 safetensors), so the
    pipeline's loader -- and bitsandbytes quantization -- run exactly as for a downloaded model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = Path(recipe.model.name_or_path)
    out = WORK / "models" / f"{src.name}-{recipe.model.dtype}"
    if (out / "config.json").is_file():
        return str(out)
    cfg = AutoConfig.from_pretrained(src)
    dtype = {"float32": torch.float32}.get(recipe.model.dtype, torch.bfloat16)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="4GB")
    _save_family_tokenizer(cfg.model_type, tmp)
    del model
    free(device)
    tmp.rename(out)
    return str(out)


def _save_family_tokenizer(model_type: str, out: Path) -> None:
    """A downloaded checkpoint has its tokenizer beside it (the loader reads its pad id for reward heads):
    save the tokenizer of the replica of the same family (ids fit: replica vocabularies are smaller)."""
    from transformers import AutoTokenizer

    from pipeline.modeling import resolve_name

    family = {"llama": "builtin:replica-llama3", "qwen2": "builtin:replica-qwen2.5"}.get(model_type)
    if family is not None:
        AutoTokenizer.from_pretrained(resolve_name(family)).save_pretrained(out)


def free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def load(recipe, path: str, device: str, head: str = "causal_lm", trainable: bool = True):
    """Base (quantized as the recipe says) + a fresh LoRA when the recipe has one: pipeline.modeling's path."""
    from pipeline import modeling

    model = modeling.load_base(recipe.model, head=head, path=path)
    if recipe.model.quantization == "none":
        model.to(device)
    if trainable and recipe.lora is not None:
        model = modeling.add_lora(model, recipe.model, recipe.lora, task="SEQ_CLS" if head == "reward" else "CAUSAL_LM")
    if trainable and recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train(trainable)
    return model


def optimizer(model, name: str):
    """The optimizer class HF Trainer builds for ``train.optim`` (two groups: with and without weight decay)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if name in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(params, lr=1e-5, fused=name.endswith("fused") or None)
    import bitsandbytes as bnb

    classes = {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
        "adamw_bnb_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }
    if name not in classes:
        raise SystemExit(
            f"gpu_check: optimizer {name!r} is not wired here; use one of adamw_torch, {', '.join(classes)}"
        )
    return classes[name](params, lr=1e-5)


def liger(model) -> str:
    """Liger's layer kernels on the (unwrapped) model, as transformers' Trainer applies them under
    use_liger_kernel, with the fused linear cross-entropy off (TRL 1.16 refuses it; the LM head is TRL's)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance  # pip install .[gpu]

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=base, fused_linear_cross_entropy=False)
    return "liger"


def fused_head(model, outputs: tuple[str, ...]):
    """TRL's chunked LM head on the (unwrapped) causal LM; returns how it was installed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(base, outputs=outputs)
        return "trl.add_fused_lm_head"
    except Exception as exc:  # noqa: BLE001 -- trl's trainer module needs datasets and pandas; the kernel does not
        print(
            f"# trl.trainer.utils unavailable ({type(exc).__name__}: {exc}); using trl.kernels directly",
            file=sys.stderr,
        )
        return None  # see log_probs()


def log_probs(model, ids, fused: str | None):
    """Per-token log-probs of ids[:, 1:], as TRL's SFT / DPO trainers get them."""
    labels = ids.clone()
    if fused:
        return model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    from trl.kernels import ChunkedLogProbFunction  # needs only torch (+ triton)

    hidden = base.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    head = base.get_output_embeddings()
    flat = hidden.reshape(-1, hidden.size(-1))
    out = ChunkedLogProbFunction.apply(
        flat,
        head.weight,
        head.bias,
        labels[:, 1:].reshape(-1),
        1.0,
        memory.FUSED_VOCAB_TILE,
        None,
        1.0,
        ("log_probs", "entropy"),
    )
    return out[0].view(ids.shape[0], -1)


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


def stage_loss(kind: str, model, ref, ids, fused, beta: float = 0.1):
    """The stage's loss on one micro-batch (the reference forward after the policy's, as TRL does)."""
    import torch
    import torch.nn.functional as F

    if kind == "sft":
        return -log_probs(model, ids, fused).mean()
    if kind == "reward":
        chosen, rejected = torch.chunk(model(input_ids=ids, use_cache=False).logits.squeeze(-1), 2)
        return -F.logsigmoid(chosen - rejected).mean()
    policy = log_probs(model, ids, fused).sum(-1)
    with torch.no_grad():
        if ref is not None:
            reference = log_probs(ref, ids, fused).sum(-1)
        else:
            with model.disable_adapter():  # LoRA policy: the reference is the model without the new adapter
                reference = log_probs(model, ids, fused).sum(-1)
    pc, pr = torch.chunk(policy, 2)
    rc, rr = torch.chunk(reference, 2)
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def run_training(kind: str, recipe, base: str, device: str, steps: int) -> dict:
    """``steps`` optimizer steps of gradient_accumulation_steps micro-batches each; returns timings."""
    import torch

    s = memory.stage_setup(recipe, kind)
    train = recipe.stages[kind].train
    model = load(recipe, base, device, head="reward" if kind == "reward" else "causal_lm")
    fused = None if kind == "reward" else fused_head(model, ("log_probs", "entropy", "is_top1"))
    ref = None
    if kind == "dpo" and recipe.lora is None:  # a full-weight policy: its reference is a frozen full copy
        ref = load(recipe, base, device, trainable=False).requires_grad_(False)
        fused_head(ref, ("log_probs",))
    levers = []
    if recipe.model.kernels == "liger":  # the policy only, as the Trainer does (not the reference)
        levers.append(liger(model))
    if train.compile:  # in place (nn.Module.compile), as accelerate compiles the Trainer's model
        model.compile()
        levers.append("compile")
    opt = optimizer(model, train.optim)
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    cast = (
        torch.autocast(device, dtype=torch.bfloat16)
        if device == "cuda" and train.precision != "fp32"
        else contextlib.nullcontext()
    )
    times = []
    for _ in range(steps):
        sync(device)
        started = time.perf_counter()
        for _ in range(train.gradient_accumulation_steps):
            ids = torch.randint(0, vocab, (s.sequences, s.length), device=device, generator=gen)
            with cast:
                loss = stage_loss(kind, model, ref, ids, fused) / train.gradient_accumulation_steps
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - started)
    trainable = sum(p.numel() for p in params)
    del model, ref, opt, params
    return {
        "step_s": times,
        "tokens_per_step": s.sequences * s.length * train.gradient_accumulation_steps,
        "trainable": trainable,
        "loss": float(loss.detach()),
        "lm_head": fused or ("trl.kernels" if kind != "reward" else "score"),
        "levers": levers + [train.optim],
    }


def run_bon(recipe, base: str, device: str, prompt_tokens: int) -> dict:
    import torch

    from pipeline.rollout.generation import sample_batch

    s = memory.stage_setup(recipe, "bon", prompt_tokens)
    model = load(recipe, base, device, trainable=False)
    gen = torch.Generator(device=device).manual_seed(0)
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (s.gen_prompts, s.prompt_tokens), generator=gen, device=device).tolist()
    stage = recipe.stages["bon"]
    sync(device)
    started = time.perf_counter()
    # no stop token: every sequence runs to max_new_tokens (the cache at its largest)
    sample_batch(model, prompts, stage.n, stage.max_new_tokens, eos_ids=[-1], pad_id=0, temperature=1.0, generator=gen)
    sync(device)
    del model
    return {"step_s": [time.perf_counter() - started], "tokens_per_step": s.gen_batch * s.new_tokens, "trainable": 0}


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def measure(case: str, kind: str, recipe, base: str, args) -> dict:
    """Peak allocated memory of one stage from a clean allocator, next to the plan's estimate."""
    import torch

    free(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    if kind == "bon":
        result = run_bon(recipe, base, args.device, args.prompt_tokens)
    else:
        result = run_training(kind, recipe, base, args.device, args.steps)
    measured = torch.cuda.max_memory_allocated() - before if args.device == "cuda" else None
    free(args.device)
    plan = stage_plan.plan_stage(recipe, kind, dist=launch.Distribution(), prompt_tokens=args.prompt_tokens)
    # the allocator sees neither the CUDA context nor paged (unified-memory) optimizer states
    unseen = memory.CUDA_CONTEXT_BYTES + sum(
        v for k, v in plan.terms.items() if k.startswith("optimizer states (paged_")
    )
    expected = plan.peak_bytes - unseen
    step_s = min(result["step_s"][1:] or result["step_s"])
    shape = shapes.model_shape(recipe.model.name_or_path, head="reward" if kind == "reward" else "causal_lm")
    s = memory.stage_setup(recipe, kind, args.prompt_tokens)
    if kind == "bon":
        flops = generation_flops(shape, result["tokens_per_step"], s.prompt_tokens + s.new_tokens / 2)
    else:
        flops = result["tokens_per_step"] * train_flops_per_token(
            shape, result["trainable"], s.length, kind == "dpo" and s.reference != "none"
        )
    peak = bf16_peak(torch.cuda.get_device_name()) if args.device == "cuda" else None
    return {
        "case": case,
        "stage": kind,
        "summary": plan.summary,
        "measured_bytes": measured,
        "plan_bytes": expected,
        "plan_peak_bytes": plan.peak_bytes,
        "ratio_measured_over_plan": measured / expected if measured else None,
        "plan_terms": plan.terms,
        "plan_phase": plan.phase,
        "tokens_per_s": result["tokens_per_step"] / step_s,
        "step_s": result["step_s"],
        "mfu": flops / step_s / peak if peak else None,
        **{k: v for k, v in result.items() if k not in ("step_s",)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", help=f"comma-separated cases ({', '.join(CASES)}) or case:stage (e.g. qwen0.5b-full:dpo)"
    )
    parser.add_argument(
        "--steps", type=int, default=2, help="optimizer steps per training stage (the peak is reached in the 2nd)"
    )
    parser.add_argument(
        "--layers", type=int, help="truncate every model to this many decoder layers (plan and measurement)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=memory.DEFAULT_PROMPT_TOKENS)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny fp32 shapes (1 layer unless --layers), 1 step: checks the code paths",
    )
    parser.add_argument(
        "--levers",
        help=f"also run each case with these levers on, one at a time ({', '.join(LEVERS)}; comma-separated); "
        "liger needs `pip install .[gpu]`",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; this benchmark measures GPU memory. "
            "Use --device cpu --dry-run to check that it runs.",
            file=sys.stderr,
        )
        return 2
    if args.dry_run:
        args.layers, args.steps, args.prompt_tokens = args.layers or 1, 1, 16
    selected = [x.strip() for x in args.only.split(",")] if args.only else list(CASES)
    levers = [x.strip() for x in args.levers.split(",")] if args.levers else []
    selected = [v for item in selected for v in [item, *(_with_lever(item, lever) for lever in levers)]]
    results = []
    for item in selected:
        case, _, only_stage = item.partition(":")
        base_case, *case_levers = case.split("+")
        if base_case not in CASES or any(lever not in LEVERS for lever in case_levers):
            raise SystemExit(
                f"gpu_check: unknown case {case!r}; cases: {', '.join(CASES)}, each with +lever ({', '.join(LEVERS)})"
            )
        recipe = case_recipe(case, args.layers, args.dry_run)
        started = time.perf_counter()
        base = saved_base(recipe, args.device)
        print(f"# {case}: random-init checkpoint ready in {time.perf_counter() - started:.0f}s", flush=True)
        for kind in [only_stage] if only_stage else STAGES:
            row = measure(case, kind, recipe, base, args)
            results.append(row)
            print(report_line(row), flush=True)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "layers": args.layers,
                    "results": results,
                },
                indent=1,
                default=str,
            )
        )
    return 0


def _with_lever(item: str, lever: str) -> str:
    case, sep, stage = item.partition(":")
    return f"{case}+{lever}{sep}{stage}"


def report_line(row: dict) -> str:
    gb = lambda b: "-" if b is None else f"{b / units.GIB:6.2f}"  # noqa: E731
    ratio = "-" if row["ratio_measured_over_plan"] is None else f"{row['ratio_measured_over_plan']:.2f}"
    mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    return (
        f"{row['case']:>16} {row['stage']:>6}  measured {gb(row['measured_bytes'])} GiB  plan {gb(row['plan_bytes'])} GiB  "
        f"ratio {ratio:>5}  {row['tokens_per_s']:9.0f} tok/s  MFU {mfu:>6}  | {row['summary']}"
        + (f" | {'+'.join(row['levers'])}" if row.get("levers") else "")
    )


if __name__ == "__main__":
    raise SystemExit(main())
