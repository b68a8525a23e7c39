"""Rounds: a group of stages repeated N times, each round starting from the policy the round before trained.

    stages:
      sft: {kind: sft, ...}
      reward: {kind: reward, ...}
      iterate:
        rounds: 3
        start: sft                     # the policy round 1 starts from
        stages:
          bon: {kind: bon, policy_from: $policy, scorer: {reward_from: reward}, ...}
          dpo: {kind: dpo, policy_from: $policy, pairs_from: bon, reference_from: sft, ...}
      eval: {kind: eval, policies: [sft, dpo_r*], reference: sft, ...}

becomes ``bon_r1, dpo_r1, bon_r2, dpo_r2, bon_r3, dpo_r3`` in place of ``iterate``: ordinary stages, each cached
and resumable on its own, and visible as such in the resolved recipe. Inside a round:

  - ``$policy`` is the round's starting policy: ``start`` in round 1, then the previous round's ``policy``
    stage (default: the group's last stage whose kind trains a policy);
  - a value naming another stage of the group means that stage in the same round (``pairs_from: bon`` ->
    ``bon_r2``); names outside the group are left alone (``reference_from: sft``);
  - ``{round}`` in a string is the round number (e.g. a per-round prompt file).

Anywhere in the recipe, a list item with ``*`` (``dpo_r*``) expands to the matching stages in recipe order.
No torch here.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from pipeline.config import registry

POLICY_PLACEHOLDER = "$policy"


def expand_rounds(stages: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """``stages`` with every round group replaced by its rounds' stages; problems are appended to ``errors``."""
    out: dict[str, Any] = {}
    for name, body in stages.items():
        if isinstance(body, dict) and "rounds" in body and "kind" not in body:
            for stage_name, stage in _expand_group(str(name), body, errors).items():
                if stage_name in stages or stage_name in out:
                    errors.append(f"stages.{name}: round stage {stage_name!r} clashes with a stage of the same name")
                out[stage_name] = stage
        else:
            out[name] = body
    return {name: _expand_globs(body, list(out)) for name, body in out.items()}


def _expand_group(group: str, body: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    loc = f"stages.{group}"
    unknown = set(body) - {"rounds", "start", "stages", "policy"}
    if unknown:
        errors.append(
            f"{loc}: unknown key(s) {', '.join(sorted(unknown))}; a round group has rounds, start, stages, policy"
        )
    rounds, start, members = body.get("rounds"), body.get("start"), body.get("stages")
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        errors.append(f"{loc}.rounds: a whole number of rounds >= 1, got {rounds!r}")
        return {}
    if not isinstance(start, str) or not start:
        errors.append(f"{loc}.start: the stage whose policy round 1 starts from, e.g. start: sft")
        return {}
    if not isinstance(members, dict) or not members or not all(isinstance(b, dict) for b in members.values()):
        errors.append(f"{loc}.stages: a mapping of stage name -> settings, repeated each round")
        return {}
    policy = body.get("policy") or _last_policy_stage(members)
    if policy not in members:
        errors.append(
            f"{loc}.policy: {policy!r} is not a stage of the group; name the stage whose model the next round "
            f"starts from (one of {', '.join(members)})"
        )
        return {}
    out: dict[str, Any] = {}
    previous = start
    for r in range(1, rounds + 1):
        names = {m: f"{m}_r{r}" for m in members}
        for member, settings in members.items():
            if "kind" not in settings and member in _kind_names():  # `bon: {...}` is a bon stage, as outside a group
                settings = {"kind": member, **settings}
            out[names[member]] = _substitute(settings, names, previous, r)
        previous = names[policy]
    return out


def _kind_names() -> set[str]:
    return set(registry.kinds())


def _last_policy_stage(members: dict[str, Any]) -> str | None:
    policy_kinds = set(registry.capable(registry.POLICY))
    found = [m for m, b in members.items() if (b.get("kind") or m) in policy_kinds]
    return found[-1] if found else None


def _substitute(value: Any, names: dict[str, str], policy: str, round_number: int) -> Any:
    if isinstance(value, dict):  # `kind: bon` names a kind, not the group's stage `bon`
        return {k: v if k == "kind" else _substitute(v, names, policy, round_number) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, names, policy, round_number) for v in value]
    if isinstance(value, str):
        if value == POLICY_PLACEHOLDER:
            return policy
        if value in names:
            return names[value]
        return value.replace("{round}", str(round_number)) if "{round}" in value else value
    return value


def _expand_globs(value: Any, stage_names: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _expand_globs(v, stage_names) for k, v in value.items()}
    if isinstance(value, list):
        out: list[Any] = []
        for item in value:
            if isinstance(item, str) and "*" in item and re.fullmatch(r"[\w*]+", item):
                matches = [n for n in stage_names if fnmatch.fnmatchcase(n, item)]
                out.extend(matches or [item])  # no match: validation names the missing stage
            else:
                out.append(_expand_globs(item, stage_names))
        return out
    return value
