"""Chat templates and stop tokens, the way every stage must use them.

Real tokenizers differ exactly here: some chat templates write BOS while the tokenizer adds one too
(Llama-3, Mistral, Gemma), a turn may end with a token that is not ``eos_token`` (Qwen's ``<|im_end|>``,
Gemma's ``<end_of_turn>``, Phi-3's ``<|end|>``), ``generation_config`` may list several stop ids, and strict
templates (Gemma, Mistral) refuse a system turn or a conversation that does not alternate. One module
renders, counts and stops, so the sampler, the scorer and the data checks all agree with the trainers.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pipeline.config.model import RUN_DATE_KEY
from pipeline.util.errors import PipelineError

PROBE_REPLY = "PROBEREPLY"  # a reply whose rendering shows what the template writes after an assistant turn


# The defaults a recipe gives the chat template (model.chat_template_kwargs, the run's fixed date) are written
# into the template itself, between these markers, so every render -- ours, TRL's trainers', a later stage's --
# sees the same values without each caller passing them. A caller that passes a value still wins.
DEFAULTS_BEGIN = "{#- pipeline: recipe defaults #}"
DEFAULTS_END = "{#- pipeline: end of recipe defaults #}"
# The run's date (ISO, fixed in the manifest, under RUN_DATE_KEY). Date-stamped templates read
# it two ways: a ``date_string`` variable (Llama-3.x: "Today Date: 26 Jul 2024") or ``strftime_now(format)``
# (Llama-3.2's fallback, SmolLM3): both are given the run's date, so a prompt renders the same on every day.
DATE_STRING = "date_string"


def _jinja_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return json.dumps(value)  # numbers and double-quoted strings read the same in Jinja


def strip_template_defaults(template: str) -> str:
    """The template as released: without the defaults a run wrote into it."""
    if template.startswith(DEFAULTS_BEGIN) and DEFAULTS_END in template:
        return template.split(DEFAULTS_END, 1)[1]
    return template


def template_variables(template: str) -> set[str]:
    """Names a Jinja template reads (a superset: every identifier in its code blocks)."""
    code = " ".join(re.findall(r"{[{%](.*?)[}%]}", template, flags=re.S))
    return set(re.findall(r"[A-Za-z_]\w*", code))


def _dated(template: str, reads: set[str], iso_date: str, values: dict[str, Any]) -> list[str]:
    """Jinja that gives a date-stamped template the run's date: ``date_string`` (unless the recipe set one) and
    a ``strftime_now`` macro answering each format the template asks for."""
    import datetime

    day = datetime.date.fromisoformat(iso_date)
    out = []
    if DATE_STRING in reads and DATE_STRING not in values:
        out.append(_default(DATE_STRING, day.strftime("%d %b %Y")))
    formats = sorted(set(re.findall(r"strftime_now\(\s*[\"']([^\"']*)[\"']\s*\)", template)))
    if formats:
        cases = "".join(
            f"{{%- {'if' if i == 0 else 'elif'} format == {json.dumps(f)} %}}{day.strftime(f)}"
            for i, f in enumerate(formats)
        )
        out.append(f"{{%- macro strftime_now(format) %}}{cases}{{%- endif %}}{{%- endmacro %}}")
    return out


def _default(name: str, value: Any) -> str:
    return f"{{%- if {name} is not defined %}}{{%- set {name} = {_jinja_literal(value)} %}}{{%- endif %}}"


def with_template_defaults(template: str, defaults: dict[str, Any], model_name: str) -> str:
    """``template`` reading ``defaults`` for every variable a caller leaves out (and the run's date, under
    RUN_DATE_KEY, wherever it prints one). A recipe key the template never reads is an error: it would
    silently change nothing."""
    template = strip_template_defaults(template)
    reads = template_variables(template)
    values = {k: v for k, v in defaults.items() if k != RUN_DATE_KEY}
    unused = sorted(k for k in values if k not in reads and k != DATE_STRING)
    if unused:
        raise PipelineError(
            f"model.chat_template_kwargs: the chat template of {model_name!r} never reads {', '.join(map(repr, unused))}, "
            "so setting it would change nothing; remove it (thinking switches such as enable_thinking exist only in "
            "templates that have a thinking mode: Qwen3, SmolLM3, ...)"
        )
    sets = [_default(name, value) for name, value in sorted(values.items()) if name in reads]
    if defaults.get(RUN_DATE_KEY):
        sets += _dated(template, reads, defaults[RUN_DATE_KEY], values)
    return DEFAULTS_BEGIN + "".join(sets) + DEFAULTS_END + template if sets else template


def require_chat_template(tokenizer, model_name: str) -> None:
    """A clear error when a chat template is needed but the tokenizer has none (base checkpoints often do not)."""
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(
            f"the tokenizer of {model_name!r} has no chat template, but this stage renders conversations with one "
            "(template: chat, or message-list data). Use 'template: alpaca' with text data, pick a checkpoint that "
            "ships a chat template (an -Instruct / -it model), or add chat_template.jinja to the model directory"
        )


def adds_bos(tokenizer) -> bool:
    """Does ``tokenizer(text)`` put BOS in front by itself (Llama-3, Gemma, R1 distills; not Qwen, Phi)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def sampling_texts(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[str, str] | None:
    """(prompt, completion) as text rendered the way sampling sees the prompt, for a template whose generation
    prompt opens a think block that a finished reply never shows (DeepSeek-R1 distills); None for any other
    template, whose conversations train as they are (see pipeline.data.chat_fit.reasoning_texts)."""
    from functools import partial

    from pipeline.data.chat_fit import reasoning_texts

    added_bos = tokenizer.bos_token if adds_bos(tokenizer) else None
    return reasoning_texts(prompt, completion, partial(render_chat, tokenizer), added_bos)


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation exactly as TRL's trainers tokenize it: the template's own special tokens,
    none added by the tokenizer (``apply_chat_template`` tokenizes with add_special_tokens=False), so a
    template that writes BOS gets one BOS, not two."""
    require_chat_template(tokenizer, getattr(tokenizer, "name_or_path", "?"))
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def response_token_length(tokenizer, prompt: list[dict], response: list[dict]) -> int:
    """Tokens a response adds to its conversation: render(prompt + response) - render(prompt, generation prompt).

    Never renders the response alone: strict templates (Gemma, Mistral) refuse a conversation that starts
    with an assistant turn, and what a trainer sees is always the response after its prompt."""
    full = chat_ids(tokenizer, prompt + response)
    return len(full) - len(chat_ids(tokenizer, prompt, add_generation_prompt=True))


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token the chat template writes right after an assistant reply (e.g. ``<|im_end|>``), found
    by rendering a probe conversation; [] without a chat template or when the template writes none."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    return list(_end_of_turn(tokenizer, tokenizer.chat_template))


def _end_of_turn(tokenizer, template: str) -> tuple[int, ...]:
    # probed once per tokenizer object and template (the sampler asks once per batch)
    cache = tokenizer.__dict__.setdefault("_pipeline_end_of_turn", {})
    if template not in cache:
        cache[template] = _probe_end_of_turn(tokenizer)
    return cache[template]


def _probe_end_of_turn(tokenizer) -> tuple[int, ...]:
    conversation = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": PROBE_REPLY}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template that refuses even this probe: no end-of-turn token to add
        return ()
    after = text[text.rfind(PROBE_REPLY) + len(PROBE_REPLY) :]
    specials = _special_ids(tokenizer)
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token_id in specials:
            return (token_id,)
    return ()


def stop_ids(model, tokenizer, chat: bool) -> list[int]:
    """Every id that ends a response: the tokenizer's eos, ``generation_config.eos_token_id`` (an int or a
    list), and for chat prompts the template's end-of-turn token. Qwen2.5 *base* says eos is
    ``<|endoftext|>`` but its template ends turns with ``<|im_end|>``: without the union, sampling runs on into
    the next turn and the role text leaks into the response."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if chat:
        ids.update(end_of_turn_ids(tokenizer))
    return sorted(i for i in ids if i is not None)


def strip_saved_template_defaults(model_dir) -> bool:
    """Give a saved tokenizer its chat template as released (``export``: a model leaves the run without the run's
    date or the recipe's defaults baked in; its card says which it was trained with). True when one was stripped."""
    from pathlib import Path

    stripped = False
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        text = jinja.read_text(encoding="utf-8")
        if strip_template_defaults(text) != text:
            jinja.write_text(strip_template_defaults(text), encoding="utf-8")
            stripped = True
    config = Path(model_dir) / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        template = data.get("chat_template")
        if isinstance(template, str) and strip_template_defaults(template) != template:
            data["chat_template"] = strip_template_defaults(template)
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
            stripped = True
    return stripped
