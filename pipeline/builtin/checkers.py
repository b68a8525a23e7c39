"""Generic checkers for real data, where no gold answer exists: ``module:function(row, response) -> bool``.

They measure what can be checked without a judge model, honestly named: a response is there, it ended
by itself (when the sampler says so), and it carries no chat markup (a special token's text, a role header),
the sign that sampling ran past the end of the turn.
"""

from __future__ import annotations

import re

# Chat markup of the common families: Llama-3 headers, ChatML, Mistral [INST], Gemma turns, Phi-3 roles,
# and the usual BOS / EOS spellings.
MARKUP = re.compile(
    r"<\|(?:begin_of_text|end_of_text|start_header_id|end_header_id|eot_id|eom_id|im_start|im_end|endoftext|"
    r"system|user|assistant|end)\|>|\[/?INST\]|<(?:start|end)_of_turn>|</?s>|<(?:bos|eos|pad)>"
)


def nonempty_response(row: dict, response: str) -> bool:
    return bool(response.strip())


def no_markup_leak(row: dict, response: str) -> bool:
    return MARKUP.search(response) is None
