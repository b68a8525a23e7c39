"""The base every stage kind's config extends (the kinds live in pipeline/stages/<kind>.py), the pair-training
base, and ``module:function`` references. No torch here."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import Field, model_validator

from pipeline.config.base import Strict
from pipeline.config.data import Mixture, PreferenceDataConfig
from pipeline.config.registry import PAIRS


class StageConfig(Strict):
    """Base of all stage configs. ``kind`` says what the stage is; its name is free."""

    # field path -> what that field may point at: capabilities (registry.POLICY, REWARD_MODEL, PAIRS) or kinds
    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {}
    # field paths holding module:function references called as fn(row, response) (checkers, reward functions);
    # a path may end at a mapping of name -> reference, and '*' stands for every key of a mapping on the way.
    # validate imports each one and checks it can take (row, response) before anything runs.
    FUNCTION_FIELDS: ClassVar[tuple[str, ...]] = ()
    # dotted field paths holding a local file or folder the stage reads besides its data sources (e.g. a folder of
    # task definitions): made absolute against the recipe file, and their contents fingerprinted into the stage hash.
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ()

    kind: str
    seed: int | None = Field(None, description="Overrides the recipe seed for this stage.")

    def upstream(self) -> dict[str, str]:
        """field path (dotted) -> the stage it takes output from."""
        found = {}
        for path in self.FROM_FIELDS:
            targets = _follow(self, path.split("."))
            if len(targets) > 1:
                found.update({f"{path}[{i}]": target for i, target in enumerate(targets)})
            elif targets:
                found[path] = targets[0]
        return found

    def local_paths(self) -> dict[str, str]:
        """field path (dotted) -> path, for every PATH_FIELDS entry that is set."""
        found = {}
        for path in self.PATH_FIELDS:
            node: Any = self
            for part in path.split("."):
                node = getattr(node, part, None)
            if isinstance(node, str):
                found[path] = node
        return found

    def with_local_paths(self, paths: dict[str, str]) -> StageConfig:
        """A copy with the PATH_FIELDS entries of ``paths`` (field path -> new path) replaced."""
        updated = self
        for path, value in paths.items():
            *parents, leaf = path.split(".")
            chain = [updated]
            for part in parents:
                chain.append(getattr(chain[-1], part))
            node = chain[-1].model_copy(update={leaf: value})
            for parent, part in zip(reversed(chain[:-1]), reversed(parents)):
                node = parent.model_copy(update={part: node})
            updated = node
        return updated

    def functions(self) -> dict[str, str]:
        """key path (dotted, from the stage) -> module:function, for every FUNCTION_FIELDS entry that is set."""
        found: dict[str, str] = {}
        for path in self.FUNCTION_FIELDS:
            _collect_refs(self, path.split("."), "", found)
        return found


def _collect_refs(node: Any, parts: list[str], where: str, found: dict[str, str]) -> None:
    if node is None:
        return
    if not parts:
        if isinstance(node, str):
            found[where] = node
        elif isinstance(node, dict):
            found.update({f"{where}.{key}": ref for key, ref in node.items() if isinstance(ref, str)})
        return
    part, rest = parts[0], parts[1:]
    if part == "*":
        for key, value in node.items() if isinstance(node, dict) else ():
            _collect_refs(value, rest, f"{where}.{key}", found)
        return
    child = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    _collect_refs(child, rest, f"{where}.{part}" if where else part, found)


def _follow(node: Any, parts: list[str]) -> list[str]:
    """The stage names at ``parts`` under ``node``; a mixture contributes each of its sources'."""
    if isinstance(node, Mixture):
        return [t for source in node.sources for t in _follow(source, parts)]
    if not parts:
        return [t for t in (node if isinstance(node, list) else [node]) if t]
    return _follow(getattr(node, parts[0], None), parts[1:])


class PairsStageConfig(StageConfig):
    """A stage that trains on preference pairs. ``pairs_from: <bon stage>`` is shorthand for
    data.train = that stage's pairs."""

    # the FROM_FIELDS entries every pair-training stage shares
    PAIR_SOURCES: ClassVar[dict[str, tuple[str, ...]]] = {
        "pairs_from": (PAIRS,),
        "data.train.from_stage": (PAIRS,),
        "data.eval.from_stage": (PAIRS,),
    }

    pairs_from: str | None = Field(None, description="A stage that writes preference pairs (best-of-n) to train on.")
    data: PreferenceDataConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _pairs_from(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("pairs_from"):
            data = dict(values.get("data") or {})
            train = data.get("train")
            # a resolved recipe carries both; anything else is a contradiction
            if train is not None and not (isinstance(train, dict) and train.get("from_stage") == values["pairs_from"]):
                raise ValueError("give either 'pairs_from' or 'data.train', not both")
            data["train"] = {"from_stage": values["pairs_from"], "output": "pairs"}
            values = {**values, "data": data}
        return values

    @model_validator(mode="after")
    def _has_data(self) -> PairsStageConfig:
        if self.data is None:
            raise ValueError("needs preference pairs: 'pairs_from: <bon stage>' or a 'data:' block")
        return self


_FUNCTION_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def function_ref(ref: str) -> str:
    """Validates a ``module:function`` reference (checkers, reward functions)."""
    if not _FUNCTION_REF.match(ref):
        raise ValueError(
            f"{ref!r} is not module:function, e.g. 'pipeline.builtin.tasks:preferred' or 'mychecks:is_correct'"
        )
    return ref


def function_refs(refs: dict[str, str]) -> dict[str, str]:
    for ref in refs.values():
        function_ref(ref)
    return refs
