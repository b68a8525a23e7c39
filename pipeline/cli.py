"""Command line: ``python -m pipeline {validate,run,stage} ...`` (also the ``pipeline`` console script).

User errors (bad recipe, bad data, missing upstream output) print one clear message and exit 2;
no traceback. ``stage`` is what ``accelerate launch -m pipeline stage NAME RECIPE`` runs on every rank.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import PipelineError

EXIT_USER_ERROR = 2


def default_recipe() -> Path:
    for base in (Path(__file__).resolve().parent.parent, Path.cwd()):
        candidate = base / "recipes" / "demo.yaml"
        if candidate.is_file():
            return candidate
    raise PipelineError("no RECIPE given and recipes/demo.yaml not found; pass a recipe file")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe value, e.g. --set stages.sft.train.learning_rate=1e-4 (repeatable)")
    p.add_argument("--output-dir", help="run directory (default: the recipe's output_dir, else runs/<name>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description="SFT -> reward model -> best-of-n -> DPO from one recipe.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe and print it resolved")
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    p = sub.add_parser("run", help="run a recipe's stages in order (default: the built-in demo)")
    p.add_argument("recipe", nargs="?")
    p.add_argument("--stages", help="comma-separated stage names (default: all, in recipe order)")
    _common(p)

    p = sub.add_parser("stage", help="run one stage in this process (what accelerate launch calls)")
    p.add_argument("name")
    p.add_argument("recipe")
    _common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _dispatch(args) -> int:
    from pipeline.config import load_recipe

    if args.command == "validate":
        recipe = load_recipe(args.recipe, args.overrides)
        print(recipe.resolved_yaml(), end="")
        print(f"# ok: {args.recipe} is valid ({len(recipe.stages)} stage(s): {', '.join(recipe.stages)})", file=sys.stderr)
        return 0

    recipe_path = args.recipe or default_recipe()
    recipe = load_recipe(recipe_path, args.overrides)
    run_dir = recipe.output_path(args.output_dir)

    from pipeline import runner

    if args.command == "stage":
        runner.run_stage(recipe, args.name, run_dir)
        return 0
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    manifest = runner.run_pipeline(recipe, run_dir, stages)
    print(results_table(manifest, stages or list(recipe.stages)))
    print(f"run directory: {run_dir}")
    return 0


def results_table(manifest: dict, names: list[str]) -> str:
    rows = [("stage", "status", "time (s)", "key metrics")]
    for name in names:
        entry = manifest["stages"].get(name, {})
        metrics = entry.get("metrics", {})
        keys = [k for k in ("eval_loss_before", "eval_loss", "train_loss", "steps") if k in metrics]
        shown = ", ".join(f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys)
        duration = entry.get("duration_s")
        rows.append((name, entry.get("status", "-"), f"{duration:.1f}" if duration is not None else "-", shown))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
