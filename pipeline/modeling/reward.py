"""Reward models: a fresh sequence classifier to train (from the base or a merged SFT model), and a trained
one, frozen, to score with.

Its own module because it needs both the loader and the adapter merge (``merge`` builds on ``loading``).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.compat import fix_cpu_4bit
from pipeline.config import LoraConfig, ModelConfig
from pipeline.modeling.loading import ModelRef, add_lora, base_path, load_base
from pipeline.modeling.merge import merge_to_full
from pipeline.util.errors import PipelineError


def load_reward_model(
    cfg: ModelConfig, lora: LoraConfig | None, init: ModelRef | None = None, work_dir: Path | None = None
):
    """(model, base): a sequence classifier with one output (a fresh score head) to train as a reward model,
    and the model directory a new adapter on it belongs to (None: the recipe's base model).

    Starts from the recipe's base model or an earlier stage's model; an SFT adapter is first merged
    into its base (written under ``work_dir``), since a reward model needs the whole network.
    """
    path = None
    if init is not None:
        path = (
            init.path
            if init.form == "full"
            else str(merge_to_full(init, cfg, (work_dir or Path(init.path).parent) / "merged_init"))
        )
    model = load_base(cfg, head="reward", path=path)
    if lora is not None:
        return add_lora(model, cfg, lora, task="SEQ_CLS"), path  # SEQ_CLS also trains the new score head
    if cfg.quantization != "none":
        raise PipelineError("a quantized reward model can only be trained through a LoRA adapter; add a 'lora:' block")
    return model, path


def load_trained_reward_model(cfg: ModelConfig, ref: ModelRef, device=None):
    """A reward model a reward stage saved (full classifier, or adapter + score head on its base), frozen."""
    from peft import PeftModel

    if ref.form == "adapter":
        model = PeftModel.from_pretrained(load_base(cfg, head="reward", path=base_path(ref)), ref.path)
    else:
        model = load_base(cfg, head="reward", path=ref.path)
    fix_cpu_4bit(model)
    if cfg.quantization == "none" and device is not None:
        model.to(device)
    return model.eval()
