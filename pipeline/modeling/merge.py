"""Merging an adapter into its base: a standalone full-precision model (export, reward models from SFT adapters)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ModelConfig
from pipeline.modeling.loading import ModelRef, base_path, load_base, load_tokenizer
from pipeline.util.errors import PipelineError


def merge_to_full(ref: ModelRef, cfg: ModelConfig, out_dir: Path) -> Path:
    """Merge an adapter into its base in full precision (a 4-bit base is loaded unquantized, i.e.
    dequantized) and save a standalone model + tokenizer. Reused if already written."""
    if (out_dir / "config.json").is_file():
        return out_dir
    merged = load_merged(cfg, ref)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    merged.save_pretrained(tmp)
    load_tokenizer(cfg, path=ref.path).save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def load_merged(cfg: ModelConfig, ref: ModelRef, head: str = "causal_lm"):
    """A standalone full-precision model from a stage's output.

    A full model loads as saved. An adapter is applied to its base loaded in full precision (a 4-bit or
    8-bit recipe's base is loaded unquantized: the original weights, not the rounded ones the adapter
    was trained against) and merged into it (``merge_and_unload``).
    """
    from peft import PeftModel

    if ref.form == "full":
        return load_base(cfg, head=head, path=ref.path, quantize=False)
    base = load_base(cfg, head=head, path=base_path(ref), quantize=False)
    try:
        model = PeftModel.from_pretrained(base, ref.path)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot load the adapter {ref.path} on its base {ref.base}: {exc}") from None
    return model.merge_and_unload()
