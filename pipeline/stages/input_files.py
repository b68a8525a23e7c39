"""Each kind's local input files read and checked as the stage will read them, for ``validate`` and before the
first stage of ``run`` (the kinds' ``data_checks`` hooks). Outputs of earlier stages and Hub datasets are
checked by the stage that reads them. No torch: token lengths are left to the stage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.config import Recipe, source_list


def _local(source) -> bool:
    return source is not None and all(s.path is not None for s in source_list(source))


def sft_rows(recipe: Recipe, name: str) -> list[Callable[[], Any]]:
    """Instruction rows of an SFT-style stage (``data.train``, ``data.eval``) through the SFT loader."""
    from pipeline.data.sft import load_sft_examples

    data = recipe.stages[name].data
    sources = [s for s in [*source_list(data.train), data.eval] if _local(s)]
    return [lambda s=s: load_sft_examples(s, data.template) for s in sources]


def pairs(recipe: Recipe, name: str) -> list[Callable[[], Any]]:
    """Preference pairs of a pair-training stage, when all of them are local files."""
    from pipeline.data.preference.prepare import prepare_pairs

    data = recipe.stages[name].data
    if data is None or not _local(data.train) or (data.eval is not None and not _local(data.eval)):
        return []
    return [lambda: prepare_pairs(data.train, data.eval, data)]


def prompts(recipe: Recipe, name: str) -> list[Callable[[], Any]]:
    """Prompts of a sampling stage, rendered with the template of the policy they are sampled from."""
    from pipeline.data.prompts import load_prompts

    stage = recipe.stages[name]
    if not _local(stage.prompts):
        return []
    template = getattr(stage, "template", None) or recipe.policy_template(
        getattr(stage, "policy_from", None) or stage.reference
    )
    return [lambda: load_prompts(stage.prompts, template)]
