"""Experiment tracking: W&B runs grouped by pipeline run, one job type per stage.

With no API key configured W&B runs offline and we say how to upload later. The key itself is never
read into anything we write: only the mode, run id and local directory reach the manifest.

The tracker never kills training: before an online run starts, the W&B server is probed with a short
TCP connect (W&B's own retries took minutes, then raised CommError). ``mode: auto`` falls back to offline
logging when it does not answer; ``mode: online`` (recipe or WANDB_MODE) fails at once, before any model
loads.
"""

from __future__ import annotations

import contextlib
import netrc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import Recipe, registry
from pipeline.util.errors import PipelineError
from pipeline.util.network import unreachable
from pipeline.util.text import markdown_table

DEFAULT_WANDB_URL = "https://api.wandb.ai"
INIT_TIMEOUT_S = 30.0  # wandb.init waits 90 s by default, then retries


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def requested_mode(recipe: Recipe) -> str:
    """The mode asked for: WANDB_MODE from the environment wins over the recipe's."""
    return os.environ.get("WANDB_MODE") or recipe.tracking.wandb.mode


def wandb_mode(recipe: Recipe) -> str:
    """The mode before any network check: auto is online with an API key, offline without."""
    mode = requested_mode(recipe)
    if mode == "auto":
        return "online" if wandb_key_configured() else "offline"
    return mode


def wandb_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_URL


def online_refused(url: str, reason: str) -> PipelineError:
    return PipelineError(
        f"W&B: tracking.wandb.mode is online but the W&B server {url} cannot be reached ({reason}). "
        "Check the network (or WANDB_BASE_URL), or set tracking.wandb.mode: auto (falls back to offline logging) "
        "or offline, and upload later with wandb sync"
    )


def check_online(recipe: Recipe) -> None:
    """With ``online`` forced, fail before anything loads when W&B does not answer (``pipeline run`` calls this first)."""
    if "wandb" in recipe.tracking.report_to and requested_mode(recipe) == "online":
        reason = unreachable(wandb_url())
        if reason:
            raise online_refused(wandb_url(), reason)


def resolve_mode(recipe: Recipe) -> tuple[str, str | None]:
    """(mode to start W&B in, why it is offline although online was wanted -- None otherwise)."""
    mode = wandb_mode(recipe)
    if mode != "online":
        return mode, None
    reason = unreachable(wandb_url())
    if reason is None:
        return mode, None
    if requested_mode(recipe) == "online":
        raise online_refused(wandb_url(), reason)
    return "offline", f"{wandb_url()} cannot be reached ({reason})"


@contextlib.contextmanager
def tracked(recipe: Recipe, stage: str, stage_dir: Path, is_main: bool, say=print) -> Iterator[dict[str, Any]]:
    """Start the stage's tracker run (main process only); yields what the manifest records about it."""
    info: dict[str, Any] = {}
    if "tensorboard" in recipe.tracking.report_to:
        # the Trainer's TensorBoardCallback reads this when it starts; our results go to the same place
        log_dir = stage_dir.parent / "tensorboard" / stage
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(log_dir)
        info["tensorboard"] = {"dir": str(log_dir)}
    if "wandb" not in recipe.tracking.report_to or not is_main:
        yield info
        return
    import wandb

    mode, fallback = resolve_mode(recipe)
    cfg = recipe.tracking.wandb
    settings = dict(
        project=cfg.project or recipe.name,
        entity=cfg.entity,
        group=recipe.name,
        job_type=stage,
        name=f"{recipe.name}-{stage}",
        tags=cfg.tags or None,
        config=recipe.resolved_dict(),
        dir=str(stage_dir),
        reinit="finish_previous",
        settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S),
    )
    try:
        run = wandb.init(mode=mode, **settings)
    except wandb.errors.Error as exc:  # the server answered the probe but refused or timed out
        if mode != "online" or requested_mode(recipe) == "online":
            raise PipelineError(f"W&B: could not start the {mode} run: {type(exc).__name__}: {exc}") from None
        mode, fallback = "offline", f"W&B did not start the online run ({type(exc).__name__}: {exc})"
        run = wandb.init(mode=mode, **settings)
    local_dir = str(Path(run.dir).parent) if run.dir else None
    info["wandb"] = {"id": run.id, "mode": mode, "project": cfg.project or recipe.name, "dir": local_dir}
    if mode == "online" and getattr(run, "url", None):
        info["wandb"]["url"] = run.url
    if fallback:
        info["wandb"]["offline_because"] = fallback
        say(f"W&B: {fallback}; logging offline to {local_dir} instead -- upload later with: wandb sync {local_dir}")
    try:
        yield info
    finally:
        run.finish()
        if mode == "offline" and local_dir:
            info["wandb"]["sync"] = f"wandb sync {local_dir}"
            why = "" if fallback or wandb_key_configured() else " (no API key configured)"
            say(f"W&B: logged offline{why} to {local_dir}; upload with: wandb sync {local_dir}")


# --------------------------------------------------------------------------------------------
# A stage's results, the same in every tracker: its metrics, its tables and its plots
# --------------------------------------------------------------------------------------------


def flat_numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number in ``metrics``, nested keys joined with '/' (policies/dpo/gold_accuracy)."""
    found: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            found[name] = float(value)
        elif isinstance(value, dict):
            found.update(flat_numbers(value, name + "/"))
    return found


def stage_results(kind: str, metrics: dict[str, Any], outputs: dict[str, str]) -> dict[str, Any]:
    """What every tracker gets when a stage ends: scalars, its kind's tables (header + rows) and images (PNGs)."""
    hook = registry.get(kind).tables if kind in registry.kinds() else None
    tables = {key: (rows[0], rows[1:]) for key, (_, rows) in (hook(metrics, False) if hook else {}).items()}
    images = {key: path for key, path in outputs.items() if str(path).endswith(".png") and Path(path).is_file()}
    return {"scalars": flat_numbers(metrics), "tables": tables, "images": images}


def log_results(info: dict[str, Any], kind: str, metrics: dict[str, Any], outputs: dict[str, str]) -> None:
    """Send a finished stage's results to its trackers (``info``: what ``tracked`` yielded)."""
    if not info:
        return
    results = stage_results(kind, metrics, outputs)
    if "tensorboard" in info:
        _to_tensorboard(info["tensorboard"]["dir"], results, int(metrics.get("steps") or 0))
    if "wandb" in info:
        _to_wandb(results)


def _to_tensorboard(log_dir: str, results: dict[str, Any], step: int) -> None:
    import matplotlib.image
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=log_dir)
    try:
        for key, value in results["scalars"].items():
            writer.add_scalar(f"results/{key}", value, step)
        for key, (header, rows) in results["tables"].items():
            writer.add_text(f"tables/{key}", markdown_table([header, *rows]), step)
        for key, path in results["images"].items():
            writer.add_image(f"plots/{key}", matplotlib.image.imread(path), step, dataformats="HWC")
    finally:
        writer.close()


def _to_wandb(results: dict[str, Any]) -> None:
    import wandb

    if wandb.run is None:
        return
    payload: dict[str, Any] = {f"results/{key}": value for key, value in results["scalars"].items()}
    for key, (header, rows) in results["tables"].items():
        payload[f"tables/{key}"] = wandb.Table(columns=header, data=rows)
    for key, path in results["images"].items():
        payload[f"plots/{key}"] = wandb.Image(path)
    wandb.run.log(payload)
