"""The built-in tiny base model: a byte-level BPE tokenizer trained here and a ~1M-parameter Llama.

Built once, offline, deterministically, and cached (``$PIPELINE_CACHE`` or ``~/.cache/pipeline``).
Weights are randomly initialised: the demo's SFT stage teaches it everything (measured: SFT from scratch
on the tiny tasks learns them in about a minute on 2 cores; a pretraining pass first bought nothing).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from pipeline.builtin.prompt_templates import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, render_prompt

VERSION = "v1"
VOCAB_SIZE = 1024
ARCH = dict(
    hidden_size=128,
    intermediate_size=384,  # a multiple of the 4-bit block size (64), so QLoRA works on every layer
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
SPECIAL = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>", "unk_token": "<|unk|>"}
# A minimal chat template whose prompt renders identically alone and inside prompt+completion.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ '<|eos|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]


def cache_root() -> Path:
    return Path(os.environ.get("PIPELINE_CACHE", Path.home() / ".cache" / "pipeline"))


def tiny_model_path() -> Path:
    """Directory of the built tiny model; builds it on first use (safe if several processes race)."""
    return built_once(cache_root() / f"tiny-llama-{VERSION}", ("config.json", "tokenizer.json"), build)


def built_once(target: Path, markers: tuple[str, ...], build_into: Callable[[Path], None]) -> Path:
    """``target`` once every marker file is in it; else built into a temporary directory by ``build_into`` and
    renamed into place (atomic: readers see a complete model or none, and racing processes agree)."""
    if all((target / name).is_file() for name in markers):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_into(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / markers[0]).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _corpus() -> list[str]:
    from pipeline.builtin import tasks

    texts = [ALPACA_PROMPT_WITH_INPUT, ALPACA_PROMPT_NO_INPUT]
    for style_seed in (0, 1):
        for row in tasks.generate_rows(3000, seed=100 + style_seed, styled=True):
            texts.append(render_prompt(row, "alpaca") + row["output"])
    return texts


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL.values()) + ROLE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any UTF-8 text encodes, e.g. real Alpaca data
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL, additional_special_tokens=ROLE_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = ARCH["max_position_embeddings"]
    return fast


def build(out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **ARCH,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "BUILD.json").write_text(
        json.dumps({"version": VERSION, "arch": ARCH, "vocab_size": len(tokenizer)}, indent=1)
    )
