"""Offline replicas of real model families: the released conventions hold on the built artifact.

Every check loads the built directory back with plain AutoTokenizer / AutoModelForCausalLM, as a user's
checkpoint would be loaded. The expected values are the releases' (see pipeline/builtin/replicas.py FAMILIES).
"""

from __future__ import annotations

import json

import pytest

from pipeline.builtin import replicas

CONVERSATION = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "The answer is 5."}]

# What each release does (bos added by tokenizer(text); bos written by the chat template; ...).
EXPECTED = {
    "llama3": dict(
        bos="<|begin_of_text|>",
        adds_bos=True,
        template_bos=True,
        eos="<|eot_id|>",
        pad=None,
        turn_end="<|eot_id|>",
        stops=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        vocab_padded=False,
        tied=False,
        gqa=True,
        refuses_system=False,
    ),
    "qwen2.5": dict(
        bos=None,
        adds_bos=False,
        template_bos=False,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        turn_end="<|im_end|>",
        stops=["<|endoftext|>"],
        vocab_padded=True,
        tied=True,
        gqa=True,
        refuses_system=False,
    ),
    "qwen2.5-instruct": dict(
        bos=None,
        adds_bos=False,
        template_bos=False,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        turn_end="<|im_end|>",
        stops=["<|im_end|>", "<|endoftext|>"],
        vocab_padded=True,
        tied=True,
        gqa=True,
        refuses_system=False,
    ),
    "mistral": dict(
        bos="<s>",
        adds_bos=True,
        template_bos=True,
        eos="</s>",
        pad=None,
        turn_end="</s>",
        stops=["</s>"],
        vocab_padded=False,
        tied=False,
        gqa=True,
        refuses_system=False,
    ),
    "gemma2": dict(
        bos="<bos>",
        adds_bos=True,
        template_bos=True,
        eos="<eos>",
        pad="<pad>",
        turn_end="<end_of_turn>",
        stops=["<eos>", "<end_of_turn>"],
        vocab_padded=False,
        tied=True,
        gqa=True,
        refuses_system=True,
    ),
    "phi3": dict(
        bos="<s>",
        adds_bos=False,
        template_bos=False,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        turn_end="<|end|>",
        stops=["<|endoftext|>", "<|assistant|>", "<|end|>"],
        vocab_padded=True,
        tied=False,
        gqa=False,
        refuses_system=False,
    ),
    "qwen3": dict(
        bos=None,
        adds_bos=False,
        template_bos=False,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        turn_end="<|im_end|>",
        stops=["<|im_end|>", "<|endoftext|>"],
        vocab_padded=True,
        tied=True,
        gqa=True,
        refuses_system=False,
    ),
    "gemma3": dict(
        bos="<bos>",
        adds_bos=True,
        template_bos=True,
        eos="<eos>",
        pad="<pad>",
        turn_end="<end_of_turn>",
        stops=["<eos>", "<end_of_turn>"],
        vocab_padded=False,
        vocab_short=True,  # <image_soft_token> has no embedding row
        tied=True,
        gqa=True,
        refuses_system=False,  # folded into the first user turn
    ),
    "llama3.2": dict(
        bos="<|begin_of_text|>",
        adds_bos=True,
        template_bos=True,
        eos="<|eot_id|>",
        pad=None,
        turn_end="<|eot_id|>",
        stops=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        vocab_padded=False,
        tied=True,
        gqa=True,
        refuses_system=False,
    ),
    "r1-distill-qwen": dict(
        bos="<｜begin▁of▁sentence｜>",
        adds_bos=True,
        template_bos=True,
        eos="<｜end▁of▁sentence｜>",
        pad="<｜end▁of▁sentence｜>",
        turn_end="<｜end▁of▁sentence｜>",
        stops=["<｜end▁of▁sentence｜>"],
        vocab_padded=True,
        tied=False,
        gqa=True,
        refuses_system=False,
    ),
    "smollm3": dict(
        bos="<|begin_of_text|>",
        adds_bos=False,
        template_bos=False,
        eos="<|im_end|>",
        pad="<|finetune_right_pad_id|>",
        turn_end="<|im_end|>",
        stops=["<|im_end|>"],
        vocab_padded=False,
        tied=True,
        gqa=True,
        refuses_system=False,
    ),
    "phi4-mini": dict(
        bos="<|endoftext|>",
        adds_bos=False,
        template_bos=False,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        turn_end="<|end|>",
        stops=["<|end|>", "<|endoftext|>"],
        vocab_padded=True,
        tied=True,
        gqa=True,
        refuses_system=False,
    ),
    "olmo2": dict(
        bos="<|endoftext|>",
        adds_bos=False,
        template_bos=True,
        eos="<|endoftext|>",
        pad="<|pad|>",
        turn_end="<|endoftext|>",
        stops=["<|endoftext|>"],
        vocab_padded=True,
        tied=False,
        gqa=False,
        refuses_system=False,
    ),
}
STRICT_ALTERNATION = {"mistral", "gemma2", "gemma3"}
# added tokens released with "special": false: decoding with skip_special_tokens keeps them
PLAIN_TOKENS = {
    "qwen3": ["<think>", "</think>", "<tool_call>"],
    "r1-distill-qwen": ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"],
    "phi4-mini": ["<|tool|>", "<|tool_call|>"],
}


def test_table_covers_the_five_families_and_names_a_release_for_each():
    assert {"llama3", "qwen2.5", "mistral", "gemma2", "phi3"} <= set(replicas.FAMILIES)
    assert set(EXPECTED) == set(replicas.FAMILIES)
    for family in replicas.FAMILIES.values():
        assert "/" in family.copies and family.conventions


@pytest.fixture(scope="module", params=sorted(replicas.FAMILIES))
def built(request):
    from transformers import AutoTokenizer

    path = replicas.replica_path(replicas.PREFIX + request.param)
    return request.param, path, AutoTokenizer.from_pretrained(path)


def _ids(tok, tokens):
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def test_special_tokens_and_bos_as_released(built):
    name, path, tok = built
    want = EXPECTED[name]
    assert tok.bos_token == want["bos"] and tok.eos_token == want["eos"] and tok.pad_token == want["pad"]
    ids = tok("The answer is 5.")["input_ids"]
    assert (ids[0] == tok.bos_token_id) == want["adds_bos"]
    assert tok.bos_token_id not in ids[1:]
    if want["pad"] is not None:
        assert (tok.pad_token_id == tok.eos_token_id) == (want["pad"] == want["eos"])
    # special tokens are single ids and survive as text -> id -> text
    for token in {want["turn_end"], *want["stops"]}:
        token_ids = tok(token, add_special_tokens=False)["input_ids"]
        assert token_ids == [tok.convert_tokens_to_ids(token)], token
    assert json.loads((path / "BUILD.json").read_text())["copies"] == replicas.FAMILIES[name].copies


def test_added_tokens_released_as_not_special_survive_skip_special_tokens(built):
    name, _, tok = built
    family = replicas.FAMILIES[name]
    assert set(PLAIN_TOKENS.get(name, [])) <= family.plain_tokens
    for token in family.specials_front + family.specials_back:
        kept = tok.decode([tok.convert_tokens_to_ids(token)], skip_special_tokens=True) == token
        assert kept == (token in family.plain_tokens), token


def test_generation_config_stops_as_released(built):
    from transformers import GenerationConfig

    name, path, tok = built
    stops = _ids(tok, EXPECTED[name]["stops"])
    configured = GenerationConfig.from_pretrained(path).eos_token_id
    assert configured == (stops if len(stops) > 1 else stops[0])


def test_chat_template_renders_the_released_turn_structure(built):
    name, _, tok = built
    want = EXPECTED[name]
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.startswith(want["bos"]) == want["template_bos"] if want["bos"] else True
    assert "The answer is 5." + want["turn_end"] in text
    prompt = tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert "What is 2 plus 3?" in prompt and "The answer is 5." not in prompt
    ids = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert tok.convert_tokens_to_ids(want["turn_end"]) in ids
    if want["adds_bos"] and want["template_bos"]:
        # the trap the replicas exist for: tokenizing the rendered text adds a second BOS
        assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2


def test_strict_templates_raise_like_the_release(built):
    from jinja2.exceptions import TemplateError

    name, _, tok = built
    system = [{"role": "system", "content": "Be brief."}] + CONVERSATION
    if EXPECTED[name]["refuses_system"]:
        with pytest.raises(TemplateError, match="System role not supported"):
            tok.apply_chat_template(system, tokenize=False)
    else:
        assert "Be brief." in tok.apply_chat_template(system[:2], tokenize=False, add_generation_prompt=True)
    twice = [CONVERSATION[0], CONVERSATION[0], CONVERSATION[1]]
    if name in STRICT_ALTERNATION:
        with pytest.raises(TemplateError, match="must alternate"):
            tok.apply_chat_template(twice, tokenize=False)
    else:
        tok.apply_chat_template(twice, tokenize=False)


def test_model_structure_and_forward_pass(built):
    import torch
    from transformers import AutoModelForCausalLM

    name, path, tok = built
    want = EXPECTED[name]
    model = AutoModelForCausalLM.from_pretrained(path)
    config = model.config
    assert type(model).__name__ == replicas.FAMILIES[name].model_class
    assert (config.vocab_size > len(tok)) == want["vocab_padded"]
    assert (config.vocab_size < len(tok)) == want.get("vocab_short", False)
    assert config.tie_word_embeddings == want["tied"]
    assert (model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()) == want[
        "tied"
    ]
    assert (config.num_key_value_heads < config.num_attention_heads) == want["gqa"]
    ids = torch.tensor([tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size) and torch.isfinite(logits).all()


def test_loads_in_4bit_on_cpu(built):
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    name, path, tok = built
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant, device_map={"": "cpu"}, dtype=torch.float32
    )
    linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert linear and all(isinstance(m, bnb.nn.Linear4bit) for m in linear)  # every layer quantized
    ids = torch.tensor([tok("The answer is 5.")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_builds_are_deterministic(tmp_path):
    for name, family in replicas.FAMILIES.items():
        replicas.build(family, tmp_path / name / "a")
        replicas.build(family, tmp_path / name / "b")
        for file in (
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors",
            "config.json",
            "generation_config.json",
        ):
            assert (tmp_path / name / "a" / file).read_bytes() == (tmp_path / name / "b" / file).read_bytes(), (
                name,
                file,
            )


def test_builtin_ids_resolve_and_unknown_ones_list_the_known():
    from pipeline import modeling
    from pipeline.config import ModelConfig
    from pipeline.util.errors import PipelineError

    assert modeling.resolve_name("builtin:replica-phi3").endswith(f"replica-phi3-{replicas.VERSION}")
    assert ModelConfig(name_or_path="builtin:replica-qwen2.5").name_or_path == "builtin:replica-qwen2.5"
    with pytest.raises(ValueError, match="builtin:replica-gemma2"):
        ModelConfig(name_or_path="builtin:replica-gemma")
    with pytest.raises(PipelineError, match="unknown built-in model 'builtin:replica-gemma'.*builtin:replica-llama3"):
        modeling.resolve_name("builtin:replica-gemma")
