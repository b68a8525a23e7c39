"""The model card of an exported stage: ``README.md`` in Hugging Face's layout.

A YAML metadata header (``base_model``, ``datasets``, ``license``, ``tags``, ``library_name``, ``pipeline_tag``)
between ``---`` lines, then the model's lineage read from the run directory: every stage it was built from, in
the order they ran, each with its kind, inputs, data sources and their fingerprints, key settings, headline
metrics and recorded config hash; then the evaluation of the stages that evaluated it.

Everything is generic over stage kinds: a stage's upstream stages are its config's from-fields
(``StageConfig.upstream``) and the manifest's ``upstream``; its headline metrics, tables and figures come from
its kind in the registry. ``render_card`` is pure (run directory in, markdown out); ``write_card`` also copies
the figures the card shows beside it. No torch here.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import builtin
from pipeline.config import Recipe, StageConfig, iter_sources, recipe_from_dict, registry
from pipeline.config.model import RUN_DATE_KEY
from pipeline.run.manifest import Manifest, file_fingerprint, stage_hash
from pipeline.util.files import write_text_atomic
from pipeline.util.text import markdown_table

CARD = "README.md"
# Train settings that say how a run was logged and checkpointed, not what the model learned from.
TRAIN_BOOKKEEPING = frozenset({"logging_steps", "eval_steps", "save_steps", "save_total_limit", "eval_batch_size"})
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

Figure = Callable[[str, str], "str | None"]  # (stage, output name) -> file name beside the card, or None


@dataclass(frozen=True)
class Step:
    """One stage of the run as recorded: its manifest entry and the resolved recipe it ran with."""

    name: str
    entry: dict[str, Any]
    recipe: Recipe | None  # None: its recipe.yaml is missing or no longer valid (shown from the manifest only)

    @property
    def kind(self) -> str:
        return self.entry.get("kind", "?")

    @property
    def cfg(self) -> StageConfig | None:
        return self.recipe.stages.get(self.name) if self.recipe else None

    def inputs(self) -> dict[str, str]:
        """from-field path -> the stage it takes output from (the manifest's record where the config is gone)."""
        if self.cfg is not None:
            return self.cfg.upstream()
        return {f"upstream[{i}]": name for i, name in enumerate(self.entry.get("upstream") or {})}


def load_steps(run_dir: Path) -> dict[str, Step]:
    """Every stage in the manifest, in the order they first ran."""
    stages = Manifest(run_dir).read().get("stages", {})
    return {name: Step(name, entry, _stage_recipe(run_dir, name)) for name, entry in stages.items()}


def _stage_recipe(run_dir: Path, name: str) -> Recipe | None:
    """The resolved recipe saved beside the stage's outputs when it started (else the run's)."""
    for path in (run_dir / name / "recipe.yaml", run_dir / "recipe.yaml"):
        if path.is_file():
            try:
                recipe = recipe_from_dict(yaml.safe_load(path.read_text()) or {})
            except Exception:  # a plugin kind no longer installed, a damaged file: the manifest still tells a lot
                return None
            return recipe if name in recipe.stages else None
    return None


def lineage(steps: dict[str, Step], stage: str) -> list[str]:
    """Every stage ``stage`` was built from, transitively, in run order, then ``stage`` itself."""
    found, todo = set(), [stage]
    while todo:
        name = todo.pop()
        if name in found or name not in steps:
            continue
        found.add(name)
        todo += [*steps[name].inputs().values(), *(steps[name].entry.get("upstream") or {})]
    return [name for name in steps if name in found and name != stage] + [stage]


def evaluators(steps: dict[str, Step], stage: str) -> list[str]:
    """Finished stages that take ``stage`` as an input and whose kind makes tables of its metrics (an evaluation)."""
    return [
        name
        for name, step in steps.items()
        if name != stage
        and step.entry.get("status") == "done"
        and stage in step.inputs().values()
        and getattr(registry.kinds().get(step.kind), "tables", None) is not None
    ]


def hub_model_id(name: str | None) -> str | None:
    """``name`` when it is a Hub model id; None for the built-in model, a local directory or a path."""
    if not name or builtin.is_builtin(name) or name.startswith((".", "/", "~")) or Path(name).exists():
        return None
    return name if _HUB_ID.match(name) else None


# ---------------------------------------------------------------- the card


def render_card(
    run_dir: Path,
    stage: str,
    export_info: dict[str, Any],
    license: str | None = None,
    repo_id: str | None = None,
    figure: Figure | None = None,
) -> str:
    """The card's markdown. ``export_info``: what export did (export.json); ``figure`` places a stage's plot
    beside the card and gives its file name (None: the card names no figures)."""
    steps = load_steps(Path(run_dir))
    names = lineage(steps, stage)
    recipe = steps[stage].recipe
    parts = [front_matter(header(steps, names, export_info, license)), ""]
    parts += _intro(steps[stage], recipe, export_info, repo_id, license)
    parts += _base_model(recipe, export_info)
    parts += _prompt_format(recipe, prompt_template(steps, stage), Manifest(Path(run_dir)).read().get("run_date"))
    parts += ["## Lineage", "", _lineage_intro(names), ""]
    for number, name in enumerate(names, 1):
        parts += stage_section(number, steps[name], steps)
    for name in evaluators(steps, stage):
        parts += evaluation_section(steps[name], stage, figure or (lambda *_: None))
    parts += _reproduce(steps[stage])
    return "\n".join(parts).rstrip() + "\n"


def header(steps: dict[str, Step], names: list[str], export_info: dict[str, Any], license: str | None):
    """The metadata the Hub reads: only what can be named there (Hub ids), in its field names."""
    recipe = steps[names[-1]].recipe  # the exported stage: lineage() ends with it
    base = hub_model_id(recipe.model.name_or_path) if recipe else None
    datasets = hub_datasets(steps, names)
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    if datasets:
        meta["datasets"] = datasets
    if license:
        meta["license"] = license
    meta["library_name"] = "transformers"
    reward_head = export_info.get("head") == "reward"
    meta["pipeline_tag"] = "text-classification" if reward_head else "text-generation"
    meta["tags"] = tags(steps, names, export_info)
    return meta


def hub_datasets(steps: dict[str, Step], names: list[str]) -> list[str]:
    """The Hub dataset ids any stage of the lineage read (local files are named in the body)."""
    found = [source.hub for n in names if steps[n].cfg for _, source in iter_sources(steps[n].cfg) if source.hub]
    return list(dict.fromkeys(found))


def tags(steps: dict[str, Step], names: list[str], export_info: dict[str, Any]) -> list[str]:
    """The kinds along the lineage, "trl" where a stage trained a model, "peft" / "lora" where an adapter was merged."""
    kinds = [steps[n].kind for n in names]
    found = list(dict.fromkeys(k for k in kinds if k != "?"))
    if any(getattr(registry.kinds().get(k), "model_head", None) for k in kinds):
        found.append("trl")  # every model-training kind trains with a TRL trainer
    if export_info.get("merged_adapter"):
        found += ["peft", "lora"]
    return found + ["pipeline-alignment"]


def front_matter(meta: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---"


def _intro(step: Step, recipe: Recipe | None, info: dict[str, Any], repo_id: str | None, license: str | None):
    title = repo_id or f"{recipe.name if recipe else 'run'}-{step.name}"
    form = "its LoRA adapter merged into the base model" if info.get("merged_adapter") else "full weights"
    loader = "AutoModelForSequenceClassification" if info.get("head") == "reward" else "AutoModelForCausalLM"
    where = repo_id or "path/to/this/folder"
    licensed = (
        f"License: `{license}`."
        if license
        else "License: not set at export (`pipeline export --license ID`); the licenses of the base model and of "
        "the training data apply."
    )
    return [
        f"# {title}",
        "",
        f"Stage `{step.name}` (kind `{step.kind}`) of the run `{recipe.name if recipe else '?'}`, exported by "
        f"`python -m pipeline export` as a standalone model ({form}).",
        "",
        "```python",
        f"from transformers import {loader}, AutoTokenizer",
        "",
        f'model = {loader}.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "```",
        "",
        licensed,
        "",
    ]


def _base_model(recipe: Recipe | None, info: dict[str, Any]) -> list[str]:
    if recipe is None:
        return []
    model = recipe.model
    where = "on the Hugging Face Hub" if hub_model_id(model.name_or_path) else "not on the Hub"
    lines = ["## Base model", "", f"`{model.name_or_path}` ({where}); dtype `{model.dtype}`"]
    lines[-1] += f", loaded {model.quantization} for training" if model.quantization != "none" else ""
    if recipe.lora:
        lora = recipe.lora
        targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
        lines[-1] += f"; LoRA r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, targets {targets}"
    merged = " The adapter was merged into the base in full precision." if info.get("merged_adapter") else ""
    return [*lines[:-1], lines[-1] + "." + merged, ""]


def prompt_template(steps: dict[str, Step], stage: str) -> str | None:
    """The prompt template the model learned: the stage's own, else the nearest upstream stage's (breadth first)."""
    seen, todo = set(), [stage]
    while todo:
        name = todo.pop(0)
        if name in seen or name not in steps:
            continue
        seen.add(name)
        cfg = steps[name].cfg
        template = getattr(getattr(cfg, "data", None), "template", None) or getattr(cfg, "template", None)
        if template and template != "none":  # "none": prompts used as written, rendered upstream
            return template
        todo += list(steps[name].inputs().values())
    return None


def _prompt_format(recipe: Recipe | None, template: str | None, run_date: str | None) -> list[str]:
    """How prompts were written in training; the exported tokenizer's chat template is as released (export strips
    the defaults the run wrote into it), so the card says what to pass to prompt the model as it was trained."""
    if recipe is None or template is None:
        return []
    if template == "chat":
        said = "rendered with the tokenizer's chat template"
        kwargs = {k: v for k, v in recipe.model.chat_template_kwargs.items() if not k.startswith("_")}
        if kwargs:
            said += f", with `chat_template_kwargs` `{json.dumps(kwargs)}`"
        if run_date:
            said += f"; a template that prints a date was given the run's date, {run_date}"
        note = (
            " The exported tokenizer carries the template as released: pass the same variables to "
            "`apply_chat_template` to prompt the model as it was trained."
        )
    else:
        said, note = "written in the Alpaca prompt format (`### Instruction:` ... `### Response:`)", ""
    return ["## Prompt format", "", f"Training prompts were {said}.{note}", ""]


def _lineage_intro(names: list[str]) -> str:
    chain = " → ".join(f"`{n}`" for n in names)
    return (
        f"The stages this model was built from, in the order they ran: {chain}. Inputs name the stage whose output "
        "a setting takes; data fingerprints are content hashes of the files (`pipeline.run.manifest."
        "file_fingerprint`); the config hash is the one the run recorded (settings, data fingerprints, upstream "
        "hashes), checked against the files as they are now."
    )


# ---------------------------------------------------------------- one stage of the lineage


def stage_section(number: int, step: Step, steps: dict[str, Step]) -> list[str]:
    lines = [f"### {number}. `{step.name}` ({step.kind})", ""]
    by_stage: dict[str, list[str]] = {}
    for path, name in step.inputs().items():
        by_stage.setdefault(name, []).append(f"`{path}`")
    shown = ", ".join(f"`{name}` (as {', '.join(paths)})" for name, paths in by_stage.items())
    lines.append(f"- inputs: {shown}" if shown else "- inputs: the base model")
    for label, values in (("settings", stage_settings(step)), ("training", train_settings(step))):
        if values:
            lines.append(f"- {label}: " + ", ".join(f"`{k}={_value(v)}`" for k, v in values.items()))
    figures = headline_metrics(step)
    lines.append("- metrics: " + (", ".join(f"`{k}={_value(v)}`" for k, v in figures.items()) or "none recorded"))
    lines.append(f"- recorded: {_recorded(step)}")
    data = data_rows(step, steps)
    if len(data) > 1:
        lines += ["", markdown_table(data)]
    return [*lines, ""]


def data_rows(step: Step, steps: dict[str, Step]) -> list[list[str]]:
    """One row per data source: where in the config, what it is, its fingerprint."""
    rows = [["data", "source", "fingerprint"]]
    for where, source in iter_sources(step.cfg) if step.cfg else ():
        amount = f" (first {source.limit} rows)" if source.limit else ""
        if source.path:
            what, fingerprint = f"`{Path(source.path).name}`, local file{amount}", _fingerprint(source.path)
        elif source.hub:
            parts = [f"subset {source.subset}" if source.subset else "", f"split {source.split}"]
            what = f"Hub dataset `{source.hub}` ({', '.join(p for p in parts if p)}){amount}"
            fingerprint = "Hub (id and split)"
        else:
            # the DataSource default: a stage's "best" rows
            upstream = steps.get(source.from_stage or "")
            outputs = (upstream.entry.get("outputs") or {}) if upstream else {}
            key = source.output or "best"
            path = outputs.get(key)
            named = f" (`{Path(path).name}`)" if isinstance(path, str) else ""
            what, fingerprint = f"output `{key}` of stage `{source.from_stage}`{named}", _fingerprint(path)
        rows.append([f"`{where}`", what, fingerprint])
    return rows


def _fingerprint(path: str | None) -> str:
    if not isinstance(path, str) or not Path(path).is_file():
        return "missing now"
    return f"`{file_fingerprint(Path(path))}`"


def stage_settings(step: Step) -> dict[str, Any]:
    """The kind's own settings: every top-level value, and those one level below (``select.top_k``) that differ
    from their default; not its inputs, data sources or training block."""
    cfg = step.cfg
    if cfg is None:
        return {}
    skip = {path.split("[")[0] for path in step.inputs()} | {where for where, _ in iter_sources(cfg)}
    found: dict[str, Any] = {}
    for key, value in cfg.model_dump(mode="json").items():
        if key in ("kind", "train") or key in skip:
            continue
        if isinstance(value, dict):
            defaults = _defaults(getattr(cfg, key))
            found.update(
                {
                    f"{key}.{k}": v
                    for k, v in value.items()
                    if f"{key}.{k}" not in skip and _scalar(v) and (k not in defaults or defaults[k] != v)
                }
            )
        elif _scalar(value):
            found[key] = value
    return found


def _defaults(block: Any) -> dict[str, Any]:
    """Field -> default of a settings block (a pydantic model); {} for a plain mapping, whose values all count."""
    fields = getattr(type(block), "model_fields", {})
    return {name: field.default for name, field in fields.items() if not field.is_required()}


def train_settings(step: Step) -> dict[str, Any]:
    """The ``train`` block's settings that shape the model (not logging or checkpoint intervals)."""
    train = getattr(step.cfg, "train", None)
    if train is None or not hasattr(train, "model_dump"):
        return {}
    values = {k: v for k, v in train.model_dump(mode="json").items() if k not in TRAIN_BOOKKEEPING and _scalar(v)}
    if values.get("max_steps") is not None:
        values.pop("epochs", None)  # max_steps overrides epochs
    values.update({f"trainer_extra.{k}": v for k, v in (train.trainer_extra or {}).items() if _scalar(v)})
    return values


def _scalar(value: Any) -> bool:
    """A value worth a place in a one-line summary: set, and a number, word or short list of them."""
    if isinstance(value, list):
        return bool(value) and len(value) <= 6 and all(isinstance(v, (str, int, float, bool)) for v in value)
    return isinstance(value, (str, int, float, bool))


def headline_metrics(step: Step) -> dict[str, Any]:
    """The kind's key metrics (all numeric ones for a kind without), and rubric checks' first-sample/best rates."""
    metrics = step.entry.get("metrics") or {}
    keys = getattr(registry.kinds().get(step.kind), "key_metrics", ()) or [
        k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    found = {k: metrics[k] for k in keys if isinstance(metrics.get(k), (int, float))}
    for key, value in metrics.items():
        if key.startswith("checks.") and isinstance(value, dict):
            found.update({f"{key[7:]}.{k}": v for k, v in value.items() if isinstance(v, (int, float))})
    return found


def _recorded(step: Step) -> str:
    entry = step.entry
    status = entry.get("status", "not run")
    when = f", finished {entry['ended_at']}" if entry.get("ended_at") else ""
    took = f" in {entry['duration_s']:.0f} s" if isinstance(entry.get("duration_s"), (int, float)) else ""
    return f"{status}{when}{took}; config hash `{entry.get('config_hash', '?')}` ({hash_check(step)})"


def hash_check(step: Step) -> str:
    """Whether the recorded config hash still matches the stage's settings and its data files as they are now."""
    recorded = step.entry.get("config_hash")
    if step.recipe is None or not recorded:
        return "not checked: its resolved recipe is not in the run directory"
    try:
        now = stage_hash(_as_hashed(step.recipe), step.name, step.entry.get("upstream") or {})
    except Exception as exc:  # a file that cannot be read: say so, the card is still worth having
        return f"not checked: {type(exc).__name__}"
    if now == recorded:
        return "matches the settings and data fingerprints above"
    return "differs: a data file or setting changed since the stage ran"


def _as_hashed(recipe: Recipe) -> Recipe:
    """The recipe as the run hashed it: the saved copy also carries the run's date, which stages are given and
    the hash leaves out (pipeline.run.runner.with_run_date)."""
    kwargs = {k: v for k, v in recipe.model.chat_template_kwargs.items() if k != RUN_DATE_KEY}
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"chat_template_kwargs": kwargs})})


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)


# ---------------------------------------------------------------- evaluation and provenance


def evaluation_section(step: Step, stage: str, figure: Figure) -> list[str]:
    """What an evaluating stage's kind shows of its metrics (its headline and tables), this model's rows in bold."""
    kind = registry.kinds()[step.kind]
    metrics = full_metrics(step.entry)
    via = ", ".join(f"`{path}`" for path, name in step.inputs().items() if name == stage)
    lines = ["## Evaluation", "", f"Stage `{step.name}` ({step.kind}) took this model as {via}; what it measured:", ""]
    if kind.headline is not None:
        lines += [f"#{line}" if line.startswith("#") else line for line in kind.headline(metrics, _for(step, figure))]
    for title, rows in kind.tables(metrics, True).values():
        rows = [rows[0]] + [[f"**{r[0]}**", *r[1:]] if r and r[0] == stage else r for r in rows[1:]]
        lines += [f"### {title[:1].upper()}{title[1:]}", "", markdown_table(rows), ""]
    return lines


def _for(step: Step, figure: Figure) -> Callable[[str], str | None]:
    return lambda output: figure(step.name, output)


def full_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """A stage's own metrics file when it wrote one (it holds more than the manifest), else the manifest's."""
    path = (entry.get("outputs") or {}).get("metrics")
    if isinstance(path, str) and Path(path).is_file():
        return json.loads(Path(path).read_text())
    return entry.get("metrics") or {}


def _reproduce(step: Step) -> list[str]:
    entry = step.entry
    versions = ", ".join(f"{k} {v}" for k, v in (entry.get("versions") or {}).items())
    lines = ["## Provenance", ""]
    if entry.get("git_commit"):
        lines.append(f"- pipeline commit: `{entry['git_commit']}`")
    if versions:
        lines.append(f"- packages: {versions}")
    lines.append(f"- seed: {step.recipe.seed if step.recipe else '?'}; world size {entry.get('world_size', '?')}")
    return [*lines, ""]


# ---------------------------------------------------------------- writing


def write_card(
    run_dir: Path,
    stage: str,
    out_dir: Path,
    export_info: dict[str, Any],
    license: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``README.md`` into ``out_dir`` (atomically), with the figures it shows copied beside it."""
    steps_dir = Path(run_dir)

    def figure(name: str, output: str) -> str | None:
        entry = Manifest(steps_dir).stage(name)
        source = (entry.get("outputs") or {}).get(output)
        if not isinstance(source, str) or not Path(source).is_file():
            return None
        copied = out_dir / f"{name}_{Path(source).name}"
        shutil.copyfile(source, copied)
        return copied.name

    text = render_card(steps_dir, stage, export_info, license=license, repo_id=repo_id, figure=figure)
    path = Path(out_dir) / CARD
    write_text_atomic(path, text)
    return path
