"""Wording shared by every user-facing error: the closest valid name, and many problems in one message.

No torch here.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# How many problems one error lists before "... and N more".
MAX_REPORTED = 10


def suggest(word: str, choices: Iterable[object]) -> str:
    """' (did you mean X?)' for the closest valid name, or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def listed(problems: list[str], limit: int = MAX_REPORTED) -> str:
    """The first ``limit`` problems, one per indented line, then '... and N more'."""
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n  ".join(["", *problems[:limit]]) + more


def raise_collected(problems: list[str], headline: str, error: type[Exception]) -> None:
    """One ``error`` listing every problem under ``headline``; nothing when there are none."""
    if problems:
        raise error(headline + listed(problems))


def text_table(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, a rule under the header (rows[0])."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)
