"""Prompt templates, the built-in ones a recipe names (`template: alpaca | chat`). Adapters change the shape of rows;
templates turn them into text."""

from __future__ import annotations

# The two prompts of the original Stanford Alpaca release (tatsu-lab/stanford_alpaca, train.py),
# verbatim: the response follows "### Response:" directly.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input and input.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def chat_user_message(instruction: str, input: str = "") -> list[dict[str, str]]:
    """An Alpaca row as a single user turn, for models with a chat template."""
    content = f"{instruction}\n\n{input}" if input and input.strip() else instruction
    return [{"role": "user", "content": content}]


def render_prompt(row: dict, template: str):
    """Prompt for an Alpaca-shaped row: a string (alpaca) or a message list (chat)."""
    if template == "chat":
        return chat_user_message(row["instruction"], row.get("input") or "")
    return alpaca_prompt(row["instruction"], row.get("input") or "")
