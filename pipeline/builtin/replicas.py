"""Offline replicas of real model families: their tokenizer conventions and architecture, at ~1M parameters.

Every stage is proven on ``builtin:tiny-llama``, whose home-made tokenizer has none of the conventions on
which alignment pipelines break silently with real checkpoints: pad == eos, no pad at all, BOS added by
the tokenizer *and* written by the chat template, an end-of-turn token that is not ``eos_token``, a list
of stop ids in ``generation_config``, a model vocabulary larger than the tokenizer, tied vs untied
embeddings, GQA, Gemma's soft-capping / sliding window, and chat templates that refuse system turns.

``builtin:replica-<family>`` builds (once, offline, deterministically, cached like the tiny model) the
real transformers class with the released config's *structure* scaled down, randomly initialised, and a
tokenizer trained here that copies the released one's conventions (special tokens and where their ids
sit, bos/eos/pad/unk, whether BOS is added automatically, byte-level BPE vs SentencePiece-style ``▁``
pieces with byte fallback, the published chat template verbatim, ``generation_config``). FAMILIES below
says, per family, which checkpoint is copied and how. Nothing is "fixed up": a release without a pad
token gives a replica without one, because the pipeline must cope with that.

This module imports no torch at import time (``pipeline.builtin.names`` lists its names for config validation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.builtin import replica_templates as templates

VERSION = "v1"
PREFIX = "builtin:replica-"
TRAINED_VOCAB = 1024  # merges + alphabet learned from the corpus; specials and byte tokens come on top
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # SentencePiece byte fallback pieces

# Pre-tokenizer regexes of the released tokenizers (tokenizer.json "pre_tokenizer").
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tiktoken's cl100k_base in the form HF-converted cl100k tokenizers carry (DBRX, OLMo-2's dolma2 tokenizer): the same
# string as Llama-3's, whose tokenizer is cl100k-derived (tiktoken 0.8 spells it with possessive quantifiers).
CL100K_SPLIT = LLAMA3_SPLIT
# tiktoken's o200k_base (tiktoken_ext/openai_public.py), as in the gpt-4o / Phi-4-mini tokenizer.json pre_tokenizer
O200K_SPLIT = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
BYTE_LEVEL_SPLITS = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "cl100k": CL100K_SPLIT, "o200k": O200K_SPLIT}


@dataclass(frozen=True)
class Family:
    """What one replica copies from one released checkpoint."""

    name: str
    copies: str  # the released checkpoint (Hub id)
    model_class: str  # transformers class, e.g. "LlamaForCausalLM"
    config_class: str
    # "llama3" | "qwen2" | "cl100k" | "o200k" (byte-level BPE) | "sentencepiece" | "gemma" (▁ pieces, byte fallback)
    tokenizer_kind: str
    specials_front: tuple[str, ...]  # special tokens at the lowest ids, as released
    specials_back: tuple[str, ...]  # special tokens after the regular vocabulary, as released
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    add_bos: bool  # does tokenizer(text) prepend BOS by itself
    end_of_turn: str  # what closes an assistant turn in the chat template
    chat_template: str
    generation_eos: tuple[str, ...]  # generation_config.eos_token_id, as tokens (a list when released as one)
    generation_extra: dict[str, Any]
    arch: dict[str, Any]  # config kwargs: the released structure, scaled down
    model_vocab_multiple: int | None = None  # model vocab padded past len(tokenizer) to this multiple
    tokenizer_extra: dict[str, Any] = field(default_factory=dict)
    conventions: tuple[str, ...] = ()  # what a pipeline has to get right with this family
    # added tokens released with "special": false (skip_special_tokens keeps them, e.g. Qwen3's <think>)
    plain_tokens: frozenset[str] = frozenset()
    tokenizer_class: str | None = None  # tokenizer_config.json "tokenizer_class" as released, where it differs
    # config.json token ids that differ from the tokenizer's (token text, or None for an absent key)
    config_tokens: dict[str, str | None] = field(default_factory=dict)
    tokens_past_model_vocab: int = 0  # the last ids of the tokenizer have no embedding row (Gemma-3)


def _rope(theta: float, **scaling: Any) -> dict[str, Any]:
    return {"rope_type": scaling.pop("rope_type", "default"), "rope_theta": theta, **scaling}


_LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)  # ids 128000..128010 in the release; the other 245 reserved tokens are left out
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # 151643..151645
_MISTRAL_SPECIALS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)  # ids 0..9; the 758 [control_N] tokens after them are left out
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")  # 0..4, 106, 107
_PHI3_SPECIALS = (
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
)  # 32000..32010

_QWEN3_SPECIALS = (
    *_QWEN_SPECIALS,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)  # 151643..151668, all of them; "special": false from <tool_call> (151657) on
_QWEN3_PLAIN = frozenset(_QWEN3_SPECIALS[14:])
_R1_SPECIALS = (
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜begin▁of▁sentence｜>",
    "<|EOT|>",
    "<think>",
    "</think>",
    *_QWEN3_SPECIALS[7:22],  # <|quad_start|> .. <|file_sep|>, at the same ids as in Qwen2.5 / Qwen3
)  # 151643..151664 (U+FF5C ｜ and U+2581 ▁ in the names); the template's tool tokens are not in the vocabulary
_R1_PLAIN = frozenset(("<｜User｜>", "<｜Assistant｜>", "<|EOT|>", "<think>", "</think>", *_QWEN3_SPECIALS[14:22]))
_GEMMA3_FRONT = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>", "<end_of_turn>")
_GEMMA3_BACK = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")  # 255999, 256000, 262144
# SmolLM3 keeps the Llama-3 vocabulary and renames reserved tokens: bos 128000, pad 128004, eos <|im_end|> 128012
# are in config.json; <think>/</think> = 128002/128003 and <|im_start|> = 128011 come from third-party code and docs
# (one citing the tokenizer_config: "128009 is <|eot_id|>, <|im_end|> is 128012"); 128004-128010 keep Llama-3's names.
_SMOLLM3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<think>",
    "</think>",
    *_LLAMA3_SPECIALS[4:],
    "<|im_start|>",
    "<|im_end|>",
)  # 128000..128012; the other reserved tokens up to 128255 are left out
_PHI4_SPECIALS = (
    "<|endoftext|>",
    "<|endofprompt|>",
    "<|assistant|>",
    "<|end|>",
    "<|user|>",
    "<|system|>",
    "<|tool|>",
    "<|/tool|>",
    "<|tool_call|>",
    "<|/tool_call|>",
    "<|tool_response|>",
    "<|tag|>",
)  # 199999, then 200018..200028 (o200k's 200000..200017 are not in the tokenizer)
_OLMO2_SPECIALS = ("<|endoftext|>", "<|pad|>")  # 100257, 100277; cl100k's FIM / endofprompt ids in between left out

# 7 heads x head_dim 64 (the release's head_dim) over hidden 256: every Linear's in_features is a multiple
# of 64, which bitsandbytes' CPU 4-bit kernel needs (hidden 7 x 32 = 224 failed to load in 4-bit).
_QWEN_ARCH = dict(
    hidden_size=256,
    head_dim=64,
    intermediate_size=1408,
    num_hidden_layers=2,
    num_attention_heads=7,
    num_key_value_heads=1,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    use_sliding_window=False,
    sliding_window=32768,
    max_window_layers=2,
    rope_parameters=_rope(1000000.0),
    hidden_act="silu",
)  # 0.5B: hidden 896, 14 heads / 2 kv heads (head_dim 64), intermediate 4864, tied, qkv bias (fixed in Qwen2)

_QWEN_BASE = Family(
    name="qwen2.5",
    copies="Qwen/Qwen2.5-0.5B",
    model_class="Qwen2ForCausalLM",
    config_class="Qwen2Config",
    tokenizer_kind="qwen2",
    specials_front=(),
    specials_back=_QWEN_SPECIALS,
    bos=None,
    eos="<|endoftext|>",
    pad="<|endoftext|>",
    unk=None,
    add_bos=False,
    end_of_turn="<|im_end|>",
    chat_template=templates.QWEN2_5,
    generation_eos=("<|endoftext|>",),
    generation_extra=dict(do_sample=False, max_new_tokens=2048),
    arch=_QWEN_ARCH,
    model_vocab_multiple=128,
    tokenizer_extra=dict(model_max_length=131072, errors="replace"),
    conventions=(
        "pad == eos == <|endoftext|> (base model): masking pad positions also masks the real EOS",
        "no BOS token at all",
        "chat turns end with <|im_end|>, which is not eos_token; a default system prompt is injected",
        "model vocab (multiple of 128) > len(tokenizer): rows that no token id reaches",
        "GQA 7:1, tied embeddings, q/k/v biases",
    ),
)


_LLAMA3 = Family(
    name="llama3",
    copies="meta-llama/Llama-3.1-8B-Instruct",
    model_class="LlamaForCausalLM",
    config_class="LlamaConfig",
    tokenizer_kind="llama3",
    specials_front=(),
    specials_back=_LLAMA3_SPECIALS,
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    pad=None,
    unk=None,
    add_bos=True,
    end_of_turn="<|eot_id|>",
    chat_template=templates.LLAMA3_1_INSTRUCT,
    generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
    generation_extra=dict(do_sample=True, temperature=0.6, top_p=0.9),
    arch=dict(
        hidden_size=128,
        intermediate_size=448,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        hidden_act="silu",
        rope_parameters=_rope(
            500000.0,
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),  # 8B: hidden 4096, 32 heads / 8 kv heads, intermediate 14336 (3.5x), untied
    tokenizer_extra=dict(model_max_length=131072),
    conventions=(
        "no pad token (the release has none; <|finetune_right_pad_id|> exists but is not pad_token)",
        "the tokenizer prepends <|begin_of_text|> (post-processor) and the chat template writes it too",
        "eos_token is <|eot_id|> (end of turn); generation_config stops on [<|end_of_text|>, <|eom_id|>, <|eot_id|>]",
        "the chat template always writes a system header with 'Cutting Knowledge Date'",
        "GQA 4:1, untied embeddings, llama3 rope scaling",
    ),
)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        _LLAMA3,
        _QWEN_BASE,
        # the Instruct release: same weights' shape and tokenizer, but eos is the end-of-turn token
        replace(
            _QWEN_BASE,
            name="qwen2.5-instruct",
            copies="Qwen/Qwen2.5-0.5B-Instruct",
            eos="<|im_end|>",
            generation_eos=("<|im_end|>", "<|endoftext|>"),
            generation_extra=dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1),
            conventions=(
                "eos_token is <|im_end|> (end of turn), pad is <|endoftext|>; generation stops on both",
                "no BOS token at all; model vocab > len(tokenizer); tied embeddings",
            ),
        ),
        Family(
            name="mistral",
            copies="mistralai/Mistral-7B-Instruct-v0.3",
            model_class="MistralForCausalLM",
            config_class="MistralConfig",
            tokenizer_kind="sentencepiece",
            specials_front=_MISTRAL_SPECIALS,
            specials_back=(),
            bos="<s>",
            eos="</s>",
            pad=None,
            unk="<unk>",
            add_bos=True,
            end_of_turn="</s>",
            chat_template=templates.MISTRAL_V3,
            generation_eos=("</s>",),
            generation_extra={},
            arch=dict(
                hidden_size=128,
                intermediate_size=448,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                max_position_embeddings=32768,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                sliding_window=None,
                rope_parameters=_rope(1000000.0),
                hidden_act="silu",
            ),  # 7B v0.3: hidden 4096, 32 heads / 8 kv heads, intermediate 14336, untied, no sliding window
            tokenizer_extra=dict(model_max_length=1000000000000000019884624838656, legacy=False),
            conventions=(
                "no pad token; the tokenizer prepends <s> and the chat template writes it too",
                "SentencePiece-style ▁ pieces with byte fallback; [INST]/[/INST] are control tokens",
                "strict template: roles must alternate; a system message is merged into the LAST user turn only",
                "the assistant turn is ' ' + content|trim + '</s>' (the end of turn is eos)",
            ),
        ),
        Family(
            name="gemma2",
            copies="google/gemma-2-2b-it",
            model_class="Gemma2ForCausalLM",
            config_class="Gemma2Config",
            tokenizer_kind="gemma",
            specials_front=_GEMMA_SPECIALS,
            specials_back=(),
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            unk="<unk>",
            add_bos=True,
            end_of_turn="<end_of_turn>",
            chat_template=templates.GEMMA,
            generation_eos=("<eos>", "<end_of_turn>"),
            generation_extra=dict(cache_implementation="hybrid"),
            arch=dict(
                hidden_size=128,
                intermediate_size=512,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=64,
                query_pre_attn_scalar=64,
                sliding_window=64,
                max_position_embeddings=8192,
                final_logit_softcapping=30.0,
                attn_logit_softcapping=50.0,
                hidden_activation="gelu_pytorch_tanh",
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                rope_parameters=_rope(10000.0),
            ),  # 2b: hidden 2304, 8 heads x head_dim 256 (!= hidden), 4 kv heads, sliding 4096 on alternate layers
            tokenizer_extra=dict(model_max_length=1000000000000000019884624838656),
            conventions=(
                "the tokenizer prepends <bos> and the chat template writes it too",
                "turns end with <end_of_turn>, not eos; generation_config stops on [<eos>, <end_of_turn>]",
                "strict template: raises on a system turn and on non-alternating roles; assistant is 'model'",
                "logit soft-capping, sliding window on alternate layers, heads*head_dim != hidden; trained with eager attention",
            ),
        ),
        Family(
            name="phi3",
            copies="microsoft/Phi-3-mini-4k-instruct",
            model_class="Phi3ForCausalLM",
            config_class="Phi3Config",
            tokenizer_kind="sentencepiece",
            specials_front=("<unk>", "<s>", "</s>"),
            specials_back=_PHI3_SPECIALS,
            bos="<s>",
            eos="<|endoftext|>",
            pad="<|endoftext|>",
            unk="<unk>",
            add_bos=False,
            end_of_turn="<|end|>",
            chat_template=templates.PHI3,
            generation_eos=("<|endoftext|>", "<|assistant|>", "<|end|>"),
            generation_extra={},
            arch=dict(
                hidden_size=128,
                intermediate_size=320,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=4096,
                original_max_position_embeddings=4096,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                sliding_window=2047,
                rope_parameters=_rope(10000.0),
                hidden_act="silu",
            ),  # mini-4k: hidden 3072, 32 heads, no GQA, intermediate 8192, fused qkv / gate_up, untied
            model_vocab_multiple=64,
            tokenizer_extra=dict(model_max_length=4096, legacy=False, padding_side="left"),
            conventions=(
                "pad == eos == <|endoftext|>; turns end with <|end|>; generation stops on [<|endoftext|>, <|assistant|>, <|end|>]",
                "the tokenizer adds no BOS (add_bos_token false) and the template writes none",
                "the template appends eos_token after the last turn unless add_generation_prompt",
                "model vocab (multiple of 64) > len(tokenizer); fused qkv_proj / gate_up_proj; untied; no GQA",
            ),
        ),
        Family(
            name="qwen3",
            copies="Qwen/Qwen3-0.6B",
            model_class="Qwen3ForCausalLM",
            config_class="Qwen3Config",
            tokenizer_kind="qwen2",
            specials_front=(),
            specials_back=_QWEN3_SPECIALS,
            bos=None,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            unk=None,
            add_bos=False,
            end_of_turn="<|im_end|>",
            chat_template=templates.QWEN3,
            generation_eos=("<|im_end|>", "<|endoftext|>"),
            generation_extra=dict(do_sample=True, temperature=0.6, top_k=20, top_p=0.95),
            arch=dict(
                hidden_size=128,
                head_dim=64,
                intermediate_size=384,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=40960,
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                attention_bias=False,
                use_sliding_window=False,
                sliding_window=None,
                max_window_layers=2,
                rope_parameters=_rope(1000000.0),
                hidden_act="silu",
            ),  # 0.6B: hidden 1024, 16 heads x head_dim 128 (2 x hidden), 8 kv heads, intermediate 3072, tied, q/k norm
            model_vocab_multiple=128,
            tokenizer_extra=dict(model_max_length=131072, errors="replace"),
            plain_tokens=_QWEN3_PLAIN,
            config_tokens={"bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>", "pad_token_id": None},
            conventions=(
                "eos_token is <|im_end|> (end of turn), pad is <|endoftext|>; generation stops on [<|im_end|>, <|endoftext|>]",
                "no BOS token at all; no default system prompt (unlike Qwen2.5)",
                "thinking template: the last assistant turn renders '<think>\\n\\n</think>\\n\\n' + reply even without "
                "reasoning, earlier turns lose theirs; enable_thinking=false adds an empty think block to the generation prompt",
                "<think>, </think> and the tool / FIM tokens have special=false: skip_special_tokens keeps them",
                "config.json: eos <|im_end|> alone, bos <|endoftext|>, no pad; model vocab (multiple of 128) > len(tokenizer)",
                "GQA 2:1, heads*head_dim = 2 x hidden, q/k RMSNorm, no biases, tied embeddings",
            ),
        ),
        Family(
            name="gemma3",
            copies="google/gemma-3-1b-it",
            model_class="Gemma3ForCausalLM",
            config_class="Gemma3TextConfig",
            tokenizer_kind="gemma",
            specials_front=_GEMMA3_FRONT,
            specials_back=_GEMMA3_BACK,
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            unk="<unk>",
            add_bos=True,
            end_of_turn="<end_of_turn>",
            chat_template=templates.GEMMA3,
            generation_eos=("<eos>", "<end_of_turn>"),
            # reconstructed (no verbatim generation_config.json found); eos [1, 106] also in config.json
            generation_extra=dict(cache_implementation="hybrid", do_sample=True, top_k=64, top_p=0.95),
            arch=dict(
                hidden_size=128,
                intermediate_size=768,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=64,
                query_pre_attn_scalar=64,
                sliding_window=64,
                layer_types=["sliding_attention", "full_attention"],
                max_position_embeddings=32768,
                final_logit_softcapping=None,
                attn_logit_softcapping=None,
                hidden_activation="gelu_pytorch_tanh",
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                rope_parameters={"full_attention": _rope(1000000.0), "sliding_attention": _rope(10000.0)},
            ),  # 1b: hidden 1152, 4 heads x head_dim 256, 1 kv head, intermediate 6912, 26 layers: 5 sliding (512) : 1 full
            tokenizer_extra=dict(model_max_length=1000000000000000019884624838656),
            # "\n" (107) is an added non-special token in the release: left out ("\n" is a byte piece here); <mask>
            # is special=false too, but GemmaTokenizer names it mask_token, which makes it special when loaded
            plain_tokens=frozenset({"[multimodal]"}),
            tokens_past_model_vocab=1,
            conventions=(
                "the tokenizer prepends <bos> and the chat template writes it too",
                "turns end with '<end_of_turn>\\n' and never with eos; generation stops on [<eos>, <end_of_turn>]",
                "a system message is folded into the first user turn; roles must alternate (raises); assistant is 'model'",
                "len(tokenizer) = model vocab + 1: <image_soft_token> has no embedding row",
                "sliding-window (rope 1e4) and full-attention (rope 1e6) layers, q/k norm, no soft-capping; tied; eager attention",
            ),
        ),
        replace(
            _LLAMA3,
            name="llama3.2",
            copies="meta-llama/Llama-3.2-1B-Instruct",
            chat_template=templates.LLAMA3_2,
            arch=dict(
                hidden_size=128,
                head_dim=32,
                intermediate_size=512,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                max_position_embeddings=131072,
                rms_norm_eps=1e-5,
                tie_word_embeddings=True,
                hidden_act="silu",
                rope_parameters=_rope(
                    500000.0,
                    rope_type="llama3",
                    factor=32.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=8192,
                ),
            ),  # 1B: hidden 2048, 32 heads x head_dim 64, 8 kv heads, intermediate 8192 (4x), 16 layers, tied
            tokenizer_class="PreTrainedTokenizerFast",
            conventions=(
                "no pad token; the tokenizer prepends <|begin_of_text|> (post-processor) and the chat template writes it too",
                "eos_token is <|eot_id|>; generation_config stops on [<|end_of_text|>, <|eom_id|>, <|eot_id|>]",
                "the template always writes a system turn dated strftime_now('%d %b %Y'): rendered data changes with "
                "the day unless date_string is passed",
                "tied embeddings (3.1 8B is untied), llama3 rope scaling factor 32, GQA 4:1",
            ),
        ),
        Family(
            name="r1-distill-qwen",
            copies="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
            model_class="Qwen2ForCausalLM",
            config_class="Qwen2Config",
            tokenizer_kind="qwen2",
            specials_front=(),
            specials_back=_R1_SPECIALS,
            bos="<｜begin▁of▁sentence｜>",
            eos="<｜end▁of▁sentence｜>",
            pad="<｜end▁of▁sentence｜>",
            unk=None,
            add_bos=True,
            end_of_turn="<｜end▁of▁sentence｜>",
            chat_template=templates.DEEPSEEK_R1_DISTILL,
            generation_eos=("<｜end▁of▁sentence｜>",),
            generation_extra=dict(do_sample=True, temperature=0.6, top_p=0.95),
            arch=dict(
                hidden_size=192,
                intermediate_size=1088,
                num_hidden_layers=2,
                num_attention_heads=6,
                num_key_value_heads=1,
                max_position_embeddings=131072,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                use_sliding_window=False,
                sliding_window=4096,  # as recalled for the original config.json (unverified); unused
                max_window_layers=2,
                rope_parameters=_rope(10000.0),
                hidden_act="silu",
            ),  # 1.5B: hidden 1536, 12 heads x 128 / 2 kv heads, intermediate 8960, 28 layers, untied, q/k/v biases
            model_vocab_multiple=128,
            # the release's tokenizer_config: LlamaTokenizerFast over the Qwen byte-level vocabulary, add_bos_token true
            # (transformers 5 loads it as Qwen2Tokenizer; BOS comes from the post-processor written here)
            tokenizer_extra=dict(model_max_length=16384, legacy=True),
            plain_tokens=_R1_PLAIN,
            tokenizer_class="LlamaTokenizerFast",
            config_tokens={"bos_token_id": "<｜end▁of▁sentence｜>", "pad_token_id": None},
            conventions=(
                "the tokenizer prepends <｜begin▁of▁sentence｜> and the chat template writes {{bos_token}} too",
                "pad == eos == end of turn == <｜end▁of▁sentence｜>; generation stops on it alone",
                "the generation prompt opens reasoning ('<｜Assistant｜><think>\\n') and rendered assistant turns drop "
                "everything up to the last </think>: a rendered conversation never shows the think block",
                "<｜User｜>, <｜Assistant｜>, <think>, </think> have special=false: skip_special_tokens keeps them",
                "config.json's bos_token_id is <｜end▁of▁sentence｜> (151643), not the BOS; untied; q/k/v biases; GQA 6:1",
                "model vocab (multiple of 128) > len(tokenizer)",
            ),
        ),
        Family(
            name="smollm3",
            copies="HuggingFaceTB/SmolLM3-3B",
            model_class="SmolLM3ForCausalLM",
            config_class="SmolLM3Config",
            tokenizer_kind="llama3",
            specials_front=(),
            specials_back=_SMOLLM3_SPECIALS,
            bos="<|begin_of_text|>",
            eos="<|im_end|>",
            pad="<|finetune_right_pad_id|>",
            unk=None,
            add_bos=False,  # unverified for tokenizer.json; the template writes no BOS
            end_of_turn="<|im_end|>",
            chat_template=templates.SMOLLM3,
            generation_eos=("<|im_end|>",),  # config.json eos 128012; generation_config.json not found verbatim
            generation_extra=dict(do_sample=True, temperature=0.6, top_p=0.95),  # the model card's recommendation
            arch=dict(
                hidden_size=128,
                intermediate_size=704,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                max_position_embeddings=65536,
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                use_sliding_window=False,
                sliding_window=None,
                no_rope_layers=[1, 0],  # 1 = RoPE; the release has NoPE on every 4th layer, here the 2nd of 2
                layer_types=["full_attention", "full_attention"],
                attention_bias=False,
                mlp_bias=False,
                rope_parameters=_rope(5000000.0),
                hidden_act="silu",
            ),  # 3B: hidden 2048, 16 heads x 128 / 4 kv heads, intermediate 11008, 36 layers, tied
            tokenizer_class="PreTrainedTokenizerFast",  # unverified (tokenizer_config.json not found)
            conventions=(
                "no BOS added (unverified) and none written by the template; pad <|finetune_right_pad_id|> (128004)",
                "eos == end of turn == <|im_end|>; generation stops on it",
                "the template always writes a system block with 'Today Date' (strftime_now) and a default prompt, "
                "not closed by <|im_end|> unless tools are given",
                "/think (default) renders assistant turns as given; '/no_think' in the system message prefixes every "
                "assistant turn with an empty think block; {% generation %} marks assistant turns",
                "NoPE layers (no_rope_layers), tied embeddings, GQA 4:1",
            ),
        ),
        Family(
            name="phi4-mini",
            copies="microsoft/Phi-4-mini-instruct",
            model_class="Phi3ForCausalLM",
            config_class="Phi3Config",
            tokenizer_kind="o200k",
            specials_front=(),
            specials_back=_PHI4_SPECIALS,
            bos="<|endoftext|>",
            eos="<|endoftext|>",
            pad="<|endoftext|>",
            unk="<|endoftext|>",
            add_bos=False,
            end_of_turn="<|end|>",
            chat_template=templates.PHI4_MINI,
            generation_eos=("<|end|>", "<|endoftext|>"),
            generation_extra={},  # only eos_token_id is verified
            arch=dict(
                hidden_size=192,
                intermediate_size=512,
                num_hidden_layers=2,
                num_attention_heads=6,
                num_key_value_heads=2,
                max_position_embeddings=131072,
                original_max_position_embeddings=4096,
                rms_norm_eps=1e-5,
                tie_word_embeddings=True,
                sliding_window=262144,
                hidden_act="silu",
                rope_parameters=_rope(
                    10000.0,
                    rope_type="longrope",
                    partial_rotary_factor=0.75,
                    short_factor=[1.0] * 12,
                    # every 4th of the release's 48 long factors: rotary dim 24 here (0.75 x head_dim 32), 96 released
                    long_factor=[1.0, 1.564103225, 2.446418898, 3.826451687, 5.984965424, 9.36110372]
                    + [14.64173252, 22.90118105, 32.1, 32.6, 32.71, 33.49],
                ),
            ),  # hidden 3072, 24 heads x 128 / 8 kv heads, intermediate 8192, 32 layers, fused qkv / gate_up, tied
            model_vocab_multiple=64,
            tokenizer_extra=dict(model_max_length=131072, add_prefix_space=False, clean_up_tokenization_spaces=False),
            plain_tokens=frozenset(_PHI4_SPECIALS[6:11]),
            tokenizer_class="GPT2Tokenizer",
            config_tokens={"eos_token_id": "<|endoftext|>"},
            conventions=(
                "bos == eos == pad == unk == <|endoftext|>; no BOS added or written",
                "turns end with <|end|>, no newlines anywhere; generation_config stops on [<|end|>, <|endoftext|>] "
                "but config.json's eos is <|endoftext|> alone",
                "the template appends eos_token after the last turn unless add_generation_prompt",
                "o200k byte-level BPE declared as GPT2Tokenizer; chat markers rstrip; the tool tags have special=false",
                "partial rotary (0.75) with LongRoPE, fused qkv_proj / gate_up_proj, tied, GQA 3:1; model vocab > len(tokenizer)",
            ),
        ),
        Family(
            name="olmo2",
            copies="allenai/OLMo-2-1124-7B-Instruct",
            model_class="Olmo2ForCausalLM",
            config_class="Olmo2Config",
            tokenizer_kind="cl100k",
            specials_front=(),
            specials_back=_OLMO2_SPECIALS,
            bos="<|endoftext|>",
            eos="<|endoftext|>",
            pad="<|pad|>",
            unk="<|endoftext|>",
            add_bos=False,  # the template writes bos_token itself (open-instruct: newer OLMo templates, no --add_bos)
            end_of_turn="<|endoftext|>",
            chat_template=templates.OLMO2,
            generation_eos=("<|endoftext|>",),  # the base model's generation_config (the Instruct file was not found)
            generation_extra={},
            arch=dict(
                hidden_size=128,
                intermediate_size=320,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=4096,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                attention_bias=False,
                rope_parameters=_rope(500000.0),
                hidden_act="silu",
            ),  # 7B: hidden 4096, 32 heads x 128, no GQA, intermediate 11008, 32 layers, untied
            model_vocab_multiple=128,
            tokenizer_class="GPT2Tokenizer",  # as recalled for the release (file not read)
            config_tokens={"bos_token_id": None},
            conventions=(
                "bos == eos == unk == <|endoftext|>: the template writes it first and after every assistant reply; "
                "pad is <|pad|>",
                "the tokenizer adds no BOS; cl100k byte-level BPE; <|user|> / <|assistant|> are plain text, not tokens",
                "assistant turns end with eos (+ '\\n' unless last); no default system prompt",
                "config.json has no bos_token_id; q/k RMSNorm and post-norm blocks; no GQA; untied; model vocab > len(tokenizer)",
            ),
        ),
    )
}

# Phi-3's role and placeholder tokens strip the whitespace after them (added_tokens: "rstrip": true); so does
# every one of Phi-4-mini's 2000xx tokens.
_RSTRIP_SPECIALS = {
    "phi3": frozenset(_PHI3_SPECIALS) - {"<|endoftext|>"},
    "phi4-mini": frozenset(_PHI4_SPECIALS) - {"<|endoftext|>"},
}


def builtin_names() -> list[str]:
    return [PREFIX + name for name in FAMILIES]


def family_of(name_or_path: str) -> Family | None:
    """The family a ``builtin:replica-<family>`` id names; None for anything else."""
    if not name_or_path.startswith(PREFIX):
        return None
    return FAMILIES.get(name_or_path[len(PREFIX) :])


def replica_path(name_or_path: str) -> Path:
    """Directory of a built replica; builds it on first use (safe if several processes race)."""
    from pipeline.builtin.tiny_model import built_once, cache_root

    family = family_of(name_or_path)
    if family is None:
        raise KeyError(f"unknown replica {name_or_path!r}; known: {', '.join(builtin_names())}")
    target = cache_root() / f"replica-{family.name}-{VERSION}"
    return built_once(target, ("BUILD.json",), lambda out_dir: build(family, out_dir))


def build(family: Family, out_dir: Path) -> None:
    """Tokenizer + randomly initialised model + generation config + BUILD.json into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family)
    model = build_model(family, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if family.tokenizer_class:  # the class the release declares, e.g. LlamaTokenizerFast over a byte-level vocabulary
        config_file = out_dir / "tokenizer_config.json"
        tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
        tokenizer_config["tokenizer_class"] = family.tokenizer_class
        config_file.write_text(
            json.dumps(tokenizer_config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    summary = {
        "version": VERSION,
        "family": family.name,
        "copies": family.copies,
        "model_class": family.model_class,
        "tokenizer_length": len(tokenizer),
        "model_vocab_size": model.config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "arch": family.arch,
        "conventions": list(family.conventions),
    }
    (out_dir / "BUILD.json").write_text(json.dumps(summary, indent=1))


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def _corpus() -> list[str]:
    from pipeline.builtin.tiny_model import _corpus as tiny_corpus

    return tiny_corpus()  # the tiny model's: Alpaca templates + task rows, deterministic


def _training_tokenizer(kind: str):
    """An untrained ``tokenizers`` BPE whose normalisation and pre-tokenisation are the family's, so the
    merges learned here are the ones the transformers tokenizer class applies when it loads them."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    if kind in BYTE_LEVEL_SPLITS:
        tok = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
        if kind == "qwen2":
            tok.normalizer = normalizers.NFC()
        split = BYTE_LEVEL_SPLITS[kind]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        return tok, pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(byte_fallback=True))
    if kind == "gemma":  # SentencePiece without a dummy prefix: every space becomes ▁, nothing is prepended
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    else:  # Llama/Mistral/Phi SentencePiece: ▁ for spaces, one ▁ prepended to the text
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    return tok, []


def train_pieces(kind: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Regular tokens (in rank order) and merges learned from the corpus with the family's pre-tokenisation."""
    from tokenizers import trainers

    tok, alphabet = _training_tokenizer(kind)
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB, initial_alphabet=alphabet, special_tokens=[], show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return tokens, merges


def vocabulary(family: Family, regular: list[str]) -> dict[str, int]:
    """Token -> id with the release's layout: front specials (and byte pieces), regular tokens, back specials."""
    order = list(family.specials_front)
    if family.tokenizer_kind in ("sentencepiece", "gemma"):
        order += BYTE_TOKENS
    seen = set(order)
    order += [t for t in regular if t not in seen and t not in family.specials_back]
    order += list(family.specials_back)
    return {token: i for i, token in enumerate(order)}


def _special(token: str, family: Family):
    from tokenizers import AddedToken

    return AddedToken(
        token,
        special=token not in family.plain_tokens,
        normalized=False,
        rstrip=token in _RSTRIP_SPECIALS.get(family.name, ()),
    )


def build_tokenizer(family: Family):
    """The family's tokenizer as the transformers class its release loads with, trained here."""
    regular, merges = train_pieces(family.tokenizer_kind)
    vocab = vocabulary(family, regular)
    named = {"bos_token": family.bos, "eos_token": family.eos, "pad_token": family.pad, "unk_token": family.unk}
    named_values = set(named.values())
    added = family.specials_front + family.specials_back
    extra = [_special(t, family) for t in added if t not in named_values and t not in family.plain_tokens]
    kwargs = dict(named, extra_special_tokens=extra, **family.tokenizer_extra)
    if family.tokenizer_kind in ("llama3", "cl100k", "o200k"):
        tok = _llama3_tokenizer(family, vocab, merges, kwargs)
    elif family.tokenizer_kind == "qwen2":
        from transformers import Qwen2Tokenizer

        if family.add_bos:  # R1 distills: add_bos_token over the Qwen vocabulary; a BOS post-processor results
            kwargs.update(add_bos_token=True, add_eos_token=False)
        tok = Qwen2Tokenizer(vocab=vocab, merges=merges, **kwargs)
    elif family.tokenizer_kind == "gemma":
        from transformers import GemmaTokenizer

        tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=family.add_bos, add_eos_token=False, **kwargs)
    else:
        from transformers import LlamaTokenizer

        tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=family.add_bos, add_eos_token=False, **kwargs)
    plain = [t for t in added if t in family.plain_tokens]
    if plain and family.tokenizer_kind not in ("llama3", "cl100k", "o200k"):  # those got them with their ids above
        tok.add_tokens([_special(t, family) for t in plain])
    assert all(tok.convert_tokens_to_ids(t) == vocab[t] for t in added), family.name
    tok.chat_template = family.chat_template
    return tok


def _llama3_tokenizer(family: Family, vocab: dict[str, int], merges: list, kwargs: dict):
    """Llama-3 ships a plain tokenizer.json (PreTrainedTokenizerFast) whose post-processor adds BOS; SmolLM3,
    Phi-4-mini (o200k) and OLMo-2 (cl100k) ship byte-level tokenizer.json files whose post-processor adds none
    (transformers 5 loads all of them from tokenizer.json as they are)."""
    from tokenizers import decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    kind = family.tokenizer_kind
    tok, _ = _training_tokenizer(kind)
    regular = {t: i for t, i in vocab.items() if t not in family.specials_back}
    tok.model = models.BPE(vocab=regular, merges=merges, ignore_merges=kind == "llama3")
    tok.decoder = decoders.ByteLevel()
    if family.plain_tokens:  # one at a time, in id order, each with its own "special" flag
        for token in family.specials_back:
            tok.add_tokens([_special(token, family)])
    else:
        tok.add_special_tokens([_special(t, family) for t in family.specials_back])
    bos = family.bos
    if family.add_bos:
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
                ),
            ]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    assert all(tok.token_to_id(t) == vocab[t] for t in family.specials_back)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def model_vocab_size(family: Family, tokenizer_length: int) -> int:
    """Released Qwen2.5 / Phi-3 embedding matrices have rows past the tokenizer (151936 vs 151665, 32064 vs 32011)."""
    if family.tokens_past_model_vocab:  # Gemma-3: 262145 token ids, 262144 embedding rows
        return tokenizer_length - family.tokens_past_model_vocab
    multiple = family.model_vocab_multiple
    if multiple is None:
        return tokenizer_length
    return (tokenizer_length // multiple + 1) * multiple  # strictly larger, as released


def _ids(tokenizer, tokens: tuple[str, ...]) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    unknown = [
        t for t, i in zip(tokens, ids) if i is None or (i == tokenizer.unk_token_id and t != tokenizer.unk_token)
    ]
    assert not unknown, (tokens, ids)  # (Phi-4-mini's and OLMo-2's unk is their eos)
    return ids


def build_model(family: Family, tokenizer):
    """The real transformers class with the scaled-down config, seeded random init, released generation config."""
    import torch
    import transformers

    stop = _ids(tokenizer, family.generation_eos)
    token_ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop if len(stop) > 1 else stop[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    for key, token in family.config_tokens.items():  # config.json as released, where it disagrees with the tokenizer
        token_ids[key] = None if token is None else _ids(tokenizer, (token,))[0]
    config = getattr(transformers, family.config_class)(
        vocab_size=model_vocab_size(family, len(tokenizer)),
        **token_ids,
        **family.arch,
    )
    torch.manual_seed(0)
    model = getattr(transformers, family.model_class)(config)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop if len(stop) > 1 else stop[0],
        pad_token_id=tokenizer.pad_token_id,
        **family.generation_extra,
    )
    return model
