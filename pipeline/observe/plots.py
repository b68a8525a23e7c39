"""PNG plots for stage outputs and the run report (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def histogram(path: Path, series: dict[str, list[float]], title: str, xlabel: str) -> Path:
    """Overlaid histograms of named value lists (e.g. chosen vs rejected rewards)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    values = [v for vs in series.values() for v in vs]
    bins = 30 if values else 1
    lo, hi = (min(values), max(values)) if values else (0, 1)
    for name, vs in series.items():
        ax.hist(vs, bins=bins, range=(lo, hi), alpha=0.55, label=f"{name} (n={len(vs)})")
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def lines(path: Path, series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str) -> Path:
    """Named (x, y) lines, e.g. DPO reward margins over training steps."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker=".", label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def frontier(path: Path, data: dict) -> Path:
    """The alignment trade-off, one labelled point per policy: the alignment measure against capability kept,
    and against KL to the reference policy (``data``: the eval stage's ``frontier`` block)."""
    plt = _plt()
    points = data["points"]
    panels = [
        (key, label)
        for key, label in (
            ("capability", f"capability kept: {data['capability']}"),
            ("kl_to_ref", f"KL to {data['reference']} (nats per response)"),
        )
        if any(p.get(key) is not None for p in points)
    ]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.2 * max(len(panels), 1), 4), dpi=110, squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        shown = [p for p in points if p.get(key) is not None]
        ax.scatter([p[key] for p in shown], [p["alignment"] for p in shown], s=36, zorder=3)
        for p in shown:
            ax.annotate(p["policy"], (p[key], p["alignment"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set(xlabel=label, ylabel=f"alignment: {data['alignment']}")
        ax.grid(alpha=0.3)
    fig.suptitle("Alignment gained against capability kept and distance from the reference", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _save(fig, path: Path) -> None:
    """Atomically: a reader sees the old image or the whole new one."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        fig.savefig(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
