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

    p = sub.add_parser(
        "validate",
        help="check a recipe and print it resolved",
        description="Check everything that needs no model weights: the recipe, every local data file row by row, "
        "the model's tokenizer files and chat template, checkers and reward functions (imported, callable as "
        "fn(row, response)), LoRA target modules (against the model's config.json), and, when the run directory "
        "exists, that the models its stages exchange texts or token ids with share a tokenizer.",
    )
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--output-dir", help="the run directory to check against (default: the recipe's)")

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
        "OUT_DIR/README.md is its model card: the lineage from the base model through every stage it was built "
        "from (data fingerprints, settings, metrics) and its evaluation. "
        "Example: pipeline export runs/demo dpo exported/demo-dpo --push-to-hub my-org/demo-dpo --private",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="the run directory (a recipe's --output-dir, default runs/<name>)"
    )
    p.add_argument("stage", metavar="STAGE", help="a finished training stage (sft, reward, dpo ...)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write the model; must not exist or be empty")
    p.add_argument(
        "--license",
        metavar="ID",
        help="the model card's license, a Hub license id (apache-2.0, mit, llama3.1, other ...); default: none "
        "written, the base model's and the data's licenses apply",
    )
    p.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="then upload OUT_DIR to this Hub model repo (NAME or NAMESPACE/NAME; created when missing). Needs a "
        "token with write access: `hf auth login` or HF_TOKEN. If the push fails the export is kept, and the same "
        "command again only pushes it",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):  # an environment variable, so the processes accelerate launches see it too
        os.environ[VERBOSE_ENV] = "1"
    quiet_early()
    from pipeline.util import signals

    try:
        if args.command in ("run", "stage"):  # Ctrl-C and SIGTERM: one line; on SIGTERM a checkpoint first
            with signals.handled():
                return _dispatch(args)
        return _dispatch(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        return _interrupted(args, exc, argv)


def _interrupted(args, exc: KeyboardInterrupt, argv: list[str] | None) -> int:
    """One line: what was interrupted, what is kept, how to resume; exit 130 (Ctrl-C) or 143 (SIGTERM)."""
    import shlex

    from pipeline.util.errors import Interrupted

    interrupted = Interrupted.of(exc)
    if args.command not in ("run", "stage"):
        print(f"\n{interrupted.signal_name}: {args.command} stopped", file=sys.stderr)
        return interrupted.exit_code
    command = "python -m pipeline " + shlex.join(sys.argv[1:] if argv is None else argv)
    if interrupted.stage is None:
        print(f"\n{interrupted.signal_name}: stopped before any stage started; rerun: {command}", file=sys.stderr)
        return interrupted.exit_code
    kept = f"{interrupted.checkpoint} saved" if interrupted.checkpoint else "its finished checkpoints and shards kept"
    print(
        f"\n{interrupted.signal_name}: stage {interrupted.stage!r} interrupted and recorded so ({kept}); finished "
        f"stages stay done. To resume, run the same command again: {command}",
        file=sys.stderr,
    )
    return interrupted.exit_code


def _dispatch(args) -> int:
    from pipeline.config import load_recipe

    if args.command == "validate":
        recipe = load_recipe(args.recipe, args.overrides)
        run_dir = recipe.output_path(args.output_dir)  # when it exists: its models are checked as a run would use them
        _preflight(recipe, args.recipe, list(recipe.stages), run_dir if run_dir.is_dir() else None, check_cache=True)
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

        if args.private and not args.push_to_hub:
            raise PipelineError("export: --private applies to a repo that --push-to-hub REPO_ID creates; add it")
        export(
            args.run_dir, args.stage, args.out_dir, license=args.license, push_to=args.push_to_hub, private=args.private
        )
        return 0

    recipe_path = args.recipe or default_recipe()
    recipe = load_recipe(recipe_path, args.overrides)
    run_dir = recipe.output_path(args.output_dir)
    problem = run_dir_problem(run_dir, "--output-dir" if args.output_dir else "output_dir" if recipe.output_dir else "")
    if problem:
        raise PipelineError(problem)

    from pipeline.run.runner import is_cached

    if args.command == "stage":
        recipe.stage(args.name)  # an unknown name fails here
        stages = [args.name]
    else:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else list(recipe.stages)
        for name in stages:
            recipe.stage(name)
    to_run = [name for name in stages if not is_cached(recipe, name, run_dir)]
    if args.command == "run":  # all that needs no model weights, for the stages that will run, before the first
        _preflight(recipe, recipe_path, stages, run_dir, to_run)
    from pipeline.observe.tracking import check_online
    from pipeline.run.lock import run_dir_lock

    check_online(recipe)  # mode: online and W&B unreachable: fail now, not minutes into a stage
    from pipeline.run.preflight import hub_data_problem, hub_model_problem

    # a Hub model or dataset that cannot be fetched: now, not after minutes of retries inside a stage
    problem = hub_model_problem(recipe) or hub_data_problem(recipe, to_run)
    if problem:
        raise PipelineError(f"{recipe_path}: {problem}")

    # checked before the lock is taken: a mistyped command creates no run directory
    with run_dir_lock(run_dir, say=_note):
        return _run_or_stage(args, recipe, recipe_path, run_dir, stages)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_dir_problem(run_dir: Path, key: str) -> str | None:
    """A run directory that cannot be one: a file, under a file, or where nothing can be written. ``key`` is where
    it was given (--output-dir, output_dir, or '' for the default runs/<name>)."""
    given = f"{key} {run_dir}" if key else f"the run directory {run_dir} (default runs/<name>; set --output-dir)"
    if run_dir.exists() and not run_dir.is_dir():
        return (
            f"{given} is a file, not a directory; give a directory for the run (it is created when missing), "
            f"e.g. --output-dir {run_dir.with_name(run_dir.name + '-run')}"
        )
    for parent in run_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{given}: {parent} is a file, so no directory can be created under it; choose another path"
            if not run_dir.exists() and not os.access(parent, os.W_OK | os.X_OK):
                return f"{given}: cannot create it in {parent} (permission denied); choose a writable path"
            break
    if run_dir.is_dir() and not os.access(run_dir, os.W_OK | os.X_OK):
        return f"{given}: cannot write in {run_dir} (permission denied); choose a writable path"
    return None


def _preflight(
    recipe,
    recipe_path,
    stages: list[str],
    run_dir: Path | None,
    to_run: list[str] | None = None,
    check_cache: bool = False,
) -> None:
    """What ``validate`` checks, and ``run`` for the stages it will run (``to_run``: not cached) before the first
    starts -- everything that needs no model weights: the data files exist and parse row by row as their stages
    read them, the model's tokenizer files and chat template, checkers and reward functions import and take
    (row, response), LoRA targets exist in the model (meta device), and models the stages exchange texts or token
    ids between share a tokenizer (``check_cache``: the stages a plain run into ``run_dir`` would run). Every
    problem found is reported at once."""
    from pipeline.config import missing_data_files
    from pipeline.run import preflight

    missing = missing_data_files(recipe, stages)
    if missing:
        raise PipelineError(
            f"{recipe_path}: data files missing or not files (relative paths are relative to the recipe file):\n  "
            + "\n  ".join(missing)
        )
    to_run = stages if to_run is None else to_run
    problems = [
        *preflight.model_problems(recipe),
        *(preflight.lora_problems(recipe) if to_run else []),
        *preflight.function_problems(recipe, to_run),
        *(preflight.tokenizer_problems(recipe, run_dir, None if check_cache else to_run) if run_dir else []),
    ]
    if problems:
        raise PipelineError(f"{recipe_path}: " + "\n  ".join(problems))
    bad_data = preflight.data_problems(recipe, to_run) if to_run else []  # each local file read as its stage will
    if bad_data:
        raise PipelineError(f"{recipe_path}: bad data:\n" + "\n".join(bad_data))


def _run_or_stage(args, recipe, recipe_path, run_dir: Path, stages: list[str]) -> int:
    """``stage`` or ``run``, under the run directory's lock."""
    import os

    import torch

    if not torch.cuda.is_available():
        # DeepSpeed would otherwise warn on every import that it fell back to the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pipeline.run import runner

    if args.command == "stage":
        runner.run_stage(recipe, args.name, run_dir)
        return 0
    launch = runner.Launch(config=args.launch or recipe.launch, recipe_path=str(recipe_path), overrides=args.overrides)
    try:
        runner.run_pipeline(recipe, run_dir, stages, launch=launch)
    except KeyboardInterrupt:  # report.md still says where the run stands; the console gets one line (main)
        _report(run_dir, stages, show=False)
        raise
    except BaseException:
        _report(run_dir, stages, show=True)
        raise
    _report(run_dir, stages, show=True)
    return 0


def _report(run_dir: Path, stages: list[str], show: bool) -> None:
    from pipeline.observe import report
    from pipeline.run.manifest import Manifest

    if Manifest(run_dir).path.is_file():
        final = Manifest(run_dir).read()
        report_path = report.write_report(run_dir, final, stages)
        if show:
            print("\n" + report.results_table(final, stages))
            print(f"\nreport: {report_path}\nrun directory: {run_dir}")
