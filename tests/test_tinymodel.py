"""The built-in tiny base model: built offline, deterministic, ~1M parameters, tokenizes any text."""

from __future__ import annotations

import json

import pytest

from pipeline.builtin import tiny_model


def test_tiny_model_is_small_llama_with_trained_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n_params < 2e6
    assert model.config.model_type == "llama" and len(tok) == model.config.vocab_size
    assert tok.pad_token_id != tok.eos_token_id  # padding never looks like an end of answer
    # Trained on the task text: the template and answers compress to few tokens.
    assert len(tok("The answer is 8. Anyway, whatever.")["input_ids"]) <= 10
    # Byte-level: real-world text (non-ASCII, code) round-trips exactly.
    text = "Café — naïve 日本語 def f(x): return x**2\n\tdone"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_chat_template_prompt_is_a_prefix_of_prompt_plus_completion(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = [{"role": "user", "content": "What is 2 plus 3?"}]
    full = prompt + [{"role": "assistant", "content": "The answer is 5."}]
    p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    f = tok.apply_chat_template(full, tokenize=False)
    assert f.startswith(p) and f.endswith("The answer is 5.<|eos|>\n")


def test_build_is_deterministic(tmp_path):
    tiny_model.build(tmp_path / "a")
    tiny_model.build(tmp_path / "b")
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert json.loads((tmp_path / "a" / "BUILD.json").read_text())["version"] == tiny_model.VERSION


def test_builtin_name_resolves_and_unknown_builtin_is_refused():
    from pipeline import modeling
    from pipeline.util.errors import PipelineError

    assert modeling.resolve_name("builtin:tiny-llama").endswith(f"tiny-llama-{tiny_model.VERSION}")
    with pytest.raises(PipelineError, match="unknown built-in model 'builtin:gpt5'"):
        modeling.resolve_name("builtin:gpt5")
