"""Sizes: GiB, a ``--gpu-memory`` value read into bytes, and how bytes and parameter counts are written."""

from __future__ import annotations

import re

from pipeline.util.errors import PipelineError

GIB = 1024**3
MIB = 1024**2


def parse_gpu_memory(text: str | int | float | None) -> int | None:
    """'24GiB', '24GB', '80G', '24' (GiB), '16384MiB' -> bytes. GB and G are read as GiB: GPU memory sizes
    on spec sheets ('24 GB', '80 GB') are binary."""
    if text is None or text == "":
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*", str(text).lower())
    if not match or float(match.group(1)) <= 0:
        raise PipelineError(f"--gpu-memory {text!r}: not a memory size; give e.g. 24GiB, 24GB, 80G or 24 (GiB)")
    unit = (match.group(2) or "g")[0]
    return int(float(match.group(1)) * {"m": MIB, "g": GIB, "t": 1024 * GIB}[unit])


def gib(n: float) -> str:
    return f"{n / GIB:.2f}" if abs(n) >= 0.1 * GIB or n == 0 else f"{n / GIB:.3f}"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
