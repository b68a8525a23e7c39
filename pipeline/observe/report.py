"""The run report: ``<run_dir>/report.md`` with stages, key metrics, durations, tracker links and plots,
and the results table ``pipeline run`` prints at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import registry
from pipeline.util.files import write_text_atomic


def _key_metrics(kind: str) -> tuple[str, ...]:
    found = registry.kinds().get(kind)
    return found.key_metrics if found else ()


def stage_rows(manifest: dict[str, Any], names: list[str], warnings_inline: bool = True) -> list[list[str]]:
    """One row per stage. A stage's warnings (it kept little of its input) are written out in the row, or,
    with ``warnings_inline=False`` (the console table), counted there and listed by ``warning_lines``."""
    rows = [["stage", "kind", "status", "time (s)", "key metrics"]]
    for name in names:
        entry = manifest["stages"].get(name, {})
        metrics = entry.get("metrics", {})
        shown = []
        for key in _key_metrics(entry.get("kind", "")):
            if isinstance(metrics.get(key), (int, float)):
                value = metrics[key]
                shown.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        for key, value in metrics.items():
            if key.startswith("checks.") and isinstance(value, dict):
                shown.append(f"{key[7:]}: first {value['first_sample']:.2f} / best {value['best']:.2f}")
        said = metrics.get("warnings") or []
        if said:
            shown.append(
                "; ".join(f"WARNING {w}" for w in said) if warnings_inline else f"{len(said)} warning(s), below"
            )
        if entry.get("status") == "failed":
            error = " ".join(str(entry.get("error", "")).split())  # one line: it sits in a table row
            shown = [f"error: {error[:400]}" + ("..." if len(error) > 400 else "")]
        duration = entry.get("duration_s")
        rows.append(
            [
                name,
                entry.get("kind", "-"),
                entry.get("status", "not run"),
                f"{duration:.1f}" if duration is not None else "-",
                ", ".join(shown),
            ]
        )
    return rows


def policy_rows(eval_metrics: dict[str, Any], first_samples: bool = True) -> list[list[str]]:
    """One row per evaluated policy (and, for best-of-n, its first sample's figures)."""
    policies = eval_metrics.get("policies", {})
    keys: list[str] = []
    for m in policies.values():
        keys += [k for k, v in m.items() if isinstance(v, (int, float)) and k not in keys and k != "n"]
    rows = [["policy"] + keys]
    for name, m in policies.items():
        rows.append([name] + [f"{m[k]:.3f}" if isinstance(m.get(k), (int, float)) else "-" for k in keys])
        first = m.get("first_sample")
        if first_samples and isinstance(first, dict):
            rows.append(
                [f"  {name} (first sample)"]
                + [f"{first[k]:.3f}" if isinstance(first.get(k), (int, float)) else "" for k in keys]
            )
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)


def eval_metrics_of(manifest: dict[str, Any]) -> dict[str, Any] | None:
    for entry in manifest["stages"].values():
        if entry.get("kind") == "eval" and entry.get("status") == "done":
            path = entry.get("outputs", {}).get("metrics")
            if path and Path(path).is_file():
                return json.loads(Path(path).read_text())
    return None


def warning_lines(manifest: dict[str, Any], names: list[str]) -> list[str]:
    return [
        f"WARNING {w}"
        for n in names
        for w in (manifest["stages"].get(n, {}).get("metrics") or {}).get("warnings") or []
    ]


def results_table(manifest: dict[str, Any], names: list[str]) -> str:
    text = text_table(stage_rows(manifest, names, warnings_inline=False))
    said = warning_lines(manifest, names)
    if said:
        text += "\n\n" + "\n".join(said)
    evaluation = eval_metrics_of(manifest)
    if evaluation:
        text += (
            "\n\nheld-out evaluation ("
            + str(evaluation.get("prompts"))
            + " prompts):\n"
            + text_table(policy_rows(evaluation))
        )
    return text


def _headline(run_dir: Path, manifest: dict[str, Any], names: list[str]) -> list[str]:
    """The trade-off at a glance: the eval stage's frontier plot and its points as a table."""
    evaluation = eval_metrics_of(manifest) or {}
    data = evaluation.get("frontier")
    figures = _figures(run_dir, manifest, names, {"frontier": "alignment trade-off"})
    if not data or not figures:
        return []
    rows = [["policy", f"alignment: {data['alignment']}", f"capability: {data['capability']}", "KL to reference"]]
    rows += [
        [p["policy"]]
        + [
            f"{p[k]:.3f}" if isinstance(p.get(k), (int, float)) else "-"
            for k in ("alignment", "capability", "kl_to_ref")
        ]
        for p in data["points"]
    ]
    return [
        "## Alignment trade-off",
        "",
        f"Per policy: alignment (`{data['alignment']}`) against capability kept (`{data['capability']}`) and against "
        f"KL to the reference `{data['reference']}`. Up and to the right on the left panel, up and to the left on the "
        "right one, is better.",
        "",
        f"![alignment trade-off]({figures[0][1].name})",
        "",
        markdown_table(rows),
        "",
    ]


def write_report(run_dir: Path, manifest: dict[str, Any], names: list[str]) -> Path:
    """report.md plus PNG plots beside it."""
    parts = [f"# Run report: {manifest.get('recipe', '')}", "", f"Run directory: `{run_dir}`", ""]
    parts += _headline(run_dir, manifest, names)
    parts += ["## Stages", "", markdown_table(stage_rows(manifest, names)), ""]
    total = sum(manifest["stages"].get(n, {}).get("duration_s") or 0 for n in names)
    parts += [f"Total stage time: {total:.1f} s", ""]
    links = []
    for name in names:
        wandb = manifest["stages"].get(name, {}).get("tracker", {}).get("wandb")
        if wandb:
            links.append(
                f"- {name}: "
                + (
                    f"[{wandb['id']}]({wandb['url']})"
                    if wandb.get("url")
                    else f"offline run `{wandb['dir']}` (`{wandb.get('sync', 'wandb sync')}`)"
                )
            )
    if links:
        parts += ["## Tracking", ""] + links + [""]
    evaluation = eval_metrics_of(manifest)
    if evaluation:
        parts += [
            f"## Held-out evaluation ({evaluation.get('prompts')} prompts, reference `{evaluation.get('reference')}`)",
            "",
            markdown_table(policy_rows(evaluation)),
            "",
        ]
    figures = _figures(run_dir, manifest, names)
    if figures:
        parts += ["## Plots", ""] + [f"![{title}]({path.name})" for title, path in figures] + [""]
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(parts))
    return path


# stage output -> the title of its plot in the report ({name}: the stage)
PLOT_OUTPUTS = {
    "reward_histogram": "{name}: chosen vs rejected rewards",
    "margins_plot": "{name}: DPO reward margins",
    "reward_distribution": "{name}: reward per policy",
}


def _figures(run_dir: Path, manifest: dict[str, Any], names: list[str], outputs=PLOT_OUTPUTS) -> list[tuple[str, Path]]:
    """The stages' plots, copied beside report.md (as ``<stage>_<file>``), with their titles."""
    import shutil

    figures = []
    for name in names:
        entry = manifest["stages"].get(name, {})
        for key, title in outputs.items():
            src = entry.get("outputs", {}).get(key)
            if entry.get("status") == "done" and src and Path(src).is_file():
                dst = run_dir / f"{name}_{Path(src).name}"
                shutil.copyfile(src, dst)
                figures.append((title.format(name=name), dst))
    return figures
