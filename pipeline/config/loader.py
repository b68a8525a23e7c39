"""Loading a recipe: YAML -> ``--set`` overrides -> validation -> cross-field rules -> absolute paths.

Every problem is collected and reported at once, each naming its key path; unknown keys get the closest
valid name. Stage kinds come from the registry (``pipeline.stages``). No torch here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config import registry
from pipeline.config.data import SOURCE_TAGS, DataSource, iter_sources, map_sources
from pipeline.config.recipe import Recipe
from pipeline.config.rounds import expand_rounds
from pipeline.config.stage import StageConfig
from pipeline.util.errors import RecipeError
from pipeline.util.text import suggest

# --------------------------------------------------------------------------------------------
# Loading: YAML -> overrides -> validation -> cross-field rules
# --------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path} is a directory; give the recipe's YAML file, e.g. {path / 'recipe.yaml'}")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8-sig"), str(path))
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping with at least 'name' and 'stages'")
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw, source=path)


def load_yaml(text: str, where: str) -> Any:
    """YAML -> Python, refusing duplicate keys: YAML keeps the last of two equal keys, so a second ``sft:`` under
    ``stages`` would silently replace the first stage."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        duplicates = list(_duplicate_keys(node, (), set()))
        if duplicates:
            raise RecipeError(
                f"{where}: duplicate key(s); YAML keeps only the last one, so the first would be lost without a word:\n"
                + "\n".join(
                    f"  - {key_path}: "
                    + (f"given twice on line {first}" if first == second else f"line {second} repeats line {first}")
                    + "; rename one or merge them"
                    for key_path, first, second in duplicates
                )
            )
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: not valid YAML: {exc}") from None


def _duplicate_keys(node: Any, path: tuple[str, ...], seen: set[int]):
    """(key path, first line, repeated line) of each key given twice in one mapping, anywhere under ``node``."""
    if node is None or id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<":  # '<<' merges a mapping in; it may appear once per anchor
                line = key_node.start_mark.line + 1
                if key in lines:
                    yield ".".join((*path, key)), lines[key], line
                else:
                    lines[key] = line
            yield from _duplicate_keys(value_node, (*path, key or "?"), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, (*path[:-1], f"{path[-1]}[{i}]") if path else (f"[{i}]",), seen)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` to the raw recipe dict; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item!r}: expected key.path=value, e.g. stages.sft.train.learning_rate=1e-4")
    parts = key.strip().split(".")
    try:
        value = load_yaml(text, f"--set {item!r}") if text.strip() else ""
    except RecipeError as exc:
        if "duplicate key" in str(exc):
            raise
        value = text
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise RecipeError(
                f"--set {item!r}: {where} is a value, not a section, so it has no key {parts[depth + 1]!r}"
            )
        node = child
    node[parts[-1]] = value


def recipe_from_dict(raw: dict[str, Any], source: Path | None = None) -> Recipe:
    raw = copy.deepcopy(raw)
    where = f"{source}: " if source else ""
    errors: list[str] = []

    _load_plugins(raw.get("plugins"), errors)
    stages_raw = raw.pop("stages", None)
    if not isinstance(stages_raw, dict) or not stages_raw:
        errors.append("stages: required; a mapping of stage name -> settings, e.g. stages: {sft: {kind: sft, ...}}")
        stages_raw = {}
    stages_raw = expand_rounds(stages_raw, errors)
    stages: dict[str, StageConfig] = {}
    for name, body in stages_raw.items():
        stage = _validate_stage(str(name), body, errors)
        if stage is not None:
            stages[str(name)] = stage

    base_dir = source.resolve().parent if source else Path.cwd()
    try:
        recipe = Recipe.model_validate({**raw, "stages": {}, "source_path": str(source) if source else None})
    except ValidationError as exc:
        errors.extend(_format_errors(exc, prefix=(), model=Recipe))
        recipe = None

    if errors:
        raise RecipeError(where + "invalid recipe:\n" + "\n".join(f"  - {e}" for e in errors))
    assert recipe is not None
    recipe = recipe.model_copy(update={"stages": stages})
    _check_cross_fields(recipe, errors)
    if errors:
        raise RecipeError(where + "invalid recipe:\n" + "\n".join(f"  - {e}" for e in errors))
    return _resolve_paths(recipe, base_dir)


def _load_plugins(plugins: Any, errors: list[str]) -> None:
    """Import the recipe's ``plugins:`` modules (they register stage kinds) before its stages are validated."""
    if plugins is None:
        return
    if not isinstance(plugins, list) or not all(isinstance(p, str) and p.strip() for p in plugins):
        errors.append("plugins: a list of importable module names, e.g. plugins: [my_package.stages]")
        return
    for i, module in enumerate(plugins):
        try:
            registry.load_plugin(module, f"plugins[{i}]")
        except RecipeError as exc:
            errors.append(str(exc))


def _validate_stage(name: str, body: Any, errors: list[str]) -> StageConfig | None:
    known = registry.kinds()
    loc = f"stages.{name}"
    if not isinstance(body, dict):
        errors.append(f"{loc}: must be a mapping of settings, got {type(body).__name__}")
        return None
    kind = body.get("kind", name if name in known else None)
    if kind is None:
        errors.append(f"{loc}.kind: required (the stage name {name!r} is not a stage kind); one of: {', '.join(known)}")
        return None
    if kind not in known:
        errors.append(f"{loc}.kind: unknown stage kind {kind!r}{suggest(str(kind), known)}; one of: {', '.join(known)}")
        return None
    model = known[kind].config
    try:
        return model.model_validate({**body, "kind": kind})
    except ValidationError as exc:
        errors.extend(_format_errors(exc, prefix=("stages", name), model=model))
        return None


def _check_cross_fields(recipe: Recipe, errors: list[str]) -> None:
    if recipe.model.quantization != "none" and recipe.lora is None:
        errors.append(
            f"model.quantization: {recipe.model.quantization} needs a 'lora:' block — quantized weights cannot be "
            "trained directly (QLoRA trains a LoRA adapter on the frozen quantized base); add e.g. 'lora: {r: 16}'"
        )
    names = list(recipe.stages)
    for position, (name, stage) in enumerate(recipe.stages.items()):
        reported = set()
        for field, target in stage.upstream().items():
            if target in reported:
                continue
            reported.add(target)
            wanted = stage.FROM_FIELDS[field.split("[")[0]]
            allowed = tuple(dict.fromkeys(k for w in wanted for k in registry.capable(w)))
            loc = f"stages.{name}.{field}"
            if target not in recipe.stages:
                errors.append(f"{loc}: no stage named {target!r}{suggest(target, names)}; stages: {', '.join(names)}")
            elif names.index(target) >= position:
                errors.append(f"{loc}: stage {target!r} must come before {name!r} in the recipe")
            elif recipe.stages[target].kind not in allowed:
                errors.append(
                    f"{loc}: stage {target!r} is a {recipe.stages[target].kind!r} stage; "
                    f"{field} takes the output of a stage of kind {' or '.join(map(repr, allowed))}"
                    + "".join(
                        f" ({registry.describe_capability(w)})" for w in wanted if registry.describe_capability(w)
                    )
                )


def _resolve_paths(recipe: Recipe, base_dir: Path) -> Recipe:
    """Make data, launch and stage PATH_FIELDS paths absolute (relative ones are relative to the recipe file)."""

    def absolute(source: DataSource) -> DataSource:
        if source.path is None or Path(source.path).is_absolute():
            return source
        return source.model_copy(update={"path": str((base_dir / source.path).resolve())})

    recipe = map_sources(recipe, absolute)
    stages = {}
    for name, stage in recipe.stages.items():
        relative = {k: v for k, v in stage.local_paths().items() if not Path(v).expanduser().is_absolute()}
        absolute_paths = {k: str((base_dir / Path(v).expanduser()).resolve()) for k, v in relative.items()}
        stages[name] = stage.with_local_paths(absolute_paths) if absolute_paths else stage
    if any(stages[n] is not recipe.stages[n] for n in stages):
        recipe = recipe.model_copy(update={"stages": stages})
    if recipe.launch and not Path(recipe.launch).is_absolute():
        recipe = recipe.model_copy(update={"launch": str((base_dir / recipe.launch).resolve())})
    if recipe.launch and not Path(recipe.launch).is_file():
        raise RecipeError(
            f"launch: accelerate config file not found: {recipe.launch} (relative paths are relative to the recipe file)"
        )
    name = recipe.model.name_or_path
    if name.startswith((".", "/")) or (not name.startswith("builtin:") and (base_dir / name).is_dir()):
        local = Path(name) if Path(name).is_absolute() else (base_dir / name).resolve()
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name_or_path": str(local)})})
    return recipe


def missing_data_files(recipe: Recipe, stages: list[str] | None = None) -> list[str]:
    """Local data files the given stages read that do not exist (or are not files), as 'key.path: problem' lines."""
    problems = []
    for name in stages or list(recipe.stages):
        for where, source in iter_sources(recipe.stages[name], f"stages.{name}"):
            path = Path(source.path) if source.path is not None else None
            if path is None or path.is_file():
                continue
            if path.is_dir():
                problems.append(f"{where}.path: {path} is a directory, not a file; name the data file itself")
            elif path.exists():
                problems.append(f"{where}.path: {path} is not a regular file; name the data file itself")
            else:
                problems.append(f"{where}.path: file not found: {path}")
    return problems


# --------------------------------------------------------------------------------------------
# Error messages
# --------------------------------------------------------------------------------------------


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid field names of the model reached by following ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f for f in current.model_fields if f != "source_path"]
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _format_errors(exc: ValidationError, prefix: tuple[str, ...], model: type[BaseModel]) -> list[str]:
    lines = []
    for err in exc.errors():
        # pydantic adds union branch names ('list[str]', 'literal[...]') to locations; drop them.
        loc = tuple(
            p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("function-after", *SOURCE_TAGS)))
        )
        path = ".".join(str(p) for p in prefix + loc)
        if err["type"] == "extra_forbidden":
            valid = _fields_at(model, loc[:-1])
            hint = suggest(str(loc[-1]), valid)
            listing = f"; valid keys here: {', '.join(valid)}" if valid and not hint else ""
            lines.append(f"{path}: unknown key{hint}{listing}")
        elif err["type"] == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            given = err.get("input")
            shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
            lines.append(f"{path or '(top level)'}: {msg}{shown}")
    # A union reports once per branch; keep each message once.
    return list(dict.fromkeys(lines))
