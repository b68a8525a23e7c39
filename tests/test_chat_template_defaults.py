"""model.chat_template_kwargs and the run's fixed date: written into the chat template once, so every render in
every stage (ours, TRL's trainers', a later stage's) sees the same values; a caller's explicit value still wins."""

from __future__ import annotations

import pytest

from pipeline.modeling.chat import (
    DEFAULTS_BEGIN,
    RUN_DATE_KEY,
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


def test_a_key_the_template_never_reads_is_refused():
    with pytest.raises(PipelineError, match=r"never reads 'enable_thinking'.*remove it"):
        with_template_defaults(DATED, {"enable_thinking": False}, "llama")


# SmolLM3 prints strftime_now(...) directly: no variable to set, so the run's date answers the call itself.
STRFTIME = '{%- set today = strftime_now("%d %B %Y") -%}Today Date: {{ today }} ({{ strftime_now("%Y") }})'


@pytest.mark.parametrize(
    "template, expected",
    [(DATED, "Today Date: 05 Dec 2026"), (STRFTIME, "Today Date: 05 December 2026 (2026)")],
)
def test_a_date_stamped_template_renders_the_run_date_on_any_day(template, expected):
    """Trap: a template that prints today's date renders another prompt on another day (a run that goes past
    midnight, a rerun next week): caches, reference log-probs and best-of-n shards no longer match."""
    day_one, day_two = (lambda fmt: "05 Dec 2026"), (lambda fmt: "06 Dec 2026")
    if template is STRFTIME:
        day_one, day_two = (
            (lambda fmt: {"%d %B %Y": "05 December 2026", "%Y": "2026"}[fmt]),
            (lambda fmt: {"%d %B %Y": "06 December 2026", "%Y": "2026"}[fmt]),
        )
    assert render(template, strftime_now=day_one) != render(template, strftime_now=day_two)  # the trap
    fixed = with_template_defaults(template, {RUN_DATE_KEY: "2026-12-05"}, "m")
    assert render(fixed, strftime_now=day_one) == render(fixed, strftime_now=day_two)
    assert render(fixed, strftime_now=day_two).startswith(expected)
    if template is DATED:  # a caller's explicit date still wins
        assert render(fixed, strftime_now=day_two, date_string="26 Jul 2024").startswith("Today Date: 26 Jul 2024")


def test_the_run_date_is_written_only_into_templates_that_print_one():
    assert with_template_defaults(THINKING, {RUN_DATE_KEY: "2026-12-05"}, "qwen") == THINKING


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
    for bad in ("enable thinking", "_private"):
        with pytest.raises(ValueError, match="not a template variable name"):
            ModelConfig(chat_template_kwargs={bad: False})


def test_a_run_fixes_its_date_once_in_the_manifest(tmp_path, monkeypatch):
    import time

    from pipeline.config import recipe_from_dict
    from pipeline.run.manifest import Manifest
    from pipeline.run.runner import with_run_date

    from conftest import BASE_RECIPE

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "2026-12-05")
    assert Manifest(tmp_path).run_date() == "2026-12-05"
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "2026-12-06")  # the next day: still the first date
    assert Manifest(tmp_path).run_date() == "2026-12-05"
    recipe = recipe_from_dict(BASE_RECIPE)
    assert with_run_date(recipe, "2026-12-05").model.chat_template_kwargs == {RUN_DATE_KEY: "2026-12-05"}
