"""Which training checkpoint to resume from: the newest one that is complete and readable.

The Trainer writes a checkpoint file by file, not atomically: a kill -9 or a full disk during a save leaves a
``checkpoint-N`` with a truncated weights file, a truncated optimizer state or no ``trainer_state.json``.
Resuming from it fails deep inside ``torch.load`` (or worse, loads garbage), so every file is checked
first -- cheaply, without loading tensors -- and a damaged checkpoint is set aside as ``corrupt-checkpoint-N``
(kept for inspection, out of the Trainer's sight) with a warning, and the previous one is used. Stdlib only.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# files torch.save writes in its zip format (optimizer, scheduler, RNG states, training args)
_TORCH_ZIP_SUFFIXES = (".pt", ".pth", ".bin")


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """``checkpoint-N`` directories, newest (highest N) first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (first problem found), or None when every file checks out."""
    state = path / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the save did not finish)"
    try:
        json.loads(state.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        return f"trainer_state.json is not valid JSON ({exc})"
    weights = [*path.glob("*.safetensors")]
    if not weights and not any(path.glob("global_step*")):  # DeepSpeed keeps its states in global_stepN/
        return "no weights file (*.safetensors)"
    for file in sorted(weights):
        problem = _safetensors_problem(file)
        if problem:
            return f"{file.name}: {problem}"
    for file in sorted(p for p in path.iterdir() if p.suffix in _TORCH_ZIP_SUFFIXES and p.is_file()):
        if not zipfile.is_zipfile(file):
            return f"{file.name}: truncated or not a torch.save archive ({file.stat().st_size} bytes)"
    return None


def _safetensors_problem(file: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes the header maps."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes)"
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            return f"truncated in its header ({size} bytes)"
        try:
            header = json.loads(fh.read(header_len))
        except (ValueError, UnicodeDecodeError):
            return "unreadable header"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    expected = 8 + header_len + end
    if size < expected:
        return f"truncated: {size} of {expected} bytes"
    return None


def last_good_checkpoint(ckpt_dir: Path, warn: Callable[[str], None]) -> str | None:
    """The newest complete checkpoint under ``ckpt_dir``; damaged newer ones are renamed aside with a warning."""
    for path in checkpoints(ckpt_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        aside = path.with_name(f"corrupt-{path.name}")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"corrupt{n}-{path.name}")
        path.rename(aside)
        warn(
            f"{path.name} is damaged ({problem}), probably by a kill or a full disk during its save: "
            f"set aside as {aside.name}; resuming from the checkpoint before it"
        )
    return None
