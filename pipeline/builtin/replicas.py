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


@dataclass(frozen=True)
class Family:
    """What one replica copies from one released checkpoint."""

    name: str
    copies: str  # the released checkpoint (Hub id)
    model_class: str  # transformers class, e.g. "LlamaForCausalLM"
    config_class: str
    tokenizer_kind: str  # "llama3" | "qwen2" (byte-level BPE) | "sentencepiece" | "gemma" (▁ pieces, byte fallback)
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


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
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
        ),
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
    )
}

# Phi-3's role and placeholder tokens strip the whitespace after them (added_tokens: "rstrip": true).
_RSTRIP_SPECIALS = {"phi3": frozenset(_PHI3_SPECIALS) - {"<|endoftext|>"}}


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

    if kind in ("llama3", "qwen2"):
        tok = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
        if kind == "qwen2":
            tok.normalizer = normalizers.NFC()
        split = LLAMA3_SPLIT if kind == "llama3" else QWEN2_SPLIT
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

    return AddedToken(token, special=True, normalized=False, rstrip=token in _RSTRIP_SPECIALS.get(family.name, ()))


def build_tokenizer(family: Family):
    """The family's tokenizer as the transformers class its release loads with, trained here."""
    regular, merges = train_pieces(family.tokenizer_kind)
    vocab = vocabulary(family, regular)
    named = {"bos_token": family.bos, "eos_token": family.eos, "pad_token": family.pad, "unk_token": family.unk}
    named_values = set(named.values())
    extra = [_special(t, family) for t in family.specials_front + family.specials_back if t not in named_values]
    kwargs = dict(named, extra_special_tokens=extra, **family.tokenizer_extra)
    if family.tokenizer_kind == "llama3":
        tok = _llama3_tokenizer(family, vocab, merges, kwargs)
    elif family.tokenizer_kind == "qwen2":
        from transformers import Qwen2Tokenizer

        tok = Qwen2Tokenizer(vocab=vocab, merges=merges, **kwargs)
    elif family.tokenizer_kind == "gemma":
        from transformers import GemmaTokenizer

        tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=family.add_bos, add_eos_token=False, **kwargs)
    else:
        from transformers import LlamaTokenizer

        tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=family.add_bos, add_eos_token=False, **kwargs)
    tok.chat_template = family.chat_template
    return tok


def _llama3_tokenizer(family: Family, vocab: dict[str, int], merges: list, kwargs: dict):
    """Llama-3 ships a plain tokenizer.json (PreTrainedTokenizerFast) whose post-processor adds BOS."""
    from tokenizers import decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    tok, _ = _training_tokenizer("llama3")
    regular = {t: i for t, i in vocab.items() if t not in family.specials_back}
    tok.model = models.BPE(vocab=regular, merges=merges, ignore_merges=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([_special(t, family) for t in family.specials_back])
    bos = family.bos
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
            ),
        ]
    )
    assert all(tok.token_to_id(t) == vocab[t] for t in family.specials_back)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def model_vocab_size(family: Family, tokenizer_length: int) -> int:
    """Released Qwen2.5 / Phi-3 embedding matrices have rows past the tokenizer (151936 vs 151665, 32064 vs 32011)."""
    multiple = family.model_vocab_multiple
    if multiple is None:
        return tokenizer_length
    return (tokenizer_length // multiple + 1) * multiple  # strictly larger, as released


def _ids(tokenizer, tokens: tuple[str, ...]) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    assert None not in ids and tokenizer.unk_token_id not in ids, (tokens, ids)
    return ids


def build_model(family: Family, tokenizer):
    """The real transformers class with the scaled-down config, seeded random init, released generation config."""
    import torch
    import transformers

    stop = _ids(tokenizer, family.generation_eos)
    config = getattr(transformers, family.config_class)(
        vocab_size=model_vocab_size(family, len(tokenizer)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop if len(stop) > 1 else stop[0],
        pad_token_id=tokenizer.pad_token_id,
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
