"""Chat message lists ({role, content}) as SFT and preference rows give them: one validator for both."""

from __future__ import annotations

from typing import Any

from pipeline.data.sources import RowProblem

ROLES = ("system", "user", "assistant")
# ShareGPT-style messages ({"from": "human", "value": ...}): their speaker names -> chat roles
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
}


def sharegpt_message(msg: Any) -> Any:
    """{"from": "human", "value": ...} -> {"role": "user", "content": ...}; anything else as it is."""
    if isinstance(msg, dict) and "role" not in msg and "from" in msg and "value" in msg:
        return {"role": SHAREGPT_ROLES.get(str(msg["from"]).lower(), msg["from"]), "content": msg["value"]}
    return msg


def clean_messages(value: Any, key: str, non_empty_content: bool = False) -> list[dict[str, str]]:
    """``value`` (the ``key`` column) as a non-empty list of {role, content} messages, role and content only.

    ShareGPT {from, value} turns are read as roles. Raises RowProblem (reason missing, wrong_type, empty,
    bad_message or bad_role) naming the message. ``non_empty_content``: SFT learns from every message,
    so a blank one is a bad row; preference data leaves empty responses to the pair linter.
    """
    if value is None:
        raise RowProblem(f"{key!r} is missing", "missing")
    if not isinstance(value, list):
        shown = repr(str(value)[:40])
        raise RowProblem(
            f"{key!r} must be a list of {{role, content}} messages, got {type(value).__name__} ({shown})", "wrong_type"
        )
    if not value:
        raise RowProblem(f"{key!r} is an empty message list", "empty")
    clean = []
    for j, msg in enumerate(value):
        msg = sharegpt_message(msg)
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise RowProblem(
                f"{key}[{j}] must be an object with 'role' and 'content' (or ShareGPT's 'from' and 'value')",
                "bad_message",
            )
        if msg["role"] not in ROLES:
            raise RowProblem(f"{key}[{j}].role is {msg['role']!r}; expected one of {', '.join(ROLES)}", "bad_role")
        content = msg["content"]
        if not isinstance(content, str):
            raise RowProblem(f"{key}[{j}].content must be a string, got {type(content).__name__}", "bad_message")
        if non_empty_content and not content.strip():
            raise RowProblem(f"{key}[{j}].content is empty", "empty")
        clean.append({"role": msg["role"], "content": content})
    return clean
