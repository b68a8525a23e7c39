"""Thinking templates and date-stamped templates on the 2026 families (offline replicas with the released chat
templates verbatim): what is trained is what sampling renders, with thinking on or off, and a prompt renders the
same on every day of a run. Each trap is shown happening on the raw template before the pipeline's handling is
checked. Fast: tokenizers only."""

from __future__ import annotations

import datetime

import pytest

from pipeline.builtin import replicas
from pipeline.config import ModelConfig
from pipeline.util.errors import PipelineError

CHAT = [{"role": "user", "content": "What is 2 plus 3?"}]
REPLY = [{"role": "assistant", "content": "The answer is 5."}]


def tokenizer(family: str, **kwargs):
    from pipeline.modeling import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=replicas.PREFIX + family, chat_template_kwargs=kwargs))


def render(tok, messages, add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def trained_context(tok, prompt, completion) -> list[int]:
    """The tokens TRL's SFT trains the completion after (its prompt/completion split: the common prefix)."""
    from trl.data_utils import common_prefix_length

    from pipeline.modeling.chat import chat_ids

    alone, together = chat_ids(tok, prompt, True), chat_ids(tok, prompt + completion)
    return together[: common_prefix_length(alone, together)]


def sampled_prompt(tok, prompt) -> list[int]:
    from pipeline.rollout.generation import encode_prompts

    return encode_prompts(tok, [prompt])[0]


# ------------------------------------------------------------------------------------------------
# Qwen3 and SmolLM3: enable_thinking, the same for training and sampling
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3", "smollm3"])
@pytest.mark.parametrize("thinking", [True, False])
def test_thinking_switch_reaches_training_and_sampling_alike(family, thinking):
    tok = tokenizer(family, enable_thinking=thinking)
    assert trained_context(tok, CHAT, REPLY) == sampled_prompt(tok, CHAT)
    prompt = render(tok, CHAT, True)
    empty_block = "<think>\n\n</think>\n"
    assert (empty_block in prompt) is (not thinking)  # off: the prompt closes an empty think block
    trained = render(tok, CHAT + REPLY, False)[len(prompt) :]
    if family == "qwen3":  # Qwen3 writes the empty block into a finished reply when thinking is on
        assert trained.startswith(empty_block + "\n" if thinking else "The answer is 5.")
    assert "The answer is 5." in trained


@pytest.mark.parametrize("family", ["qwen3", "smollm3"])
def test_without_the_recipe_key_the_release_default_thinks(family):
    tok = tokenizer(family)
    assert "<think>\n\n</think>" not in render(tok, CHAT, True)


def test_qwen3_drops_reasoning_of_earlier_turns_and_the_prompt_still_matches():
    tok = tokenizer("qwen3", enable_thinking=False)
    earlier = [
        *CHAT,
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nThe answer is 5."},
        {"role": "user", "content": "And 3 plus 4?"},
    ]
    assert "add them" not in render(tok, earlier, True)  # the template strips it
    assert trained_context(tok, earlier, [{"role": "assistant", "content": "7."}]) == sampled_prompt(tok, earlier)


def test_a_thinking_switch_on_a_family_without_one_is_refused():
    with pytest.raises(PipelineError, match="never reads 'enable_thinking'"):
        tokenizer("llama3.2", enable_thinking=False)


# ------------------------------------------------------------------------------------------------
# DeepSeek-R1 distills: the generation prompt opens a think block a finished reply never shows
# ------------------------------------------------------------------------------------------------


def test_r1_distill_trap_trl_would_train_replies_without_the_think_opener():
    tok = tokenizer("r1-distill-qwen")
    alone, together = render(tok, CHAT, True), render(tok, CHAT + REPLY, False)
    assert alone.endswith("<｜Assistant｜><think>\n") and not together.startswith(alone)  # the trap
    assert trained_context(tok, CHAT, REPLY) != sampled_prompt(tok, CHAT)


def test_r1_distill_rows_train_on_the_prompt_sampling_renders():
    from pipeline.data.sft import Example
    from pipeline.stages.sft import as_sampling_renders, token_counter

    tok = tokenizer("r1-distill-qwen")
    reasoned = [{"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n\nThe answer is 5."}]
    for completion, body in (
        (REPLY, "</think>\n\nThe answer is 5."),
        (reasoned, "2 + 3 = 5\n</think>\n\nThe answer is 5."),
    ):
        (ex,) = as_sampling_renders(tok, [Example(CHAT, completion, "row 1")])
        assert isinstance(ex.prompt, str) and ex.completion == body + tok.eos_token
        prompt_ids = tok(ex.prompt)["input_ids"]  # as TRL tokenizes a text prompt: the tokenizer adds BOS
        assert prompt_ids == sampled_prompt(tok, CHAT)
        assert prompt_ids.count(tok.bos_token_id) == 1
        full = tok(ex.prompt + ex.completion)["input_ids"]
        assert full[: len(prompt_ids)] == prompt_ids  # no token merges across the boundary
        assert token_counter(tok)(ex) == (len(prompt_ids), len(full))  # ends with EOS: TRL adds none
    other = tokenizer("qwen3")
    (kept,) = as_sampling_renders(other, [Example(CHAT, REPLY, "row 1")])
    assert kept.prompt == CHAT  # every other template trains conversations as they are


def test_r1_distill_dpo_pairs_score_replies_in_the_sampling_context():
    from pipeline.stages.dpo import as_sampling_renders

    tok = tokenizer("r1-distill-qwen")
    (pair,) = as_sampling_renders(
        tok, [{"prompt": CHAT, "chosen": REPLY, "rejected": [{"role": "assistant", "content": "Five?"}]}]
    )
    assert tok(pair["prompt"])["input_ids"] == sampled_prompt(tok, CHAT)
    assert pair["chosen"].startswith("</think>\n\nThe answer is 5.") and pair["rejected"].startswith(
        "</think>\n\nFive?"
    )


# ------------------------------------------------------------------------------------------------
# Date-stamped templates: Llama-3.2 (date_string, else strftime_now) and SmolLM3 (strftime_now)
# ------------------------------------------------------------------------------------------------


class _Day:
    def __init__(self, day: int):
        self.day = day

    def now(self):
        return datetime.datetime(2026, 12, self.day, 23, 59)


@pytest.mark.parametrize(
    "family, shown", [("llama3.2", "Today Date: 05 Dec 2026"), ("smollm3", "Today Date: 05 December 2026")]
)
def test_a_date_stamped_prompt_renders_the_same_on_every_day_of_a_run(family, shown, monkeypatch):
    import transformers.utils.chat_template_utils as ctu

    from pipeline.modeling import load_tokenizer
    from pipeline.modeling.chat import RUN_DATE_KEY

    name = replicas.PREFIX + family
    raw = load_tokenizer(ModelConfig(name_or_path=name))
    run = ModelConfig(name_or_path=name).model_copy(update={"chat_template_kwargs": {RUN_DATE_KEY: "2026-12-05"}})
    fixed = load_tokenizer(run)  # as a stage gets it (pipeline.run.runner.with_run_date)
    days = {}
    for day in (5, 6):
        monkeypatch.setattr(ctu, "datetime", _Day(day))
        days[day] = (render(raw, CHAT, True), render(fixed, CHAT, True))
    assert days[5][0] != days[6][0]  # the trap: the released template prints the day it renders on
    assert days[5][1] == days[6][1] and shown in days[6][1]
