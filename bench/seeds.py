"""How much a recipe's figures move with the seed and with the float order of another machine.

Runs ``python -m pipeline run RECIPE --set seed=S`` for each seed, with the default thread count and with one
thread (``OMP_NUM_THREADS=1``: a different reduction order, the stand-in for another CPU), then prints the README's
table (per policy, mean [min, max] of each eval figure) and, per policy and metric of ``eval/metrics.json`` (and
each reward stage's held-out accuracy), mean, min, max and standard deviation over the runs. The last line checks
the recipe's claims (FLOORS: the demo's, the iterative rounds', GRPO's) in every run; a run stopped by a quality
gate fails them:

    claims: sft_gold_min=0.93 dpo_pref_gain_min=0.89 dpo_gold_drop_max=0.01 rm_acc_min=0.92 ... -> hold in every run

Usage (from the repository root; one demo run is ~100 s on 2 cores):

    python bench/seeds.py [--recipe recipes/demo.yaml] [--seeds 0 1 2 3 4] [--threads default 1] [--out runs.json]
    python bench/seeds.py --recipe recipes/demo.yaml --summarize a.json b.json   # sweeps run apart, summarized
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Each recipe's claims, as floors every run must clear (README "What the demo shows", "Iterative rounds", "GRPO").
# A claim whose policies a recipe does not have is left out.
FLOORS = {
    "sft_gold_min": 0.85,  # SFT learns the tasks
    "dpo_pref_gain_min": 0.50,  # DPO gains the preferred style ...
    "dpo_gold_drop_max": 0.03,  # ... without an alignment tax
    "rm_acc_min": 0.90,  # every reward model's held-out pairwise accuracy (its gate)
    "bon_pref_gain_min": 0.20,  # best-of-8 by the reward model gains style
    "round_drop_max": 0.02,  # iterative: no round goes backwards (preferred or accuracy)
    "last_round_gold_drop_max": 0.03,  # iterative: the last round keeps SFT's accuracy
    "grpo_pref_gain_min": 0.50,  # GRPO on the checkers gains the style ...
    "grpo_gold_drop_max": 0.03,  # ... and keeps the accuracy
}
# Reward models of later iterative rounds are gated at 0.85 (subtler pairs), the demo's at 0.90.
RM_FLOOR_BY_RECIPE = {"iterative": 0.85}


def run_once(recipe: str, seed: int, threads: str, out: Path) -> dict:
    env = {**os.environ}
    if threads != "default":
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    started = time.time()
    cmd = [sys.executable, "-m", "pipeline", "run", recipe, "--output-dir", str(out), "--set", f"seed={seed}"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    failed = None
    if done.returncode != 0:  # a failed quality gate is a result too: that run's claims do not hold
        failed = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[0][:300]
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {"stages": {}}
    figures = {}
    for name, entry in manifest["stages"].items():
        metrics = entry.get("metrics") or {}
        if "heldout_accuracy" in metrics:
            figures[f"{name}.heldout_accuracy"] = metrics["heldout_accuracy"]
        for bench, scores in (metrics.get("benchmarks") or {}).items():  # a reward stage's preference benchmarks
            figures[f"{name}.{bench}.accuracy"] = scores["accuracy"]
            figures.update({f"{name}.{bench}.{s}": v["accuracy"] for s, v in scores.get("subsets", {}).items()})
        path = (entry.get("outputs") or {}).get("metrics")
        if path and Path(path).is_file():
            for policy, values in json.loads(Path(path).read_text()).get("policies", {}).items():
                figures.update({f"{policy}.{k}": v for k, v in values.items() if isinstance(v, (int, float))})
    seconds = round(time.time() - started, 1)
    return {"seed": seed, "threads": threads, "seconds": seconds, "figures": figures, "failed": failed}


def claims(figures: dict) -> dict:
    """The claims one run's figures support (see FLOORS); keys a recipe has no policies for are left out."""
    f, found = figures, {}
    sft_pref, sft_gold = f.get("sft.preference_pass"), f.get("sft.gold_accuracy")
    if sft_gold is not None:
        found["sft_gold_min"] = sft_gold
    for policy, gain, drop in (
        ("dpo", "dpo_pref_gain_min", "dpo_gold_drop_max"),
        ("grpo", "grpo_pref_gain_min", "grpo_gold_drop_max"),
    ):
        if f"{policy}.preference_pass" in f and sft_pref is not None:
            found[gain] = f[f"{policy}.preference_pass"] - sft_pref
            found[drop] = sft_gold - f[f"{policy}.gold_accuracy"]
    rm = [v for k, v in f.items() if k.endswith(".heldout_accuracy")]
    if rm:
        found["rm_acc_min"] = min(rm)
    if "bon.preference_pass" in f and sft_pref is not None:
        found["bon_pref_gain_min"] = f["bon.preference_pass"] - sft_pref
    rounds = sorted({int(k.split(".")[0][len("dpo_r") :]) for k in f if re.match(r"dpo_r\d+\.", k)})
    if rounds and sft_gold is not None:
        chain = ["sft"] + [f"dpo_r{r}" for r in rounds]
        found["round_drop_max"] = (
            max(
                f[f"{a}.{m}"] - f[f"{b}.{m}"]
                for a, b in zip(chain[1:], chain[2:])
                for m in ("preference_pass", "gold_accuracy")
            )
            if len(chain) > 2
            else 0.0
        )
        found["last_round_gold_drop_max"] = sft_gold - f[f"{chain[-1]}.gold_accuracy"]
    return found


def floors_for(recipe: str) -> dict:
    floors = dict(FLOORS)
    floors["rm_acc_min"] = RM_FLOOR_BY_RECIPE.get(Path(recipe).stem, FLOORS["rm_acc_min"])
    return floors


def worst_claims(runs: list[dict]) -> dict:
    """Per claim, its worst value over the runs."""
    per_run = [claims(r["figures"]) for r in runs]
    worst = {}
    for name in FLOORS:
        values = [c[name] for c in per_run if name in c]
        if values:
            worst[name] = max(values) if name.endswith("_max") else min(values)
    return worst


def verdict(runs: list[dict], floors: dict) -> str:
    worst = worst_claims(runs)
    failed = any(r.get("failed") for r in runs)
    held = not failed and all((worst[n] <= floors[n]) if n.endswith("_max") else (worst[n] >= floors[n]) for n in worst)
    return (
        "claims: "
        + " ".join(f"{n}={v:.3f}" for n, v in worst.items())
        + f" -> {'hold in every run' if held else 'FAIL in at least one run'} (floors: "
        + ", ".join(f"{n} {'<=' if n.endswith('_max') else '>='} {floors[n]}" for n in worst)
        + ")"
    )


def summary(runs: list[dict], floors: dict) -> list[str]:
    keys = sorted({k for r in runs for k in r["figures"]})
    lines = [f"{'figure':34} {'mean':>7} {'min':>7} {'max':>7} {'std':>7}  (n={len(runs)} runs)"]
    for key in keys:
        values = [r["figures"][key] for r in runs if key in r["figures"]]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"{key:34} {statistics.fmean(values):7.3f} {min(values):7.3f} {max(values):7.3f} {std:7.3f}")
    lines += [f"FAILED RUN seed {r['seed']} threads {r['threads']}: {r['failed']}" for r in runs if r.get("failed")]
    lines.append(verdict(runs, floors))
    return lines


MARKDOWN_COLUMNS = (
    ("preference_pass", "preferred style"),
    ("gold_accuracy", "answer accuracy"),
    ("reward_mean", "reward (RM)"),
    ("kl_to_ref", "KL to SFT"),
)


def markdown(runs: list[dict]) -> list[str]:
    """The README's table: per policy, mean [min, max] of each eval figure over the runs."""
    done = [r for r in runs if not r.get("failed")]
    policies = list(dict.fromkeys(k.split(".")[0] for r in done for k in r["figures"] if "." in k))
    columns = [
        (m, title) for m, title in MARKDOWN_COLUMNS if any(f"{p}.{m}" in r["figures"] for p in policies for r in done)
    ]
    lines = ["| policy | " + " | ".join(t for _, t in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for policy in policies:
        if not any(f"{policy}.{m}" in r["figures"] for m, _ in columns for r in done):
            continue
        cells = []
        for metric, _ in columns:
            values = [r["figures"][f"{policy}.{metric}"] for r in done if f"{policy}.{metric}" in r["figures"]]
            digits = 2 if metric in ("reward_mean", "kl_to_ref") else 3
            cells.append(
                f"{statistics.fmean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"
                if values
                else ""
            )
        lines.append(f"| `{policy}` | " + " | ".join(cells) + " |")
    seconds = [r["seconds"] for r in runs]
    lines.append(
        f"\nMean [min, max] over {len(done)} runs ({len(runs)} started): seeds "
        f"{sorted({r['seed'] for r in runs})} x threads {sorted({str(r['threads']) for r in runs})}; "
        f"{min(seconds):.0f}-{max(seconds):.0f} s a run."
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", nargs="+", default=["default", "1"])
    parser.add_argument("--out", help="write every run's figures as JSON here")
    parser.add_argument("--summarize", nargs="+", help="summarize earlier --out files (e.g. sweeps run in parallel)")
    args = parser.parse_args()
    if args.summarize:
        runs = [run for path in args.summarize for run in json.loads(Path(path).read_text())]
    else:
        runs = sweep(args.recipe, args.seeds, args.threads)
        if args.out:
            Path(args.out).write_text(json.dumps(runs, indent=1))
    print("\n".join(markdown(runs)) + "\n")
    print("\n".join(summary(runs, floors_for(args.recipe))))


def sweep(recipe: str, seeds: list[int], threads_list: list[str]) -> list[dict]:
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for threads in threads_list:
            for seed in seeds:
                run = run_once(recipe, seed, threads, Path(scratch) / f"s{seed}-t{threads}")
                runs.append(run)
                said = run["failed"] or {k: round(v, 3) for k, v in claims(run["figures"]).items()}
                print(f"seed {seed} threads {threads}: {run['seconds']} s, {said}", flush=True)
    return runs


if __name__ == "__main__":
    main()
