"""The run report: ``<run_dir>/report.md`` with stages, key metrics, durations, tracker links and plots,
and the results table ``pipeline run`` prints at the end.

A stage whose metrics hold ``examples`` (a list of ``{prompt_id, prompt, why, responses: [{policy, response,
checks, reward}]}``, e.g. eval's) gets its example responses side by side in report.md, whatever its kind.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.config import registry
from pipeline.util.files import write_text_atomic
from pipeline.util.text import markdown_table, text_table


def _kind(entry: dict[str, Any]) -> registry.StageKind | None:
    """The registered kind of a manifest entry (None for a kind no longer installed: shown, not interpreted)."""
    return registry.kinds().get(entry.get("kind", ""))


def _key_metrics(entry: dict[str, Any]) -> tuple[str, ...]:
    found = _kind(entry)
    return found.key_metrics if found else ()


def stage_rows(manifest: dict[str, Any], names: list[str], warnings_inline: bool = True) -> list[list[str]]:
    """One row per stage. A stage's warnings (it kept little of its input) are written out in the row, or,
    with ``warnings_inline=False`` (the console table), counted there and listed by ``warning_lines``."""
    rows = [["stage", "kind", "status", "time (s)", "key metrics"]]
    for name in names:
        entry = manifest["stages"].get(name, {})
        metrics = entry.get("metrics", {})
        shown = []
        for key in _key_metrics(entry):
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
        if entry.get("status") in ("failed", "interrupted"):
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


def _hooked(manifest: dict[str, Any], names: list[str], hook: str) -> Iterator[tuple[str, dict, Callable, dict]]:
    """(name, entry, the kind's ``hook``, full metrics) of each finished stage whose kind has that hook."""
    for name in names:
        entry = manifest["stages"].get(name, {})
        found = getattr(_kind(entry), hook, None)
        if found is not None and entry.get("status") == "done":
            yield name, entry, found, _full_metrics(entry)


def _full_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """A stage's metrics file (a kind's own file holds more than the manifest), else the manifest's copy."""
    path = entry.get("outputs", {}).get("metrics")
    metrics = json.loads(Path(path).read_text()) if path and Path(path).is_file() else entry.get("metrics")
    return metrics or {}


def stage_tables(
    manifest: dict[str, Any], names: list[str], detailed: bool = True
) -> list[tuple[str, list[list[str]]]]:
    """(title, rows) of every table the finished stages' kinds make of their metrics (e.g. eval's policies)."""
    return [
        table
        for _, _, tables, metrics in _hooked(manifest, names, "tables")
        for table in tables(metrics, detailed).values()
    ]


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
    for title, rows in stage_tables(manifest, names):
        text += f"\n\n{title}:\n" + text_table(rows)
    return text


def _headlines(run_dir: Path, manifest: dict[str, Any], names: list[str]) -> list[str]:
    """What the finished stages' kinds put at the top of the report (e.g. eval's alignment trade-off)."""
    parts = []
    for name, entry, headline, metrics in _hooked(manifest, names, "headline"):
        parts += headline(metrics, lambda output, entry=entry, name=name: _copy_plot(run_dir, name, entry, output))
    return parts


def write_report(run_dir: Path, manifest: dict[str, Any], names: list[str]) -> Path:
    """report.md plus PNG plots beside it."""
    parts = [f"# Run report: {manifest.get('recipe', '')}", "", f"Run directory: `{run_dir}`", ""]
    parts += _headlines(run_dir, manifest, names)
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
    for title, rows in stage_tables(manifest, names):
        parts += [f"## {title[0].upper()}{title[1:]}", "", markdown_table(rows), ""]
    parts += example_sections(manifest, names)
    figures = _figures(run_dir, manifest, names)
    if figures:
        parts += ["## Plots", ""] + [f"![{title}]({file})" for title, file in figures] + [""]
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(parts))
    return path


def _copy_plot(run_dir: Path, name: str, entry: dict[str, Any], output: str) -> str | None:
    """Copy a done stage's plot output beside report.md (as ``<stage>_<file>``); its file name, or None."""
    import shutil

    src = entry.get("outputs", {}).get(output)
    if entry.get("status") != "done" or not src or not Path(src).is_file():
        return None
    dst = run_dir / f"{name}_{Path(src).name}"
    shutil.copyfile(src, dst)
    return dst.name


def _figures(run_dir: Path, manifest: dict[str, Any], names: list[str]) -> list[tuple[str, str]]:
    """(title, file name) of the stages' plots (their kinds' ``plots``), copied beside report.md."""
    figures = []
    for name in names:
        entry = manifest["stages"].get(name, {})
        kind = _kind(entry)
        for output, title in (kind.plots if kind else {}).items():
            copied = _copy_plot(run_dir, name, entry, output)
            if copied:
                figures.append((title.format(name=name), copied))
    return figures


# --------------------------------------------------------------------------------------------
# Example responses side by side
# --------------------------------------------------------------------------------------------


REWARD_COLUMN = "reward"  # the reward model's score of each response


def example_sections(manifest: dict[str, Any], names: list[str]) -> list[str]:
    """Markdown of every finished stage's ``examples``: per prompt, the prompt, then a row per policy."""
    parts: list[str] = []
    for name in names:
        entry = manifest["stages"].get(name, {})
        examples = _full_metrics(entry).get("examples") if entry.get("status") == "done" else None
        if not isinstance(examples, list) or not examples:
            continue
        parts += [
            f"## Example responses: `{name}`",
            "",
            f"{len(examples)} held-out prompts, each policy's response with its checker results (✓ pass, ✗ fail) "
            "and, with a reward model, its reward: first where the policies disagree most, then a seeded random "
            "choice.",
            "",
        ]
        for i, example in enumerate(examples, 1):
            parts += example_markdown(i, example)
    return parts


def example_markdown(number: int, example: dict[str, Any]) -> list[str]:
    """One prompt (in a code block, verbatim) and a table row per policy (cells escaped for markdown)."""
    responses = example.get("responses") or []
    checks = list(dict.fromkeys(c for r in responses for c in r.get("checks") or {}))
    rewarded = any(isinstance(r.get("reward"), (int, float)) for r in responses)
    header = ["policy", "response", *checks, *([REWARD_COLUMN] if rewarded else [])]
    lines = ["| " + " | ".join(markdown_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for r in responses:
        verdicts = [{True: "✓", False: "✗"}.get((r.get("checks") or {}).get(c), "-") for c in checks]
        reward = r.get("reward")
        score = [f"{reward:.2f}" if isinstance(reward, (int, float)) else "-"] if rewarded else []
        cells = [markdown_cell(str(r.get("policy", ""))), markdown_cell(str(r.get("response", ""))), *verdicts, *score]
        lines.append("| " + " | ".join(cells) + " |")
    why = f": {example['why']}" if example.get("why") else ""
    heading = f"### {number}. prompt `{example.get('prompt_id', '?')}`{why}"
    return [heading, "", *fenced(str(example.get("prompt", ""))), "", *lines, ""]


# Characters markdown would read as markup inside a table cell; HTML's own three become entities.
_CELL_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "\\|"} | {c: "\\" + c for c in "\\`*[]~$#"})
# An underscore inside a word (preference_pass) is no emphasis in CommonMark; only the others need escaping.
_LOOSE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def markdown_cell(text: str) -> str:
    """``text`` as one markdown table cell that shows it verbatim: markup escaped, newlines as <br>."""
    escaped = _LOOSE_UNDERSCORE.sub(r"\\_", text.strip().translate(_CELL_ESCAPES))
    return "<br>".join(escaped.splitlines()) or "(empty)"


def fenced(text: str) -> list[str]:
    """``text`` in a fenced code block whose fence is longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text, fence]
