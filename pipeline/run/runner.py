"""Running stages: the context a stage sees, manifest bookkeeping, caching by config hash.

``run_stage`` runs one stage in this process (also under ``accelerate launch``: every rank runs it,
the main process alone writes the manifest). ``run_pipeline`` runs a recipe's stages in order.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Recipe, registry
from pipeline.modeling.chat import RUN_DATE_KEY
from pipeline.plan.launch import read_launch
from pipeline.run.context import StageContext, not_done
from pipeline.run.manifest import Manifest, git_commit, now, package_versions, stage_hash
from pipeline.util import console
from pipeline.util.errors import DiskFull, GateFailed, Interrupted, PipelineError
from pipeline.util.files import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


def _hash_for(recipe: Recipe, name: str, manifest: Manifest) -> tuple[str, dict[str, str]]:
    upstream: dict[str, str] = {}
    for target in recipe.stages[name].upstream().values():
        entry = manifest.stage(target)
        if entry.get("status") != "done":
            raise PipelineError(not_done(name, target, entry))
        upstream[target] = entry["config_hash"]
    return stage_hash(recipe, name, upstream), upstream


def distributed_state():
    """The process group for this process.

    Without CUDA it must be created with cpu=True, or each rank of a 2-process CPU launch silently runs
    alone (world size 1) -- except under DeepSpeed, which cpu=True silently turns into plain DDP.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import str_to_bool

    if torch.cuda.is_available():
        state = PartialState()
    elif str_to_bool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
        state = PartialState(backend="gloo")  # DeepSpeed on CPU: its own process group, over gloo
    else:
        state = PartialState(cpu=True)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:
        raise PipelineError(
            f"the launcher started {launched} processes but this one joined a group of {state.num_processes}; "
            "each would train alone. On CPU use launch/cpu_2proc.yaml (not --cpu); see launch/README.md"
        )
    return state


def make_context(recipe: Recipe, name: str, run_dir: Path) -> StageContext:
    state = distributed_state()
    cfg = recipe.stage(name)
    return StageContext(
        recipe=with_run_date(recipe, Manifest(run_dir).run_date()),
        name=name,
        cfg=cfg,
        run_dir=run_dir,
        stage_dir=run_dir / name,
        seed=cfg.seed if cfg.seed is not None else recipe.seed,
        is_main=state.is_main_process,
        world_size=state.num_processes,
        process_index=state.process_index,
        show_progress=sys.stderr.isatty(),
        device=state.device,
    )


def with_run_date(recipe: Recipe, date: str) -> Recipe:
    """The recipe as its stages see it: the run's date (ISO) passed to the chat template, for templates that print
    one (pipeline.modeling.chat). Stage hashes are taken from the recipe as written."""
    kwargs = {**recipe.model.chat_template_kwargs, RUN_DATE_KEY: date}
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"chat_template_kwargs": kwargs})})


def run_stage(recipe: Recipe, name: str, run_dir: Path) -> dict[str, Any]:
    """Run one stage in this process; returns its manifest entry."""
    from transformers import set_seed

    console.quiet_libraries()
    console.set_stage(name)
    state = distributed_state()
    manifest = Manifest(run_dir)
    digest, upstream = _hash_for(recipe, name, manifest)
    ctx = make_context(recipe, name, run_dir)
    ctx.config_hash = digest
    cfg, seed = ctx.cfg, ctx.seed
    started = time.time()
    if ctx.is_main:
        _record_start(ctx, manifest, upstream, state)
    state.wait_for_everyone()
    from pipeline.observe.tracking import log_results, tracked

    try:
        try:
            with tracked(recipe, name, ctx.stage_dir, ctx.is_main, say=ctx.say) as tracker:
                set_seed(seed)
                metrics = registry.get(cfg.kind).run(ctx)
                if ctx.is_main:
                    log_results(tracker, cfg.kind, metrics, ctx.outputs)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise DiskFull.during(name, run_dir, exc) from exc
    except BaseException as exc:
        if ctx.is_main:
            _record_failure(ctx, manifest, exc, round(time.time() - started, 2))
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C or SIGTERM: the CLI says which stage and how to resume
            raise Interrupted.of(exc, name) from None
        raise
    duration = round(time.time() - started, 2)
    if ctx.is_main:
        prune_superseded(ctx.stage_dir, digest)
        metrics = {k: v for k, v in metrics.items() if v is not None}
        write_json_atomic(ctx.stage_dir / "metrics.json", metrics)
        manifest.update_stage(
            recipe,
            name,
            status="done",
            metrics=metrics,
            outputs=ctx.outputs,
            tracker=tracker,
            ended_at=now(),
            duration_s=duration,
        )
    state.wait_for_everyone()
    return manifest.stage(name)


def _record_start(ctx: StageContext, manifest: Manifest, upstream: dict[str, str], state) -> None:
    """The stage's resolved recipe, and its manifest entry marked ``running`` (never ``done`` until it is)."""
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(ctx.stage_dir / "recipe.yaml", ctx.recipe.resolved_yaml())
    distributed = state.distributed_type
    manifest.update_stage(
        ctx.recipe,
        ctx.name,
        kind=ctx.cfg.kind,
        status="running",
        config_hash=ctx.config_hash,
        upstream=upstream,
        started_at=now(),
        ended_at=None,
        duration_s=None,
        error=None,
        world_size=state.num_processes,
        distributed_type=str(distributed.value if hasattr(distributed, "value") else distributed),
        outputs={},
        metrics={},
        versions=package_versions(),
        git_commit=git_commit(),
    )


def _record_failure(ctx: StageContext, manifest: Manifest, exc: BaseException, duration: float) -> None:
    """Mark the stage ``failed`` with the reason (``interrupted`` for Ctrl-C and SIGTERM: it resumes from its last
    checkpoint or shard when rerun); a failed quality gate keeps what the stage measured and wrote."""
    reason = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
    status = "failed"
    if isinstance(exc, KeyboardInterrupt):
        reason, status = Interrupted.of(exc).reason(), "interrupted"
    extra = {}
    if isinstance(exc, GateFailed):
        extra = {"metrics": exc.metrics, "outputs": ctx.outputs}
        write_json_atomic(ctx.stage_dir / "metrics.json", exc.metrics)
    try:
        manifest.update_stage(
            ctx.recipe, ctx.name, status=status, error=reason, ended_at=now(), duration_s=duration, **extra
        )
        if not isinstance(exc, (PipelineError, KeyboardInterrupt)):
            (ctx.stage_dir / "error.log").write_text(traceback.format_exc())
    except OSError as write_error:  # e.g. the disk is still full: the entry stays 'running', never 'done'
        log.warning("could not record the failure of stage %s in the manifest: %s", ctx.name, write_error)


def prune_superseded(stage_dir: Path, digest: str) -> None:
    """Once a stage is done, checkpoints and shards of earlier configurations can never be resumed."""
    import shutil

    for path in stage_dir.glob("*-*"):
        prefix, _, key = path.name.partition("-")
        if path.is_dir() and prefix in ("checkpoints", "shards") and key != digest:
            shutil.rmtree(path, ignore_errors=True)


def is_cached(recipe: Recipe, name: str, run_dir: Path) -> bool:
    """A stage is skipped when a ``done`` entry has the same config hash (settings, data, upstream)."""
    manifest = Manifest(run_dir)
    entry = manifest.stage(name)
    if entry.get("status") != "done":
        return False
    try:
        digest, _ = _hash_for(recipe, name, manifest)
    except PipelineError:
        return False
    return digest == entry.get("config_hash")


@dataclass
class Launch:
    """How ``pipeline run`` starts each stage: in this process, or under ``accelerate launch``."""

    config: str | None = None  # an accelerate config file
    recipe_path: str | None = None
    overrides: list[str] = field(default_factory=list)

    def multi_process(self) -> bool:
        """A launch config that starts one plain process gains nothing from a subprocess per stage
        (measured: ~7 s of imports each), so those stages run in this process."""
        return bool(self.config) and read_launch(self.config).multi_process

    def command(self, stage: str, run_dir: Path) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(self.config),
            "-m",
            "pipeline",
            "stage",
            stage,
            str(self.recipe_path),
            "--output-dir",
            str(run_dir),
        ]
        for item in self.overrides:
            cmd += ["--set", item]
        return cmd


def run_pipeline(
    recipe: Recipe, run_dir: Path, stages: list[str] | None = None, say=print, launch: Launch | None = None
) -> dict[str, Any]:
    """Run stages in order, skipping cached ones; stops at the first failure (PipelineError)."""

    names = stages or list(recipe.stages)
    for name in names:
        recipe.stage(name)  # unknown names fail before anything runs
    launch = launch or Launch()
    if launch.config and not Path(launch.config).is_file():
        raise PipelineError(f"launch config not found: {launch.config}")
    separate = launch.multi_process()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "recipe.yaml", recipe.resolved_yaml())
    Manifest(run_dir).run_date()  # fixed here, before any stage (or process) renders a prompt
    for name in names:
        if is_cached(recipe, name, run_dir):
            say(f"[{name}] cached: same settings, data and upstream as the finished run; skipped")
            continue
        try:  # the memory estimate is advice: a planner failure never breaks a run
            from pipeline.plan.report import headline

            say(headline(recipe, name))
        except Exception as exc:  # noqa: BLE001
            log.debug("no memory plan for stage %s: %s", name, exc)
        say(
            f"[{name}] running ({recipe.stages[name].kind})"
            + (f" under accelerate launch --config_file {launch.config}" if separate else "")
        )
        if separate:
            code = _launched(launch.command(name, run_dir), name)
            entry = Manifest(run_dir).stage(name)
            if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # the launched stage was interrupted alone
                raise Interrupted(code - 128, name)
            if code != 0 or entry.get("status") != "done":
                raise PipelineError(
                    f"stage {name!r} failed (exit code {code}): {entry.get('error') or 'see the output above'}"
                )
        else:
            entry = run_stage(recipe, name, run_dir)
        say(f"[{name}] done in {entry['duration_s']:.1f}s: " + json.dumps(_headline(entry.get("metrics", {}))))
    return Manifest(run_dir).read()


def _launched(command: list[str], stage: str) -> int:
    """Run a stage's ``accelerate launch``; Ctrl-C or SIGTERM here is passed on to it (it records the stage as
    interrupted and, on SIGTERM, may save a checkpoint first), then raised naming the stage."""
    import subprocess

    proc = subprocess.Popen(command)
    try:
        return proc.wait()
    except KeyboardInterrupt as exc:
        interrupted = Interrupted.of(exc, stage)
        try:
            proc.send_signal(interrupted.signum)
            proc.wait(timeout=120)
        except BaseException:  # it did not stop (or a second signal came): end it
            proc.kill()
            proc.wait()
        raise interrupted from None


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = [k for k in metrics if isinstance(metrics[k], (int, float)) and not k.endswith("parameters")]
    return {k: round(metrics[k], 4) if isinstance(metrics[k], float) else metrics[k] for k in keys[:8]}
