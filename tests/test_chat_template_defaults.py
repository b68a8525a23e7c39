"""model.chat_template_kwargs and the run's fixed date: written into the chat template once, so every render in
every stage (ours, TRL's trainers', a later stage's) sees the same values; a caller's explicit value still wins."""

from __future__ import annotations

import pytest

from pipeline.modeling.chat import (
    DEFAULTS_BEGIN,
    strip_template_defaults,
    template_variables,
    with_template_defaults,
)
from pipeline.util.errors import PipelineError

THINKING = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>"
    "{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}{% endif %}"
)
DATED = (
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y')"
    " %}{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}{%- endif %}"
    "Today Date: {{ date_string }}\n{% for m in messages %}{{ m['content'] }}{% endfor %}"
)
CHAT = [{"role": "user", "content": "hi"}]


def render(template: str, **kwargs) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=CHAT, add_generation_prompt=True, **kwargs)


def test_a_default_applies_when_the_caller_passes_nothing_and_the_caller_still_wins():
    off = with_template_defaults(THINKING, {"enable_thinking": False}, "m")
    assert render(THINKING) == "<user>hi<assistant>"
    assert render(off) == "<user>hi<assistant><think></think>"
    assert render(off, enable_thinking=True) == "<user>hi<assistant>"


def test_a_key_the_template_never_reads_is_refused_but_the_run_date_is_written_only_where_read():
    with pytest.raises(PipelineError, match=r"never reads 'enable_thinking'.*remove it"):
        with_template_defaults(DATED, {"enable_thinking": False}, "llama")
    assert with_template_defaults(THINKING, {"date_string": "05 Dec 2026"}, "qwen") == THINKING
    dated = with_template_defaults(DATED, {"date_string": "05 Dec 2026"}, "llama")
    assert render(dated, strftime_now=lambda fmt: "06 Dec 2026").startswith("Today Date: 05 Dec 2026")


def test_the_defaults_are_replaced_not_stacked_and_can_be_removed():
    once = with_template_defaults(THINKING, {"enable_thinking": False}, "m")
    twice = with_template_defaults(once, {"enable_thinking": True}, "m")
    assert twice.count(DEFAULTS_BEGIN) == 1 and render(twice) == "<user>hi<assistant>"
    assert strip_template_defaults(twice) == THINKING


def test_template_variables_reads_code_blocks_only():
    assert {"enable_thinking", "messages", "add_generation_prompt"} <= template_variables(THINKING)
    assert "Today" not in template_variables(DATED) and "date_string" in template_variables(DATED)


def test_recipe_values_must_be_scalars_and_names(tmp_path):
    from pipeline.config import ModelConfig

    assert ModelConfig(chat_template_kwargs={"enable_thinking": False}).chat_template_kwargs == {
        "enable_thinking": False
    }
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        ModelConfig(chat_template_kwargs={"enable_thinking": [1, 2]})
    with pytest.raises(ValueError, match="not a template variable name"):
        ModelConfig(chat_template_kwargs={"enable thinking": False})


def test_a_run_fixes_its_date_once_in_the_manifest(tmp_path, monkeypatch):
    import time

    from pipeline.config import recipe_from_dict
    from pipeline.run.manifest import Manifest
    from pipeline.run.runner import with_run_date

    from conftest import BASE_RECIPE

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "05 Dec 2026")
    assert Manifest(tmp_path).run_date() == "05 Dec 2026"
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "06 Dec 2026")  # the next day: still the first date
    assert Manifest(tmp_path).run_date() == "05 Dec 2026"
    recipe = recipe_from_dict(BASE_RECIPE)
    assert with_run_date(recipe, "05 Dec 2026").model.chat_template_kwargs == {"date_string": "05 Dec 2026"}
    given = recipe.model_copy(
        update={"model": recipe.model.model_copy(update={"chat_template_kwargs": {"date_string": "26 Jul 2024"}})}
    )
    assert with_run_date(given, "05 Dec 2026") is given  # the recipe's own date wins
