"""Command line: ``python -m pipeline {validate,plan,run,stage,export} ...`` (also the ``pipeline`` console script).

User errors (bad recipe, bad data, missing upstream output) print one clear message and exit 2;
no traceback. ``stage`` is what ``accelerate launch -m pipeline stage NAME RECIPE`` runs on every rank.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.util.console import VERBOSE_ENV, quiet_early
from pipeline.util.errors import PipelineError

EXIT_USER_ERROR = 2


def default_recipe() -> Path:
    for base in (Path(__file__).resolve().parent.parent, Path.cwd()):
        candidate = base / "recipes" / "demo.yaml"
        if candidate.is_file():
            return candidate
    raise PipelineError("no RECIPE given and recipes/demo.yaml not found; pass a recipe file")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe value, e.g. --set stages.sft.train.learning_rate=1e-4 (repeatable)",
    )
    p.add_argument("--output-dir", help="run directory (default: the recipe's output_dir, else runs/<name>)")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show what the libraries print (Trainer log dicts, warnings, W&B banners), silenced by default",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="SFT -> reward model -> best-of-n -> DPO from one recipe."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe and print it resolved")
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    p = sub.add_parser(
        "plan",
        help="estimate each stage's peak GPU memory, term by term, and whether it fits",
        description="Peak GPU memory per stage (weights, gradients, optimizer states, activations, "
        "logits, KV cache, sharding) from the model's config.json, with a verdict against --gpu-memory "
        "and re-planned suggestions when a stage does not fit. Reads no weights, needs no GPU.",
    )
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--gpu-memory", help="memory of one GPU: 24GiB, 24GB, 80G, or a number of GiB")
    p.add_argument("--num-processes", type=int, help="processes (GPUs) to shard over (default: the launch config's)")
    p.add_argument("--launch", help="accelerate config to plan for (default: the recipe's launch)")
    p.add_argument("--stages", help="comma-separated stage names (default: all)")
    p.add_argument("--prompt-tokens", type=int, help="prompt length assumed by bon/eval stages (default 256)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")

    p = sub.add_parser("run", help="run a recipe's stages in order (default: the built-in demo)")
    p.add_argument("recipe", nargs="?")
    p.add_argument("--stages", help="comma-separated stage names (default: all, in recipe order)")
    p.add_argument(
        "--launch",
        help="accelerate config: run each stage under `accelerate launch` with it (default: the recipe's launch)",
    )
    _common(p)

    p = sub.add_parser("stage", help="run one stage in this process (what accelerate launch calls)")
    p.add_argument("name")
    p.add_argument("recipe")
    _common(p)

    p = sub.add_parser(
        "export",
        help="write a stage's model as a standalone model directory (LoRA merged into its base)",
        description="Export the model of STAGE in the run directory RUN_DIR to OUT_DIR: a LoRA adapter is merged "
        "into its base (loaded in full precision, also for 4-bit/8-bit recipes) and saved with the tokenizer; a "
        "full-weight model is copied as is. Loads with plain AutoModelForCausalLM.from_pretrained(OUT_DIR). "
        "Example: pipeline export runs/demo dpo exported/demo-dpo",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="the run directory (a recipe's --output-dir, default runs/<name>)"
    )
    p.add_argument("stage", metavar="STAGE", help="a finished training stage (sft, reward, dpo ...)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write the model; must not exist or be empty")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):  # an environment variable, so the processes accelerate launches see it too
        os.environ[VERBOSE_ENV] = "1"
    quiet_early()
    try:
        return _dispatch(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _dispatch(args) -> int:
    from pipeline.config import load_recipe

    if args.command == "validate":
        recipe = load_recipe(args.recipe, args.overrides)
        _preflight(recipe, args.recipe, list(recipe.stages))
        from pipeline.run.preflight import data_problems

        problems = data_problems(recipe)  # every local file read and checked row by row, as its stage will
        if problems:
            raise PipelineError(f"{args.recipe}: bad data:\n" + "\n".join(problems))
        print(recipe.resolved_yaml(), end="")
        print(
            f"# ok: {args.recipe} is valid ({len(recipe.stages)} stage(s): {', '.join(recipe.stages)})", file=sys.stderr
        )
        return 0

    if args.command == "plan":
        from pipeline.plan import report

        return report.main(args)

    if args.command == "export":
        from pipeline.run.export import export

        export(args.run_dir, args.stage, args.out_dir)
        return 0

    recipe_path = args.recipe or default_recipe()
    recipe = load_recipe(recipe_path, args.overrides)
    run_dir = recipe.output_path(args.output_dir)

    if args.command == "stage":
        recipe.stage(args.name)  # an unknown name fails here
        stages = [args.name]
    else:
        stages = _stages_to_run(args, recipe, recipe_path)
    from pipeline.observe.tracking import check_online
    from pipeline.run.lock import run_dir_lock

    check_online(recipe)  # mode: online and W&B unreachable: fail now, not minutes into a stage
    from pipeline.run.preflight import hub_data_problem, hub_model_problem

    # a Hub model or dataset that cannot be fetched: now, not after minutes of retries inside a stage
    from pipeline.run.runner import is_cached

    to_run = [name for name in stages if not is_cached(recipe, name, run_dir)]
    problem = hub_model_problem(recipe) or hub_data_problem(recipe, to_run)
    if problem:
        raise PipelineError(f"{recipe_path}: {problem}")

    # checked before the lock is taken: a mistyped command creates no run directory
    with run_dir_lock(run_dir, say=_note):
        return _run_or_stage(args, recipe, recipe_path, run_dir, stages)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _stages_to_run(args, recipe, recipe_path) -> list[str]:
    """The stages ``run`` will run, their data files and the model checked before anything heavy runs."""

    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else list(recipe.stages)
    for name in stages:
        recipe.stage(name)
    _preflight(recipe, recipe_path, stages)
    return stages


def _preflight(recipe, recipe_path, stages: list[str]) -> None:
    """What ``validate`` and ``run`` check before anything heavy runs: the stages' data files exist, and the
    model's tokenizer files and chat template are readable (without torch)."""
    from pipeline.config import missing_data_files
    from pipeline.run.preflight import model_problems

    missing = missing_data_files(recipe, stages)
    if missing:
        raise PipelineError(
            f"{recipe_path}: data files not found (relative paths are relative to the recipe file):\n  "
            + "\n  ".join(missing)
        )
    problems = model_problems(recipe)
    if problems:
        raise PipelineError(f"{recipe_path}: " + "\n  ".join(problems))


def _run_or_stage(args, recipe, recipe_path, run_dir: Path, stages: list[str]) -> int:
    """``stage`` or ``run``, under the run directory's lock."""
    import os

    import torch

    if not torch.cuda.is_available():
        # DeepSpeed would otherwise warn on every import that it fell back to the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pipeline.observe import report
    from pipeline.run import runner

    if args.command == "stage":
        runner.run_stage(recipe, args.name, run_dir)
        return 0
    launch = runner.Launch(config=args.launch or recipe.launch, recipe_path=str(recipe_path), overrides=args.overrides)
    try:
        runner.run_pipeline(recipe, run_dir, stages, launch=launch)
    finally:
        from pipeline.run.manifest import Manifest

        if Manifest(run_dir).path.is_file():
            final = Manifest(run_dir).read()
            report_path = report.write_report(run_dir, final, stages)
            print("\n" + report.results_table(final, stages))
            print(f"\nreport: {report_path}\nrun directory: {run_dir}")
    return 0
