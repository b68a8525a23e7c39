"""Checks that need no model weights, run by ``validate`` and by ``run`` before its first stage: the model's
tokenizer files and chat template, every local data file read as its stage will, checkers and reward functions
(imported, callable as fn(row, response)), LoRA targets (the model's modules on the meta device), and one
tokenizer across the models stages exchange texts or token ids between.

``python -m pipeline validate`` (and ``run``, before anything heavy) reads the tokenizer files of local
directories and of Hub ids already in the Hugging Face cache. A Hub id that is not cached is not checked
here (that would download it); the stage checks the loaded tokenizer when it starts. Only the LoRA check imports
torch (to build the model on the meta device), and only for a recipe that lists target modules.
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


def function_problems(recipe: Recipe, stages: list[str] | None = None) -> list[str]:
    """Every checker and reward function the stages call: importable, and callable as fn(row, response)."""
    from pipeline.rollout.scoring import load_function
    from pipeline.util.errors import PipelineError

    problems = []
    for name in stages or list(recipe.stages):
        for key, ref in recipe.stages[name].functions().items():
            try:
                load_function(ref, f"stages.{name}.{key}")
            except PipelineError as exc:
                problems.append(str(exc))
    return problems


def lora_problems(recipe: Recipe) -> list[str]:
    """LoRA target_modules (and modules_to_save) that name no module of the model -- peft skips a target that
    matches nothing, so a typo would train fewer layers than asked, or fail only once the model is loaded. The
    model's modules come from its config.json on the meta device (no weights); a Hub model whose config.json is
    not cached is left to the stage."""
    from pipeline.util.errors import PipelineError
    from pipeline.util.text import suggest

    lora = recipe.lora
    if lora is None or (lora.target_modules == "all-linear" and not lora.modules_to_save):
        return []
    from pipeline.plan.shapes import module_infos

    model = recipe.model
    try:
        modules = module_infos(model.name_or_path, model.revision, model.trust_remote_code)
    except PipelineError:
        return []  # no config.json offline: the stage checks once the model is loaded
    except Exception as exc:  # noqa: BLE001 -- a config transformers cannot build; the stage will say it too
        return [
            f"model.name_or_path: cannot build {model.name_or_path} from its config.json: {type(exc).__name__}: {exc}"
        ]
    short = list(dict.fromkeys(m.name.rsplit(".", 1)[-1] for m in modules))
    wrappable = list(dict.fromkeys(m.name.rsplit(".", 1)[-1] for m in modules if m.lora))
    problems = []
    targets = [] if lora.target_modules == "all-linear" else lora.target_modules
    for i, target in enumerate(targets):
        matched = [m for m in modules if m.name == target or m.name.endswith("." + target)]
        if not matched:
            problems.append(
                f"lora.target_modules[{i}]: {target!r} matches no module of {model.name_or_path}"
                f"{suggest(target, wrappable)}; LoRA can target: {', '.join(wrappable)} (or 'all-linear')"
            )
        elif not any(m.lora for m in matched):
            problems.append(
                f"lora.target_modules[{i}]: {target!r} is a {matched[0].type}, which LoRA cannot wrap (it wraps "
                f"linear, embedding and convolution layers); name the layers inside it, e.g. {', '.join(wrappable[:4])}"
            )
    for i, saved in enumerate(lora.modules_to_save or []):
        if not any(m.name == saved or m.name.endswith("." + saved) for m in modules) and saved != "score":
            problems.append(
                f"lora.modules_to_save[{i}]: {saved!r} matches no module of {model.name_or_path}"
                f"{suggest(saved, short)}; e.g. lm_head, embed_tokens (the reward head 'score' is always trained)"
            )
    return problems


def tokenizer_problems(recipe: Recipe, run_dir: Path, to_run: list[str] | None = None) -> list[str]:
    """Stages that pass texts or token ids between models (a reward model scoring a policy's samples, DPO's
    reference against its policy, eval's policies against their reference) need one tokenizer. Every stage of a
    recipe starts from its one model, but a run directory can hold stages trained with another one (an earlier
    run with another model.name_or_path, then ``--stages``): each upstream model this run will not retrain is
    compared, by its saved tokenizer, with the others the stage reads and with the recipe's model. Torch-free."""
    from pipeline.run.manifest import Manifest

    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        return []
    try:
        stages = Manifest(run_dir).read()["stages"]
    except Exception:  # noqa: BLE001 -- a damaged manifest is reported by the run itself
        return []
    if to_run is None:  # validate: the stages a plain run would run (not cached)
        kept = _cached(recipe, stages)
        to_run = [name for name in recipe.stages if name not in kept]
    recipe_tokenizer: list = []  # computed once, when first needed

    def recipe_side():
        if not recipe_tokenizer:
            recipe_tokenizer.append(_tokenizer_id(_recipe_model_dir(recipe)))
        return recipe_tokenizer[0], f"the recipe's model {recipe.model.name_or_path}"

    problems = []
    for name in to_run:
        seen: dict[tuple, tuple[str, str]] = {}  # tokenizer id -> (field, description)
        for field, target in recipe.stages[name].upstream().items():
            if target not in recipe.stages or registry.get(recipe.stages[target].kind).model_head is None:
                continue
            entry = stages.get(target, {})
            model = (entry.get("outputs") or {}).get("model") if entry.get("status") == "done" else None
            if target in to_run or not isinstance(model, dict) or not model.get("path"):
                ident, described = recipe_side()
            else:
                ident = _tokenizer_id(Path(model["path"]))
                described = f"stage {target!r} (trained from {model.get('base') or model['path']})"
            if ident is None:
                continue
            if seen and ident not in seen:
                (other_field, other), *_ = seen.values()
                problems.append(
                    f"stages.{name}.{field}: {described} has a different tokenizer ({ident[1]} tokens) from "
                    f"stages.{name}.{other_field}: {other} ({next(iter(seen))[1]} tokens), in {run_dir}. Stage "
                    f"{name!r} passes texts or token ids between them, so they must share a tokenizer: rerun the "
                    f"older stage with this recipe (--stages {target},{name}) or use another --output-dir"
                )
                break
            seen.setdefault(ident, (field, described))
    return problems


def _cached(recipe: Recipe, stages: dict) -> set[str]:
    """Stages a run would skip: done with the config hash the recipe gives them now (as the runner's is_cached)."""
    from pipeline.run.manifest import stage_hash

    kept: set[str] = set()
    for name in recipe.stages:
        entry = stages.get(name, {})
        upstream = recipe.stages[name].upstream().values()
        if entry.get("status") != "done" or any(stages.get(t, {}).get("status") != "done" for t in upstream):
            continue
        digest = stage_hash(recipe, name, {t: stages[t]["config_hash"] for t in upstream})
        if digest == entry.get("config_hash"):
            kept.add(name)
    return kept


def _recipe_model_dir(recipe: Recipe) -> Path | None:
    """Where the recipe's model's tokenizer files are, without downloading: a local or built-in directory, or the
    Hugging Face cache; None when they are not at hand."""
    name = recipe.model.name_or_path
    if builtin.is_builtin(name):
        return Path(builtin.resolve(name))
    if Path(name).is_dir():
        return Path(name)
    files = _cached_hub_files(name, recipe.model.revision)
    return files["tokenizer_config.json"].parent if files else None


def _tokenizer_id(directory: Path | None) -> tuple[str, int] | None:
    """(digest of the vocabulary and added tokens, vocabulary size) of the tokenizer saved in ``directory``, read
    from tokenizer.json (or tokenizer.model / vocab.json); None when there is none to read."""
    import hashlib

    if directory is None:
        return None
    path = directory / "tokenizer.json"
    try:
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            vocab = (data.get("model") or {}).get("vocab") or {}
            added = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or [])
            text = json.dumps([vocab, added], sort_keys=True)
            known = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
            size = len(vocab) + sum(1 for i, _ in added if i not in known)
            return hashlib.sha256(text.encode()).hexdigest(), size
        for other in ("tokenizer.model", "vocab.json"):
            if (directory / other).is_file():
                raw = (directory / other).read_bytes()
                size = len(json.loads(raw)) if other == "vocab.json" else 0
                return hashlib.sha256(raw).hexdigest(), size
    except (OSError, ValueError):
        return None
    return None
