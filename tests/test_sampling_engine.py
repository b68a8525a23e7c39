"""The sampling engine (``pipeline.rollout.engine``): the ``hf`` engine is the stage sampler unchanged; greedy
decoding equals ``generate(do_sample=False)`` for the tiny model and replica families' stop tokens; a seed
fixes the samples; a sampled-only LoRA policy is merged for sampling (not a 4-bit one) with the same greedy
tokens as the unmerged PeftModel, and its adapter files untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from pipeline.builtin.prompt_templates import alpaca_prompt

from conftest import REPO


def _prompts(k: int = 8) -> list[str]:
    import json

    rows = [json.loads(line) for line in (REPO / "data/tiny/prompts_bon.jsonl").read_text().splitlines()]
    return list(dict.fromkeys(alpaca_prompt(r["instruction"], r["input"]) for r in rows))[:k]


def _generate_greedy(model, prompt_ids: list[list[int]], max_new_tokens: int, eos_ids: list[int]) -> list[list[int]]:
    """``model.generate(do_sample=False)`` one prompt at a time (no padding), cut after the first stop id."""
    out = []
    for ids in prompt_ids:
        inputs = torch.tensor([ids])
        with torch.no_grad():
            ref = model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                do_sample=False,
                repetition_penalty=1.0,  # a family's generation_config may set one (qwen2.5: 1.1); greedy is plain argmax
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_ids,
                pad_token_id=eos_ids[0],
            )
        tokens = ref[0, len(ids) :].tolist()
        ends = [i for i, t in enumerate(tokens) if t in eos_ids]
        out.append(tokens[: ends[0] + 1] if ends else tokens)
    return out


def _engine_greedy(model, tok, prompt_ids, max_new_tokens, eos_ids, n=2, batch_size=3):
    from pipeline.rollout.engine import hf_engine

    samples = hf_engine(model, tok, batch_size).sample(prompt_ids, n, max_new_tokens, 0.0, 1.0, eos_ids, seed=0)
    assert [(s.prompt_index, s.sample_idx) for s in samples] == [
        (p, i) for p in range(len(prompt_ids)) for i in range(n)
    ]
    by_prompt = [[s.token_ids for s in samples if s.prompt_index == p] for p in range(len(prompt_ids))]
    assert all(len({tuple(t) for t in group}) == 1 for group in by_prompt)  # greedy: the n samples agree
    return [group[0] for group in by_prompt], samples


# ---------------------------------------------------------------- the hf engine (fast)


def test_hf_engine_is_the_stage_sampler_token_for_token(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.modeling.chat import stop_ids
    from pipeline.rollout import generation
    from pipeline.rollout.engine import SamplingEngine, hf_engine, sample_prompts

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = _prompts(6)
    engine = hf_engine(model, tok, batch_size=4)
    assert isinstance(engine, SamplingEngine) and engine.name == "hf"
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9), (0.0, 1.0)):
        encoded, stops = generation.prompt_inputs(model, tok, prompts)
        old = generation.sample_ids(
            model, encoded, 3, 10, stops, tok.pad_token_id, temperature, top_p, batch_size=4, seed=11
        )
        new = sample_prompts(engine, model, tok, prompts, 3, 10, temperature, top_p, seed=11)
        assert [(s.prompt_index, s.sample_idx, s.token_ids, s.finish_reason) for s in old] == [
            (s.prompt_index, s.sample_idx, s.token_ids, s.finish_reason) for s in new
        ]
    ids = generation.encode_prompts(tok, prompts)
    eos = stop_ids(model, tok, chat=False)
    a = engine.sample(ids, 3, 10, 1.0, 1.0, eos, seed=3)
    b = engine.sample(ids, 3, 10, 1.0, 1.0, eos, seed=3)
    c = engine.sample(ids, 3, 10, 1.0, 1.0, eos, seed=4)
    assert [s.token_ids for s in a] == [s.token_ids for s in b] != [s.token_ids for s in c]  # same seed, same tokens
    assert len({tuple(s.token_ids) for s in a}) > len(prompts)  # sampled: the n samples of a prompt differ


def test_greedy_engine_equals_generate_on_the_tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.rollout import generation

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = generation.encode_prompts(tok, _prompts(7))
    stop = _generate_greedy(model, ids[:1], 12, [tok.eos_token_id])[0][2]  # a token its greedy output produces
    eos_ids = [tok.eos_token_id, stop]
    ours, samples = _engine_greedy(model, tok, ids, 12, eos_ids)
    assert ours == _generate_greedy(model, ids, 12, eos_ids)
    assert any(s.finish_reason == "eos" for s in samples) and any(s.finish_reason == "length" for s in samples)


@pytest.mark.parametrize("family", ["builtin:replica-qwen2.5-instruct", "builtin:replica-llama3"])
def test_greedy_engine_equals_generate_with_a_family_stop_tokens(family):
    """Chat prompts through the family's template, stopped at its own stop ids (end of turn + eos). The random
    replica never ends a turn by itself, so its end-of-turn logit is made to win wherever a token its greedy
    output produces would: some rows stop at the real end-of-turn token and leave the batch, others run on."""
    from transformers import AutoModelForCausalLM

    from pipeline import builtin
    from pipeline.config import ModelConfig
    from pipeline.modeling.chat import end_of_turn_ids, stop_ids
    from pipeline.modeling.loading import load_tokenizer
    from pipeline.rollout import generation

    path = builtin.resolve(family)
    tok = load_tokenizer(ModelConfig(name_or_path=family), padding_side="left")  # as the stages load it
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    questions = ["Add 2 and 3.", "Name a colour.", "Say hi.", "What is 7 times 6?", "Spell cat.", "Count to 3."]
    ids = generation.encode_prompts(tok, [[{"role": "user", "content": q}] for q in questions])
    eos_ids = stop_ids(model, tok, chat=True)
    turn_end = end_of_turn_ids(tok)[0]
    assert turn_end in eos_ids and len(eos_ids) >= 2
    before = _generate_greedy(model, ids, 16, eos_ids)
    # a token some greedy replies produce (after their first tokens) and others never do
    trigger = next(t for t in before[0][2:] if any(t not in reply for reply in before[1:]))
    with torch.no_grad():  # a new head (untied: the prompts' input embeddings stay) scoring end-of-turn as
        old = model.get_output_embeddings()  # trigger plus a small margin: it wins exactly where trigger would
        head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        head.weight.copy_(old.weight)
        head.weight[turn_end] = old.weight[trigger]
        head.bias.zero_()
        head.bias[turn_end] = 1e-3
        model.set_output_embeddings(head)
    ours, samples = _engine_greedy(model, tok, ids, 16, eos_ids)
    assert ours == _generate_greedy(model, ids, 16, eos_ids)
    stopped = [s for s in samples if s.finish_reason == "eos"]
    assert stopped and all(s.token_ids[-1] == turn_end for s in stopped)
    assert len(stopped) < len(samples) or len({len(s.token_ids) for s in samples}) > 1


# ---------------------------------------------------------------- merged weights for sampled-only policies


def _adapter(tiny_model_dir, out: Path) -> Path:
    """A LoRA adapter on the tiny model with non-zero B (a fresh adapter is a no-op), saved to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    return out


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("form", ["full", "lora", "4bit-lora"])
def test_sampled_policy_is_merged_and_greedy_equals_the_unmerged_peft_model(form, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from pipeline.config import ModelConfig
    from pipeline.modeling.loading import ModelRef, load_frozen_policy, load_sampling_policy
    from pipeline.rollout import generation

    cfg = ModelConfig(
        name_or_path=str(tiny_model_dir), dtype="float32", quantization="4bit" if form == "4bit-lora" else "none"
    )
    if form == "full":
        ref = ModelRef(path=str(tiny_model_dir), form="full")
    else:
        ref = ModelRef(
            path=str(_adapter(tiny_model_dir, tmp_path / "adapter")), form="adapter", base=str(tiny_model_dir)
        )
    before = _hashes(Path(ref.path))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    ids = generation.encode_prompts(tok, _prompts(6))
    eos_ids = [tok.eos_token_id]

    sampled = load_sampling_policy(cfg, ref)
    unmerged = load_frozen_policy(cfg, ref)
    assert isinstance(sampled, PeftModel) == (form == "4bit-lora")  # merged unless the base is 4-bit
    assert isinstance(unmerged, PeftModel) == (form != "full")
    ours, _ = _engine_greedy(sampled, tok, ids, 12, eos_ids)
    assert ours == _generate_greedy(unmerged, ids, 12, eos_ids)
    if form == "lora":  # the adapter matters: the base alone answers differently
        base = load_frozen_policy(cfg, ModelRef(path=str(tiny_model_dir), form="full"))
        assert _generate_greedy(base, ids, 12, eos_ids) != ours
    assert _hashes(Path(ref.path)) == before  # nothing written to the adapter (or model) on disk
