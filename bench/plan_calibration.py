"""CPU calibration of ``pipeline plan``'s static terms: weights + gradients + optimizer states.

Each case runs in a fresh subprocess: it imports torch/transformers/peft, records its resident memory
(RSS), builds a randomly initialised Llama-shaped model (~125M parameters: hidden 768, 12 layers, 12 heads,
4 KV heads, intermediate 2048, vocab 32000, untied), runs one forward/backward on a tiny batch (2 x 8 tokens,
so activations are negligible) and one optimizer step, and records RSS again with gradients and optimizer
states still held. Measured = RSS after - RSS before (psutil if installed, else /proc/self/statm). The
plan's terms for the same settings are summed next to it; the target is a ratio within 1 +/- 0.2.

    python bench/plan_calibration.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ARCH = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    model_type="llama",
    architectures=["LlamaForCausalLM"],
)
# name -> (dtype, optim, lora r or None)
CASES = {
    "full fp32 adamw_torch": ("float32", "adamw_torch", None),
    "full bf16 adamw_torch": ("bfloat16", "adamw_torch", None),
    "full fp32 adafactor": ("float32", "adafactor", None),
    "lora r16 fp32 adamw_torch": ("float32", "adamw_torch", 16),
}
STATIC = ("weights", "LoRA adapter", "gradients", "optimizer states")


def rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(case: str, config_dir: str) -> dict:
    """Runs in the subprocess: measured bytes of weights + gradients + optimizer states."""
    import peft  # noqa: F401 -- imported before the baseline, like torch
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.optimization import Adafactor

    dtype, optim, r = CASES[case]
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(config_dir)
    before = rss()
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    if r is not None:
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=r, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if optim == "adafactor":  # what HF Trainer builds for optim=adafactor
        opt = Adafactor(params, lr=1e-4, scale_parameter=False, relative_step=False)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)  # the foreach temporary is freed after the step anyway
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = rss()
    return {"measured": after - before, "trainable": sum(p.numel() for p in params)}


def planned(case: str, config_dir: str) -> int:
    from pipeline.config import recipe_from_dict
    from pipeline.plan import launch, stage_plan

    dtype, optim, r = CASES[case]
    raw = {
        "name": "calibration",
        "model": {"name_or_path": config_dir, "dtype": dtype},
        "stages": {
            "sft": {
                "kind": "sft",
                "data": {"train": {"path": "x.jsonl"}, "max_length": 16},
                "train": {"optim": optim, "precision": "fp32" if dtype == "float32" else "bf16", "batch_size": 2},
            }
        },
    }
    if r is not None:
        raw["lora"] = {"r": r, "dropout": 0.0}
    p = stage_plan.plan_stage(recipe_from_dict(raw), "sft", dist=launch.Distribution())
    terms = {**p.terms, **p.other_terms}
    return sum(v for k, v in terms.items() if k.startswith(STATIC))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.config)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(ARCH))
        print(f"{'case':<28} {'trainable':>11} {'plan MiB':>9} {'measured MiB':>13} {'measured/plan':>14}")
        for case in CASES:
            out = subprocess.run(
                [sys.executable, __file__, "--child", case, "--config", tmp], capture_output=True, text=True, check=True
            )
            got = json.loads(out.stdout.strip().splitlines()[-1])
            plan_bytes = planned(case, tmp)
            rows.append({"case": case, "plan_bytes": plan_bytes, **got, "ratio": got["measured"] / plan_bytes})
            print(
                f"{case:<28} {got['trainable']:>11,} {plan_bytes / 2**20:>9.1f} {got['measured'] / 2**20:>13.1f} {got['measured'] / plan_bytes:>14.3f}"
            )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst deviation: {100 * worst:.1f}% (target within 20%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
