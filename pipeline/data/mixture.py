"""Weighted mixtures: which rows of each source a stage uses.

Each source is read and checked by its own loader first (so its counts -- read, kept, dropped and why -- are
its own); ``mix`` then takes from each a share of the mix (``weight``), a number of rows (``rows``), a
fraction of it (``fraction``), or all of it. Rows are drawn at random under the seed, without repeats until
a source runs out; a share larger than the source repeats its rows, counted as ``repeated``. No torch here.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipeline.util.errors import DataError

T = TypeVar("T")


@dataclass
class Part:
    """One source after its loader: the rows it kept and its own counts (read, kept, dropped: reason -> n)."""

    name: str
    items: list
    counts: dict[str, Any] = field(default_factory=dict)


def mix(parts: list[Part], mixture, seed: int) -> tuple[list, list[dict[str, Any]]]:
    """The mixed rows (source by source, each in its file order) and one summary row per source.
    ``mixture``: a pipeline.config Mixture. A single source with no amount passes through unchanged."""
    plain = len(parts) == 1 and not is_mixed(mixture.sources[0])
    wanted = [len(parts[0].items)] if plain else targets(mixture, [len(p.items) for p in parts])
    mixed, summary = [], []
    total = sum(wanted)
    for index, (part, source, k) in enumerate(zip(parts, mixture.sources, wanted)):
        if k > 0 and not part.items:
            raise DataError(f"{part.name}: no rows left after its checks, but the mixture asks for {k} from it")
        chosen, repeated = (
            (part.items, 0) if plain else take(part.items, k, random.Random(f"{seed}:{index}:{part.name}"))
        )
        mixed.extend(chosen)
        amount = _amount(source)
        summary.append(
            {
                "source": part.name,
                **part.counts,
                **({amount[0]: amount[1]} if amount else {}),
                "taken": len(chosen),
                "repeated": repeated,
                "share": round(len(chosen) / total, 4) if total else 0.0,
            }
        )
    return mixed, summary


def targets(mixture, available: list[int]) -> list[int]:
    """Rows to take from each source: shares of the mix's size for weights, else each source's own amount."""
    if mixture.weighted:
        weights = [s.weight for s in mixture.sources]
        size = mixture.rows if mixture.rows is not None else largest_unrepeated(weights, available)
        return apportion(size, weights)
    wanted = []
    for source, n in zip(mixture.sources, available):
        if source.rows is not None:
            wanted.append(source.rows)
        elif source.fraction is not None:
            wanted.append(round(source.fraction * n))
        else:
            wanted.append(n)
    return wanted


def largest_unrepeated(weights: list[float], available: list[int]) -> int:
    """The largest mix size whose shares need no source's rows twice."""
    total = sum(weights)
    return min(math.floor(n * total / w + 1e-9) for w, n in zip(weights, available))


def apportion(size: int, weights: list[float]) -> list[int]:
    """``size`` split in proportion to ``weights``, rounded so the parts add up to ``size`` (largest remainder)."""
    total = sum(weights)
    exact = [size * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: size - sum(counts)]:
        counts[i] += 1
    return counts


def take(items: list[T], k: int, rng: random.Random) -> tuple[list[T], int]:
    """``k`` of ``items`` at random, in their order; whole passes first when ``k`` exceeds them.
    Returns the rows and how many are repeats."""
    n = len(items)
    passes, rest = divmod(k, n) if n else (0, 0)
    picked = sorted(rng.sample(range(n), rest))
    return [x for _ in range(passes) for x in items] + [items[i] for i in picked], max(0, k - n)


def is_mixed(source) -> bool:
    """Whether a source asks for an amount of its rows (weight / rows / fraction) rather than all of them."""
    return _amount(source) is not None


def _amount(source) -> tuple[str, float] | None:
    for key in ("weight", "rows", "fraction"):
        value = getattr(source, key)
        if value is not None:
            return key, value
    return None


def summary_lines(summary: list[dict[str, Any]], unit: str = "rows") -> list[str]:
    """Console lines for a mixture of more than one source (a single plain source says nothing new)."""
    if not summary or (len(summary) == 1 and not any(k in summary[0] for k in ("weight", "rows", "fraction"))):
        return []
    lines = [f"  mixture: {sum(s['taken'] for s in summary)} {unit} from {len(summary)} source(s)"]
    for s in summary:
        dropped = s.get("dropped") or {}
        why = ", ".join(f"{reason} {n}" for reason, n in dropped.items() if n)
        repeats = f", {s['repeated']} repeated" if s["repeated"] else ""
        lines.append(
            f"    {s['source']}: read {s.get('read', '?')}, kept {s.get('kept', '?')}"
            + (f" (dropped {why})" if why else "")
            + f", took {s['taken']}{repeats} = {s['share']:.1%} of the mix"
        )
    return lines


def say_mixture(say, stage: str, summary: list[dict[str, Any]] | None, unit: str) -> None:
    """Print a mixture's per-source lines under the stage's name (nothing for a single plain source)."""
    for line in summary_lines(summary or [], unit):
        say(f"[{stage}] {line.strip()}")
