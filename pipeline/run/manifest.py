"""The run directory and its manifest: what each stage did, with what, and where its outputs are.

Written by the main process only, atomically, and a stage is marked ``done`` only after every
output is written. No torch here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.config import Recipe, iter_sources
from pipeline.util.errors import PipelineError
from pipeline.util.files import write_json_atomic, write_text_atomic

MANIFEST = "manifest.json"
MANIFEST_BACKUP = "manifest.json.bak"  # the previous version, for when the manifest is damaged from outside
_warned_backup: set[str] = set()
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
    """``manifest.json``: one entry per stage. Written atomically, so a kill never truncates it; a damaged one
    (a full disk before atomic writes, an editor, a copy cut short) falls back to the previous version,
    ``manifest.json.bak``, which costs at most a rerun of the last stage (it resumes from its checkpoints)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / MANIFEST
        self.backup = run_dir / MANIFEST_BACKUP

    def read(self) -> dict[str, Any]:
        """The manifest; if the run directory was moved since it was written, its paths point to where it is now."""
        return _moved(self._read_stored(), self.run_dir)

    def _read_stored(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"stages": {}}
        data, problem = _load(self.path)
        if problem is None:
            return data
        backup, backup_problem = _load(self.backup) if self.backup.is_file() else (None, "absent")
        if backup_problem is None:
            if str(self.path) not in _warned_backup:
                _warned_backup.add(str(self.path))
                print(
                    f"warning: {self.path} is damaged ({problem}); using the previous version, {self.backup.name}: "
                    "the stage that was last recorded may run again (it resumes from its checkpoints)",
                    file=sys.stderr,
                    flush=True,
                )
            return backup
        raise PipelineError(
            f"{self.path} is damaged ({problem}) and there is no usable {self.backup.name}. To recover: move it "
            f"aside (mv {self.path} {self.path}.damaged) and rerun: every stage runs again, reusing the "
            "checkpoints and shards already in the run directory."
        )

    def run_date(self) -> str:
        """The date (ISO) this run directory renders date-stamped chat templates with, fixed the first time it is
        asked: a run that goes on past midnight, or is resumed next
        week, renders every prompt as on the day it started, so caches, reference log-probs and shards stay valid."""
        data = self.read()
        if "run_date" not in data:
            data["run_date"] = time.strftime("%Y-%m-%d")
            if self.path.is_file() and _load(self.path)[1] is None:
                write_text_atomic(self.backup, self.path.read_text())
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, data)
        return data["run_date"]

    def stage(self, name: str) -> dict[str, Any]:
        return self.read()["stages"].get(name, {})

    def update_stage(self, recipe: Recipe, name: str, **fields: Any) -> None:
        data = self.read()
        data.update(recipe=recipe.name, run_dir=str(self.run_dir), updated_at=now())
        entry = data["stages"].setdefault(name, {})
        entry.update(fields)
        if self.path.is_file() and _load(self.path)[1] is None:
            write_text_atomic(self.backup, self.path.read_text())
        write_json_atomic(self.path, data)


def _moved(data: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A manifest written in another place (the run directory was moved or copied: scratch disk -> shared
    storage) with the paths of its stages' outputs under the old directory pointing into ``run_dir``.
    Other paths (a Hub id, a base model elsewhere) are kept."""
    old, new = data.get("run_dir"), Path(run_dir).resolve()
    if not old or Path(old).resolve() == new:
        return data

    def rebase(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: rebase(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rebase(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value):
            with contextlib.suppress(ValueError):
                return str(new / Path(value).relative_to(old))
        return value

    return {**data, "stages": rebase(data["stages"]), "run_dir": str(new)}


def _load(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) or (None, what is wrong with it)."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"not valid JSON: {exc}"
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        return None, "no 'stages' table"
    return data, None


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
    for _, local in stage_cfg.local_paths().items():  # e.g. a folder of task definitions: every file in it
        root = Path(local)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in files:
            found[str(p)] = file_fingerprint(p) if p.is_file() else "missing"
    return found


def config_hash(obj: Any) -> str:
    """Stable short hash of JSON-able settings."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_hash(recipe: Recipe, name: str, upstream_hashes: dict[str, str]) -> str:
    """Everything that determines a stage's output: its settings, the shared model settings, the seed,
    its input data and the hashes of the stages it builds on."""
    stage = recipe.stages[name]
    template = recipe.model.chat_template_kwargs
    return config_hash(
        {
            "stage": stage.model_dump(mode="json"),
            # an empty chat_template_kwargs is left out: stages finished before the key existed stay cached
            "model": recipe.model.model_dump(mode="json", exclude={"chat_template_kwargs"} if not template else None),
            "lora": recipe.lora.model_dump(mode="json") if recipe.lora else None,
            "seed": stage.seed if stage.seed is not None else recipe.seed,
            "data": data_fingerprints(stage),
            "upstream": upstream_hashes,
        }
    )


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
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
