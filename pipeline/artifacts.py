"""The run directory and its manifest: what each stage did, with what, and where its outputs are.

Written by the main process only, atomically, and a stage is marked ``done`` only after every
output is written. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.config.schema import Recipe, iter_sources
from pipeline.fileio import write_json_atomic

MANIFEST = "manifest.json"
TRACKED_PACKAGES = (
    "pipeline-alignment",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "deepspeed",
    "wandb",
)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Manifest:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / MANIFEST

    def read(self) -> dict[str, Any]:
        if self.path.is_file():
            return json.loads(self.path.read_text())
        return {"stages": {}}

    def stage(self, name: str) -> dict[str, Any]:
        return self.read()["stages"].get(name, {})

    def update_stage(self, recipe: Recipe, name: str, **fields: Any) -> None:
        data = self.read()
        data.update(recipe=recipe.name, run_dir=str(self.run_dir), updated_at=now())
        entry = data["stages"].setdefault(name, {})
        entry.update(fields)
        write_json_atomic(self.path, data)


def file_fingerprint(path: Path) -> str:
    """Content hash; for large files, size plus the first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as fh:
        if size <= 64 << 20:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(fh.read(1 << 20))
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read())
    return h.hexdigest()[:16]


def data_fingerprints(stage_cfg) -> dict[str, str]:
    """Fingerprints of the local data files a stage reads (Hub data is keyed by id and split)."""
    found: dict[str, str] = {}
    for _, source in iter_sources(stage_cfg):
        if source.path:
            p = Path(source.path)
            found[str(p)] = file_fingerprint(p) if p.is_file() else "missing"
        elif source.hub:
            found[f"hub:{source.hub}/{source.subset}[{source.split}]"] = "hub"
    return found


def config_hash(obj: Any) -> str:
    """Stable short hash of JSON-able settings."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_hash(recipe: Recipe, name: str, upstream_hashes: dict[str, str]) -> str:
    """Everything that determines a stage's output: its settings, the shared model settings, the seed,
    its input data and the hashes of the stages it builds on."""
    stage = recipe.stages[name]
    return config_hash(
        {
            "stage": stage.model_dump(mode="json"),
            "model": recipe.model.model_dump(mode="json"),
            "lora": recipe.lora.model_dump(mode="json") if recipe.lora else None,
            "seed": stage.seed if stage.seed is not None else recipe.seed,
            "data": data_fingerprints(stage),
            "upstream": upstream_hashes,
        }
    )


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
    )
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
