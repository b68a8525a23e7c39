"""Checks of the recipe's model that need no torch: its files, and a chat template where stages render chats.

``python -m pipeline validate`` (and ``run``, before anything heavy) reads the tokenizer files of local
directories and of Hub ids already in the Hugging Face cache. A Hub id that is not cached is not checked
here (that would download it); the stage checks the loaded tokenizer when it starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline import builtin
from pipeline.config import Recipe, registry
from pipeline.util.network import HUB_URL, hub_offline, offline_advice, unreachable

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def chat_stages(recipe: Recipe) -> list[str]:
    """Stages that render conversations with the chat template (template: chat)."""
    names = []
    for name, stage in recipe.stages.items():
        data = getattr(stage, "data", None)
        if getattr(stage, "template", None) == "chat" or getattr(data, "template", None) == "chat":
            names.append(name)
    return names


def model_problems(recipe: Recipe) -> list[str]:
    """What is wrong with the recipe's model that the user can fix before anything loads."""
    name = recipe.model.name_or_path
    if builtin.is_builtin(name):
        return []  # the tiny model and every replica ship a tokenizer with a chat template
    local = Path(name)
    if local.is_absolute() or name.startswith("."):
        if not local.is_dir():
            return [f"model.name_or_path: model directory not found: {name}"]
        files = {f: local / f for f in (*TOKENIZER_FILES, "chat_template.jinja") if (local / f).is_file()}
    else:
        files = _cached_hub_files(name, recipe.model.revision)
        if files is None:
            return []  # not in the local cache: checked by the stage once the tokenizer is loaded
    if not any(f in files for f in TOKENIZER_FILES):
        return [
            f"model.name_or_path: {name} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer beside the weights (tokenizer.save_pretrained(dir))"
        ]
    stages = chat_stages(recipe)
    if stages and not _has_chat_template(files):
        return [
            f"stages.{stages[0]}: template: chat, but the tokenizer of {name} has no chat template"
            f"{' (also used by: ' + ', '.join(stages[1:]) + ')' if stages[1:] else ''}. Use 'template: alpaca' "
            "with instruction data, pick a checkpoint that ships a chat template (an -Instruct / -it model), or add "
            "chat_template.jinja to the model directory"
        ]
    return []


def _has_chat_template(files: dict[str, Path]) -> bool:
    if "chat_template.jinja" in files:
        return True
    config = files.get("tokenizer_config.json")
    if config is None:
        return True  # nothing to read it from: leave it to the stage
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return True


def _cached_hub_files(repo_id: str, revision: str | None) -> dict[str, Path] | None:
    """The tokenizer files of a Hub model in the local cache; None when its tokenizer_config.json is not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found: dict[str, Path] = {}
    for filename in (*TOKENIZER_FILES, "chat_template.jinja"):
        try:
            path = try_to_load_from_cache(repo_id, filename, revision=revision)
        except Exception:  # an id that is not a valid repo name: the loader reports it
            return None
        if isinstance(path, str):
            found[filename] = Path(path)
    if "tokenizer_config.json" not in found:
        return None
    return found


def hub_model_problem(recipe: Recipe) -> str | None:
    """The recipe's model is a Hub id that is not in the local cache and the Hub cannot be reached: say so now,
    not after a minute of download retries inside the first stage. A short TCP probe; nothing is downloaded."""
    name = recipe.model.name_or_path
    if builtin.is_builtin(name) or Path(name).exists() or name.startswith((".", "/")):
        return None
    if _cached_hub_files(name, recipe.model.revision) is not None:
        return None
    if hub_offline():
        return (
            f"model.name_or_path: {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
            + offline_advice(name)
        )
    endpoint = os.environ.get("HF_ENDPOINT") or HUB_URL
    reason = unreachable(endpoint)
    if reason is None:
        return None
    return (
        f"model.name_or_path: {name} is not in the local Hugging Face cache and the Hub ({endpoint}) cannot be "
        f"reached ({reason}). " + offline_advice(name)
    )


def _cached_hub_dataset(repo_id: str) -> bool:
    """Some copy of the Hub dataset is in the local caches (huggingface_hub's or datasets')."""
    hub_cache = Path(
        os.environ.get("HF_HUB_CACHE")
        or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    )
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or hub_cache.parent / "datasets")
    owner_name = repo_id.replace("/", "--")
    return (hub_cache / f"datasets--{owner_name}").is_dir() or any(
        datasets_cache.glob(f"{repo_id.replace('/', '___')}*")
    )


def hub_data_problem(recipe: Recipe, stages: list[str]) -> str | None:
    """Hub datasets of these stages that are not cached while the Hub cannot be reached: say so before any stage
    starts, naming each one, instead of a stage failing after download retries. A short TCP probe."""
    from pipeline.config import iter_sources

    wanted = [
        (f"stages.{name}.{where}", source.hub)
        for name in stages
        for where, source in iter_sources(recipe.stages[name])
        if source.hub and not _cached_hub_dataset(source.hub)
    ]
    if not wanted or hub_offline():  # offline: datasets reads its cache or fails at once, naming the dataset
        return None
    endpoint = os.environ.get("HF_ENDPOINT") or HUB_URL
    reason = unreachable(endpoint)
    if reason is None:
        return None
    named = "; ".join(f"{where}: {repo}" for where, repo in wanted)
    return (
        f"Hub dataset(s) not in the local cache and the Hub ({endpoint}) cannot be reached ({reason}): {named}. "
        + offline_advice(wanted[0][1], what="data")
    )


def data_problems(recipe: Recipe, stages: list[str] | None = None) -> list[str]:
    """Every local data file a stage reads, read and checked row by row as the stage will (``validate``).

    Outputs of earlier stages and Hub datasets are checked by the stage that reads them. No torch: token
    lengths are left to the stage."""
    from pipeline.util.errors import PipelineError

    problems = []
    for name in stages or list(recipe.stages):
        for check in _data_checks(recipe, name):
            try:
                check()
            except PipelineError as exc:
                problems.append(f"stages.{name}: {exc}")
    return problems


def _data_checks(recipe: Recipe, name: str) -> list:
    """Callables that read and check each local source of stage ``name`` with its kind's loaders (its hook)."""
    hook = registry.get(recipe.stages[name].kind).data_checks
    return hook(recipe, name) if hook is not None else []
