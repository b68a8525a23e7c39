"""Experiment tracking: W&B runs grouped by pipeline run, one job type per stage.

With no API key configured W&B runs offline and we say how to upload later. The key itself is never
read into anything we write: only the mode, run id and local directory reach the manifest.
"""

from __future__ import annotations

import contextlib
import netrc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import Recipe


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def wandb_mode(recipe: Recipe) -> str:
    mode = recipe.tracking.wandb.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode == "auto":
        return "online" if wandb_key_configured() else "offline"
    return mode


@contextlib.contextmanager
def tracked(recipe: Recipe, stage: str, stage_dir: Path, is_main: bool, say=print) -> Iterator[dict[str, Any]]:
    """Start the stage's tracker run (main process only); yields what the manifest records about it."""
    info: dict[str, Any] = {}
    if "wandb" not in recipe.tracking.report_to or not is_main:
        yield info
        return
    import wandb

    mode = wandb_mode(recipe)
    cfg = recipe.tracking.wandb
    if mode == "offline" and not wandb_key_configured():
        say("W&B: no API key configured, logging offline.")
    run = wandb.init(
        project=cfg.project or recipe.name,
        entity=cfg.entity,
        group=recipe.name,
        job_type=stage,
        name=f"{recipe.name}-{stage}",
        tags=cfg.tags or None,
        config=recipe.resolved_dict(),
        dir=str(stage_dir),
        mode=mode,
        reinit="finish_previous",
    )
    local_dir = str(Path(run.dir).parent) if run.dir else None
    info["wandb"] = {"id": run.id, "mode": mode, "project": cfg.project or recipe.name, "dir": local_dir}
    if mode == "online" and getattr(run, "url", None):
        info["wandb"]["url"] = run.url
    try:
        yield info
    finally:
        run.finish()
        if mode == "offline" and local_dir:
            info["wandb"]["sync"] = f"wandb sync {local_dir}"
            say(f"W&B offline run saved in {local_dir}; upload it later with: wandb sync {local_dir}")
