"""How much a recipe's figures move with the seed and with the float order of another machine.

Runs ``python -m pipeline run RECIPE --set seed=S`` for each seed, with the default thread count and with one
thread (``OMP_NUM_THREADS=1``: a different reduction order, the stand-in for another CPU), then prints, per policy
and metric of ``eval/metrics.json`` (and each reward stage's held-out accuracy), mean, min, max and standard
deviation over the runs. The last line checks the demo's claims in every run:

    claims: sft_gold_min=0.78 dpo_pref_gain_min=0.76 dpo_gold_drop_max=0.02 rm_acc_min=0.95 bon_pref_gain_min=0.58 -> ...

Usage (from the repository root; one demo run is ~90 s on 2 cores):

    python bench/seeds.py [--recipe recipes/demo.yaml] [--seeds 0 1 2 3 4] [--threads default 1] [--out seeds.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The demo's claims, as floors every run must clear (README "What the demo shows").
FLOORS = {
    "sft_gold_min": 0.85,
    "dpo_pref_gain_min": 0.50,
    "dpo_gold_drop_max": 0.03,
    "rm_acc_min": 0.90,
    "bon_pref_gain_min": 0.20,
}


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
        path = (entry.get("outputs") or {}).get("metrics")
        if path and Path(path).is_file():
            for policy, values in json.loads(Path(path).read_text()).get("policies", {}).items():
                figures.update({f"{policy}.{k}": v for k, v in values.items() if isinstance(v, (int, float))})
    seconds = round(time.time() - started, 1)
    return {"seed": seed, "threads": threads, "seconds": seconds, "figures": figures, "failed": failed}


def claims(figures: dict) -> dict:
    """The demo's claims in one run (keys missing in other recipes are left out)."""
    f = figures
    found = {}
    if "sft.gold_accuracy" in f:
        found["sft_gold_min"] = f["sft.gold_accuracy"]
    if "dpo.preference_pass" in f and "sft.preference_pass" in f:
        found["dpo_pref_gain_min"] = f["dpo.preference_pass"] - f["sft.preference_pass"]
        found["dpo_gold_drop_max"] = f["sft.gold_accuracy"] - f["dpo.gold_accuracy"]
    rm = [v for k, v in f.items() if k.endswith(".heldout_accuracy")]
    if rm:
        found["rm_acc_min"] = min(rm)
    if "bon.preference_pass" in f and "sft.preference_pass" in f:
        found["bon_pref_gain_min"] = f["bon.preference_pass"] - f["sft.preference_pass"]
    return found


def summary(runs: list[dict]) -> list[str]:
    keys = sorted({k for r in runs for k in r["figures"]})
    lines = [f"{'figure':34} {'mean':>7} {'min':>7} {'max':>7} {'std':>7}  (n={len(runs)} runs)"]
    for key in keys:
        values = [r["figures"][key] for r in runs if key in r["figures"]]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"{key:34} {statistics.fmean(values):7.3f} {min(values):7.3f} {max(values):7.3f} {std:7.3f}")
    per_run = [claims(r["figures"]) for r in runs]
    worst = {}
    for name in FLOORS:
        values = [c[name] for c in per_run if name in c]
        if values:
            worst[name] = max(values) if name.endswith("_max") else min(values)
    failed = [f"seed {r['seed']} threads {r['threads']}: {r['failed']}" for r in runs if r.get("failed")]
    lines += [f"FAILED RUN {f}" for f in failed]
    held = not failed and all((worst[n] <= FLOORS[n]) if n.endswith("_max") else (worst[n] >= FLOORS[n]) for n in worst)
    lines.append(
        "claims: "
        + " ".join(f"{n}={v:.3f}" for n, v in worst.items())
        + f" -> {'hold in every run' if held else 'FAIL in at least one run'} (floors: "
        + ", ".join(f"{n} {'<=' if n.endswith('_max') else '>='} {v}" for n, v in FLOORS.items())
        + ")"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", nargs="+", default=["default", "1"])
    parser.add_argument("--out", help="write every run's figures as JSON here")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for threads in args.threads:
            for seed in args.seeds:
                run = run_once(args.recipe, seed, threads, Path(scratch) / f"s{seed}-t{threads}")
                runs.append(run)
                said = run["failed"] or claims(run["figures"])
                print(f"seed {seed} threads {threads}: {run['seconds']} s, {said}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=1))
    print("\n".join(summary(runs)))


if __name__ == "__main__":
    main()
