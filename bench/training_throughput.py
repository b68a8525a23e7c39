"""Training throughput by batching mode: real tokens/s and the share of processed positions that are real
tokens (``nonpad_token_share``), per stage, padded vs grouped vs packed, as the stages report them.

Each case runs the real stage (``runner.run_stage``) for a fixed number of steps on the same rows, so the
figures are what a recipe gets: the stage's own metrics (counted from the batches fed to the model).

  data "demo":   the built-in tiny tasks (data/tiny), SFT rows and preference pairs made from them;
  data "alpaca": the 175 human-written Alpaca seed tasks in ../shared/data (skipped when absent): long,
                 varied responses, where random batches are mostly padding.

    python bench/training_throughput.py                                    # CPU, built-in tiny model
    python bench/training_throughput.py --device-model bench/configs/Qwen2.5-0.5B --steps 20   # GPU

``--device-model DIR`` builds a randomly initialised model from a config.json (e.g. bench/configs/...) with the
Qwen2.5 replica's tokenizer, in bf16: GPU speed does not depend on the weights. The last line is
``speedup_sft: X``: SFT tokens/s of the fastest mode over padded, on the alpaca data when present.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data" / "alpaca_seed_tasks.json"
TINY = REPO / "data" / "tiny"

from pipeline.config import load_recipe  # noqa: E402
from pipeline.run import runner  # noqa: E402


def datasets_available(work: Path, rows: int, alpaca: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (sft rows file, preference pairs file)."""
    demo = [json.loads(line) for line in (TINY / "sft_train.jsonl").read_text().splitlines()[:rows]]
    found = {"demo": demo}
    if alpaca.is_file():
        found["alpaca"] = json.loads(alpaca.read_text())[:rows]
    out = {}
    for name, items in found.items():
        sft_path, pairs_path = work / f"{name}_sft.jsonl", work / f"{name}_pairs.jsonl"
        sft_path.write_text("".join(json.dumps(r) + "\n" for r in items))
        # pairs of unequal length: the row's answer vs a shortened or padded-out variant of it
        pairs = [
            {
                "prompt": r["instruction"] + ("\n\n" + r["input"] if r.get("input") else ""),
                "chosen": r["output"],
                "rejected": (r["output"][: len(r["output"]) // 2] if i % 2 else r["output"] + " Anyway, whatever."),
            }
            for i, r in enumerate(items)
        ]
        pairs_path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        out[name] = (sft_path, pairs_path)
    return out


def recipe(model: dict, sft_path: Path, pairs_path: Path, mode: str, args) -> dict:
    train = {
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": 1e-4,
        "batching": mode,
        "logging_steps": 1000,
        "save_steps": 10_000,
        "precision": args.precision,
    }
    pair_train = {**train, "batching": "padded" if mode == "padded" else "grouped"}
    data = {"template": args.template, "max_length": args.max_length}
    return {
        "name": f"throughput-{mode}",
        "seed": 0,
        "model": model,
        "tracking": {"report_to": "none"},
        "stages": {
            "sft": {
                "kind": "sft",
                "data": {"train": {"path": str(sft_path)}, **data, "overlength": "truncate"},
                "train": train,
            },
            "reward": {
                "kind": "reward",
                "base_from": "sft",
                "data": {"train": {"path": str(pairs_path)}, **data, "eval_fraction": 0},
                "train": pair_train,
            },
            "dpo": {
                "kind": "dpo",
                "policy_from": "sft",
                "precompute_ref_log_probs": False,
                "data": {"train": {"path": str(pairs_path)}, **data, "eval_fraction": 0},
                "train": pair_train,
            },
        },
    }


def run_case(raw: dict, work: Path, stages: list[str]) -> dict[str, dict]:
    path = work / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_dir = work / raw["name"]
    shutil.rmtree(run_dir, ignore_errors=True)
    rec = load_recipe(path)
    results = {}
    for stage in stages:
        entry = runner.run_stage(rec, stage, run_dir)
        m = entry["metrics"]
        results[stage] = {
            k: m.get(k)
            for k in ("batching", "nonpad_token_share", "train_tokens_per_s", "train_tokens", "train_runtime_s")
        }
    return results


def device_model(config_dir: Path, work: Path) -> str:
    """A random-init bf16 model from ``config_dir``'s config.json with the Qwen2.5 replica's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.modeling import resolve_name

    tokenizer = AutoTokenizer.from_pretrained(resolve_name("builtin:replica-qwen2.5"))
    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out = work / "device-model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--rows", type=int, default=240)
    p.add_argument("--modes", default="padded,grouped,packed")
    p.add_argument("--template", default="alpaca", choices=["alpaca", "chat"], help="prompt template of the SFT rows")
    p.add_argument("--stages", default="sft,reward,dpo")
    p.add_argument("--device-model", help="config dir: a random-init bf16 model of that shape (GPU runs)")
    p.add_argument("--attn", default=None, help="attn_implementation (default: the library's)")
    p.add_argument("--alpaca", type=Path, default=SHARED, help="the Alpaca seed tasks JSON (default: ../shared/data)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    os.environ.setdefault("PIPELINE_CACHE", str(Path(tempfile.gettempdir()) / "pipeline-bench-cache"))
    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    args.precision = "bf16" if args.device_model else "fp32"
    model = {
        "name_or_path": device_model(Path(args.device_model), work) if args.device_model else "builtin:tiny-llama",
        "dtype": "bfloat16" if args.device_model else "float32",
    }
    if args.attn:
        model["attn_implementation"] = args.attn
    results: dict[str, dict] = {}
    for data_name, (sft_path, pairs_path) in datasets_available(work, args.rows, args.alpaca).items():
        for mode in args.modes.split(","):
            stages = args.stages.split(",") if mode != "packed" else ["sft"]  # pairs are grouped, never packed
            results[f"{data_name}/{mode}"] = run_case(recipe(model, sft_path, pairs_path, mode, args), work, stages)
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    base = "alpaca" if args.alpaca.is_file() else "demo"
    padded = results[f"{base}/padded"]["sft"]["train_tokens_per_s"]
    best = max(
        results[f"{base}/{m}"]["sft"]["train_tokens_per_s"] for m in args.modes.split(",") if f"{base}/{m}" in results
    )
    print(f"speedup_sft: {best / padded:.2f}")


def print_table(results: dict[str, dict]) -> None:
    print(f"{'data/mode':<18} {'stage':<7} {'batching':<9} {'nonpad share':>12} {'tokens/s':>10} {'tokens':>9}")
    for case, stages in results.items():
        for stage, m in stages.items():
            tps = m["train_tokens_per_s"]
            print(
                f"{case:<18} {stage:<7} {m['batching'] or '-':<9} {m['nonpad_token_share'] or 0:>12.3f} "
                f"{tps or 0:>10,.0f} {m['train_tokens'] or 0:>9}"
            )


if __name__ == "__main__":
    main()
