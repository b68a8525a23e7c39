"""Built-in models and tasks. The one resolver of ``builtin:`` model names (config, plan, preflight and model
loading all ask it): ``names()`` lists them without importing torch, ``resolve(name)`` builds the model once
(offline, cached) and returns its directory."""

from __future__ import annotations

from pathlib import Path

from pipeline.util.errors import PipelineError

PREFIX = "builtin:"
TINY_MODEL = "builtin:tiny-llama"


def names() -> list[str]:
    """Every built-in model name: the tiny Llama, then the replicas (torch-free)."""
    from pipeline.builtin.replicas import builtin_names

    return [TINY_MODEL, *builtin_names()]


def is_builtin(name_or_path: str) -> bool:
    """A ``builtin:`` name, known or not (``resolve`` refuses the unknown ones)."""
    return name_or_path.startswith(PREFIX)


def unknown(name: str) -> str:
    """Why ``name`` is refused, listing the known built-ins."""
    return f"unknown built-in model {name!r}; the built-ins are: {', '.join(names())}"


def resolve(name: str) -> Path:
    """The directory of the built-in model ``name``, built on first use (torch and tokenizers load here)."""
    if name == TINY_MODEL:
        from pipeline.builtin.tiny_model import tiny_model_path

        return tiny_model_path()
    from pipeline.builtin import replicas

    if replicas.family_of(name) is None:
        raise PipelineError(f"model.name_or_path: {unknown(name)}")
    return replicas.replica_path(name)
