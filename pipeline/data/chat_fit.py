"""Checks of conversational examples against the model's chat template, before any training.

Strict templates break silently or loudly in ways the data can fix: Gemma refuses a system turn and
non-alternating roles (a jinja TemplateError deep inside a trainer), and Mistral v0.3 writes the system
message into the *last* user turn only when that turn is the last message -- so it is there when the
prompt is rendered alone (inference) and gone when the prompt is rendered with its reply (training).

Thinking templates pass when the training prompt is what sampling renders. Qwen3 and SmolLM3 keep that (the
reply after its prompt carries the think block, empty or not). DeepSeek-R1 distills do not: the generation
prompt opens a think block (``<｜Assistant｜><think>\n``) that a finished reply never shows (the template keeps
only what follows ``</think>``), so their conversations are trained as text rendered the way sampling sees them
(``reasoning_texts``): the prompt with its opener, then the reasoning (or none), ``</think>``, the reply.
No torch here: the stage passes ``render(messages, add_generation_prompt) -> str``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pipeline.util.errors import DataError
from pipeline.util.text import raise_collected

Render = Callable[[list, bool], str]

FIX_STRICT = (
    "strict templates (Gemma, Mistral) take no system turn and need user/assistant turns alternating from the "
    "user: merge a system message into the first user message and drop repeated roles"
)


def is_template_error(exc: BaseException) -> bool:
    return type(exc).__name__ == "TemplateError"  # jinja2's, raised by a chat template's raise_exception


def refusal(exc: BaseException) -> str:
    """What to tell the user when the chat template raised ``exc`` (an is_template_error) on their data."""
    return f"the model's chat template refuses this conversation ({exc}); {FIX_STRICT}"


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def reasoning_opener(alone: str, together: str) -> str | None:
    """What the generation prompt writes that the finished reply's rendering lacks, when that is the opening of a
    think block (DeepSeek-R1 distills: ``<think>\n``); None for any other template."""
    if together.startswith(alone):
        return None
    opener = alone[_common_prefix(alone, together) :]
    return opener if opener.strip() == THINK_OPEN else None


def reasoning_texts(prompt: list, completion: list, render: Render, added_bos: str | None) -> tuple[str, str] | None:
    """(prompt text, completion text) for a template whose generation prompt opens a think block that a finished
    reply never shows; None for any other template. The prompt is exactly what sampling renders (less a leading
    ``added_bos`` the tokenizer adds by itself); the completion closes the block after the reply's reasoning (a
    ``<think>...</think>`` part of its content, or none) and goes on with the reply as the template ends it."""
    alone, together = render(prompt, True), render(prompt + completion, False)
    if reasoning_opener(alone, together) is None:
        return None
    content = completion[-1].get("content") or ""
    reasoning = content.split(THINK_CLOSE)[0].replace(THINK_OPEN, "").strip("\n") if THINK_CLOSE in content else ""
    reply = together[_common_prefix(alone, together) :].lstrip("\n")  # the template's reply and end of turn
    # "</think>" right after the opener's newline: no "\n\n" across the prompt/completion boundary, which a BPE
    # would merge into one token that sampling never sees at that position
    closed = (reasoning + "\n" if reasoning else "") + THINK_CLOSE + "\n\n" + reply
    if added_bos and alone.startswith(added_bos):
        alone = alone[len(added_bos) :]
    return alone, closed


def rendering_problem(prompt: list, completion: list, render: Render) -> str | None:
    """Why this prompt/completion cannot be trained on as it is rendered at inference; None when fine (also
    when ``reasoning_texts`` renders it for training)."""
    try:
        alone = render(prompt, True)
        together = render(prompt + completion, False)
    except Exception as exc:
        if not is_template_error(exc):
            raise
        return refusal(exc)
    if together.startswith(alone) or reasoning_opener(alone, together):
        return None
    k = next((i for i, (a, b) in enumerate(zip(alone, together)) if a != b), min(len(alone), len(together)))
    system = any(m.get("role") == "system" for m in prompt)
    hint = (
        "the template drops or moves the system message once the reply follows (Mistral writes it into the last "
        "message only); merge the system message into the first user message"
        if system
        else "the template renders the prompt differently once the reply follows"
    )
    return (
        f"the prompt renders differently alone (inference) than followed by its reply (training), from character {k}: "
        f"alone {alone[max(0, k - 20) : k + 30]!r} vs with the reply {together[max(0, k - 20) : k + 30]!r}; {hint}"
    )


def check_chat_examples(examples: Sequence, render: Render, source: str) -> None:
    """Every conversational example (``.prompt``, ``.completion`` message lists, ``.where``) must render with
    the template and keep its prompt when the reply follows; one DataError lists the rows that do not."""
    problems = []
    for ex in examples:
        if not isinstance(ex.prompt, list):
            continue
        problem = rendering_problem(ex.prompt, ex.completion, render)
        if problem:
            problems.append(f"{ex.where}: {problem}")
    headline = f"{len(problems)} conversation(s) in {source} do not work with the model's chat template:"
    raise_collected(problems, headline, DataError)
