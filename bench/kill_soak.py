"""kill -9 at a random moment of a random stage, rerun, and compare with an uninterrupted run.

    python bench/kill_soak.py                          # 21 trials on the demo scaled down (~15 min on 2 cores)
    python bench/kill_soak.py --scale full --trials 9  # the demo as it ships (~2 min a trial)

The recipe is ``recipes/demo.yaml`` plus ``dpo_pre`` (the DPO stage with precomputed reference log-probs),
so every stage kind is a target: sft, label, reward, bon, rs_sft, dpo, dpo_pre, eval. ``--scale small`` cuts
steps and prompts (and the reward gate, which a short SFT may not pass), keeping several checkpoints and
shards per stage. One uninterrupted run is the reference. Each trial starts a fresh run directory, waits
until its target stage (trial i targets stage i mod 8) is running, sleeps a random fraction of that stage's
reference duration, kills the process group with SIGKILL, then checks:

  - no output visible half-written: every JSON/JSONL file in the run directory parses, every ``model/``
    directory holds complete weights, and no stage that had not finished is marked ``done``;
  - the rerun (same command) exits 0 with every stage ``done`` and none ``running``;
  - finished work is reused: a trainer stage resumes from the newest complete checkpoint that existed at the
    kill, best-of-n reuses every finished shard, finished stages are ``cached``;
  - the final ``eval/metrics.json`` equals the uninterrupted run's (exactly: every stage is deterministic
    on CPU, including a trainer resumed mid-epoch).

Prints one row per trial and a summary line ``kill_soak: N/N trials resumed and equal``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.train.checkpoints import _safetensors_problem, checkpoint_problem, checkpoints  # noqa: E402

TARGETS = ["sft", "label", "reward", "bon", "rs_sft", "dpo", "dpo_pre", "eval"]
SMALL = {
    "sft": {"train": {"max_steps": 240, "save_steps": 40, "logging_steps": 40}},
    "label": {"prompts": {"limit": 240}, "shard_size": 40},
    "reward": {"min_accuracy": 0.0, "train": {"max_steps": 60, "save_steps": 15}},
    "bon": {"prompts": {"limit": 240}, "shard_size": 40},
    "rs_sft": {"train": {"max_steps": 30, "save_steps": 10}},
    "dpo": {"train": {"max_steps": 40, "save_steps": 10}},
    "dpo_pre": {"train": {"max_steps": 40, "save_steps": 10}},
    "eval": {"prompts": {"limit": 120}},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def soak_recipe(work: Path, scale: str) -> Path:
    raw = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())

    def absolute(obj):
        if isinstance(obj, dict):
            return {k: absolute(v) for k, v in obj.items()}
        if isinstance(obj, str) and obj.startswith("../"):
            return str((REPO / "recipes" / obj).resolve())
        return obj

    raw = absolute(raw)
    stages = raw["stages"]
    stages["dpo_pre"] = merge(stages["dpo"], {"precompute_ref_log_probs": True})
    stages["eval"] = stages.pop("eval")  # keep eval last
    stages["eval"]["policies"] = [*stages["eval"]["policies"], "dpo_pre"]
    if scale == "small":
        for name, extra in SMALL.items():
            stages[name] = merge(stages[name], extra)
    raw["name"] = "kill-soak"
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def start(recipe: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(recipe), "--output-dir", str(run_dir)],
        cwd=REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stages_of(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "manifest.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return {}


def torn_files(run_dir: Path) -> list[str]:
    """Outputs that a reader would see half-written."""
    bad = []
    for path in run_dir.rglob("*"):
        if not path.is_file() or path.name.startswith(".") or "corrupt-" in str(path):
            continue
        if any(part.startswith("checkpoint-") or part.startswith(".") for part in path.relative_to(run_dir).parts):
            continue  # checkpoints are checked (and set aside) by the resume itself
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".jsonl":
                [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            elif path.suffix == ".safetensors" and _safetensors_problem(path):
                bad.append(f"{path.relative_to(run_dir)}: {_safetensors_problem(path)}")
        except ValueError as exc:
            bad.append(f"{path.relative_to(run_dir)}: {exc}")
    for model in run_dir.glob("*/model"):
        if not any(model.glob("*.safetensors")):
            bad.append(f"{model.relative_to(run_dir)}: no weights")
    return bad


def finished_work(run_dir: Path, stage: str) -> dict:
    """What the killed stage had finished: its newest complete checkpoint, its finished shards."""
    stage_dir = run_dir / stage
    newest = None
    for ckpt_dir in stage_dir.glob("checkpoints-*"):
        good = [p for p in checkpoints(ckpt_dir) if checkpoint_problem(p) is None]
        newest = good[0].name if good else None
    shards = len(list(stage_dir.glob("shards-*/shard-*.jsonl")))
    return {"checkpoint": newest, "shards": shards}


def reused(entry: dict, before: dict) -> tuple[bool, str]:
    metrics = entry.get("metrics", {})
    if before["checkpoint"]:
        got = metrics.get("resumed_from")
        newest = int(before["checkpoint"].split("-")[1])
        ok = got is not None and int(got.split("-")[1]) >= newest
        return ok, f"resumed {got}"
    if before["shards"]:
        got = metrics.get("shards_resumed", 0)
        return got >= before["shards"], f"{got} shards reused"
    return True, "-"


def compare(a: dict, b: dict, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in compare(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b else [f"{path}: {a} vs {b}"]


def run_trial(i: int, target: str, rng: random.Random, recipe: Path, work: Path, reference: dict) -> dict:
    run_dir = work / f"trial-{i:02d}"
    proc = start(recipe, run_dir, work / f"trial-{i:02d}.log")
    deadline = time.time() + 1800
    while stages_of(run_dir).get(target, {}).get("status") != "running":
        if proc.poll() is not None or time.time() > deadline:
            return {"trial": i, "target": target, "ok": False, "note": "run ended before the target stage"}
        time.sleep(0.05)
    fraction = rng.uniform(0.05, 0.95)
    time.sleep(fraction * reference["durations"][target])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = stages_of(run_dir)
    killed_in = next((n for n, e in at_kill.items() if e.get("status") == "running"), "(between stages)")
    torn = torn_files(run_dir)
    before = finished_work(run_dir, killed_in) if killed_in in at_kill else {"checkpoint": None, "shards": 0}
    done_before = {n for n, e in at_kill.items() if e.get("status") == "done"}

    started = time.time()
    rerun = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(recipe), "--output-dir", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    rerun_s = time.time() - started
    after = stages_of(run_dir)
    statuses_ok = rerun.returncode == 0 and all(e.get("status") == "done" for e in after.values())
    cached = all(f"[{n}] cached" in rerun.stdout for n in done_before)
    reuse_ok, reuse_note = reused(after.get(killed_in, {}), before) if killed_in in after else (True, "-")
    final = json.loads((run_dir / "eval" / "metrics.json").read_text()) if statuses_ok else {}
    diffs = compare(final, reference["metrics"]) if final else ["no metrics"]
    ok = statuses_ok and not torn and cached and reuse_ok and not diffs
    return {
        "trial": i,
        "target": target,
        "killed_in": killed_in,
        "at_s": round(fraction * reference["durations"][target], 1),
        "finished_at_kill": before["checkpoint"] or (f"{before['shards']} shards" if before["shards"] else "-"),
        "reuse": reuse_note,
        "rerun_s": round(rerun_s, 1),
        "torn": torn,
        "cached_ok": cached,
        "equal": not diffs,
        "diffs": diffs[:5],
        "ok": ok,
        "stderr": "" if rerun.returncode == 0 else rerun.stderr[-1500:],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=21)
    p.add_argument("--scale", choices=["small", "full"], default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="work directory (default: a temporary one, removed at the end)")
    p.add_argument("--out", help="write the trial table as JSON here")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kill-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    recipe = soak_recipe(work, args.scale)

    started = time.time()
    ref_dir = work / "reference"
    proc = start(recipe, ref_dir, work / "reference.log")
    if proc.wait() != 0:
        sys.exit(f"the uninterrupted run failed: see {work / 'reference.log'}")
    stages = stages_of(ref_dir)
    reference = {
        "metrics": json.loads((ref_dir / "eval" / "metrics.json").read_text()),
        "durations": {n: e["duration_s"] for n, e in stages.items()},
    }
    print(f"reference run: {time.time() - started:.0f} s; stage seconds {reference['durations']}", flush=True)
    print(
        f"{'trial':>5}  {'target':8} {'killed in':9} {'at s':>5}  {'finished at kill':17} {'reused':20} "
        f"{'rerun s':>7}  {'torn':4}  {'equal':5}",
        flush=True,
    )
    results = []
    for i in range(args.trials):
        r = run_trial(i, TARGETS[i % len(TARGETS)], rng, recipe, work, reference)
        results.append(r)
        print(
            f"{r['trial']:>5}  {r['target']:8} {r.get('killed_in', '-'):9} {r.get('at_s', '-'):>5}  "
            f"{r.get('finished_at_kill', '-'):17} {r.get('reuse', '-'):20} {r.get('rerun_s', '-'):>7}  "
            f"{len(r.get('torn', [])):>4}  {'yes' if r.get('equal') else 'NO':5}"
            + ("" if r["ok"] else f"  FAILED {r.get('note') or r.get('diffs') or r.get('torn') or r.get('stderr')}"),
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"reference": reference, "trials": results}, indent=1))
    passed = sum(r["ok"] for r in results)
    print(f"kill_soak: {passed}/{len(results)} trials resumed and equal ({time.time() - started:.0f} s)")
    if not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    main()
