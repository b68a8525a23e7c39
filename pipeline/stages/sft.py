"""SFT: instruction data -> prompt/completion examples -> TRL's SFTTrainer, loss on the response only."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, ClassVar, Literal

from pydantic import Field

from pipeline.config import SFTDataConfig, StageConfig, TrainConfig, as_mixture
from pipeline.config.registry import POLICY, StageKind, register
from pipeline.data.mixture import Part, mix, summary_lines
from pipeline.data.sft import Example, apply_length_policy, load_sft_examples, merge_reports
from pipeline.data.sources import holdout_split
from pipeline.run.context import StageContext
from pipeline.stages import input_files, keep_checks
from pipeline.util.files import write_json_atomic


class SFTStage(StageConfig):
    """Supervised fine-tuning on instruction data (TRL SFTTrainer), loss on the response tokens only."""

    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "init_from": (POLICY,),
        "data.train.from_stage": ("bon",),  # rejection-sampling fine-tuning: SFT on best-of-n's best
        "data.eval.from_stage": ("bon",),
    }

    kind: Literal["sft"] = "sft"
    data: SFTDataConfig
    train: TrainConfig = TrainConfig()
    init_from: str | None = Field(
        None, description="Continue from the model of an earlier policy stage (sft, dpo, ...)."
    )


def run(ctx: StageContext[SFTStage]) -> dict[str, Any]:
    from pipeline.train.fit import fit

    trainer, summary = build_trainer(ctx)
    init = ctx.model_of(ctx.cfg.init_from)
    metrics = fit(trainer, ctx, base=init.lineage_base() if init else None)
    metrics.update(train_rows=summary["train_rows"], eval_rows=summary["eval"]["kept"] if summary.get("eval") else 0)
    return keep_checks.record(metrics, keep_checks.sft_warnings(ctx.name, summary), ctx.say)


def build_trainer(ctx: StageContext[SFTStage]):
    from trl import SFTConfig, SFTTrainer

    from pipeline import modeling
    from pipeline.train.args import trl_args
    from pipeline.train.batching import length_grouped

    cfg, recipe = ctx.cfg, ctx.recipe
    init = ctx.model_of(cfg.init_from)
    tokenizer = modeling.load_tokenizer(recipe.model, path=init.path if init else None)
    train_ds, eval_ds, summary = prepare_data(ctx, tokenizer)
    # Args before the model: under DeepSpeed ZeRO-3 they make from_pretrained load sharded (zero3_init).
    args = trl_args(
        SFTConfig,
        ctx,
        max_length=cfg.data.max_length,
        completion_only_loss=True,  # prompt/completion data: loss on the response tokens only
        packable=True,
    )
    model = modeling.load_policy(recipe.model, recipe.lora, init=init)
    trainer = length_grouped(SFTTrainer)(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer
    )
    return trainer, summary


def prepare_data(ctx: StageContext[SFTStage], tokenizer):
    """Validate, render, apply the length policy per source, mix; save and print the data summary."""
    from pipeline.train.fit import to_dataset

    data = ctx.cfg.data
    keep_checks.check_upstream_output(ctx, data.train, "training rows", "best")
    train_mix, eval_source = as_mixture(ctx.resolve_source(data.train)), ctx.resolve_source(data.eval)
    count = token_counter(tokenizer)
    parts, reports, formats = [], [], []
    for source in train_mix.sources:
        examples, fmt = load_sft_examples(source, data.template)
        kept, report = _length_checked(ctx, tokenizer, examples, source.describe(), count)
        parts.append(Part(source.describe(), kept, report.source_counts()))
        reports.append(report)
        formats.append(fmt)
    train, mixture = mix(parts, train_mix, ctx.seed)
    summary: dict[str, Any] = {
        "format": "+".join(dict.fromkeys(formats)),
        "template": data.template,
        "max_length": data.max_length,
        "overlength": data.overlength,
        "train": merge_reports(reports, train).as_dict(),
        "mixture": mixture,
    }
    if eval_source is not None:
        evals, _ = load_sft_examples(eval_source, data.template)
        evals, eval_report = _length_checked(ctx, tokenizer, evals, eval_source.describe(), count)
    else:
        train, evals = holdout_split(train, data.eval_fraction, ctx.seed)
        eval_report = (
            apply_length_policy(evals, count, data.max_length, data.overlength, "held-out rows")[1] if evals else None
        )
    summary["train_rows"] = len(train)
    if eval_report is not None:
        summary["eval"] = eval_report.as_dict()
    if ctx.is_main:
        write_json_atomic(ctx.stage_dir / "data_summary.json", summary)
        ctx.say(format_summary(summary))
    keep_checks.check_training_rows(ctx, data.train, len(train), "training rows", "best")  # before the model loads
    return to_dataset([ex.as_record() for ex in train]), to_dataset([ex.as_record() for ex in evals]), summary


def _length_checked(ctx, tokenizer, examples: list[Example], source: str, count):
    """One source's examples through the chat-template checks and the length policy: (kept, report)."""
    data = ctx.cfg.data
    if data.template == "chat":
        check_conversations(tokenizer, recipe_model_name(ctx), [(examples, source)])
        examples = as_sampling_renders(tokenizer, examples)
    return apply_length_policy(examples, count, data.max_length, data.overlength, source)


def recipe_model_name(ctx) -> str:
    init = ctx.model_of(ctx.cfg.init_from)
    return init.path if init else ctx.recipe.model.name_or_path


def check_conversations(tokenizer, model_name: str, parts) -> None:
    """The tokenizer has a chat template, and every conversation renders with it and keeps its prompt when
    the reply follows (see pipeline.data.chat_fit)."""
    from pipeline.data.chat_fit import check_chat_examples
    from pipeline.modeling.chat import render_chat, require_chat_template

    require_chat_template(tokenizer, model_name)
    for examples, source in parts:
        check_chat_examples(examples, partial(render_chat, tokenizer), source)


def as_sampling_renders(tokenizer, examples: list[Example]) -> list[Example]:
    """Conversations of a template whose generation prompt opens a think block (DeepSeek-R1 distills) as the
    text sampling renders (``pipeline.modeling.chat.sampling_texts``); any other template's unchanged."""
    from pipeline.modeling.chat import sampling_texts

    out = []
    for ex in examples:
        texts = sampling_texts(tokenizer, ex.prompt, ex.completion) if isinstance(ex.prompt, list) else None
        out.append(ex if texts is None else dataclasses.replace(ex, prompt=texts[0], completion=texts[1]))
    return out


def token_counter(tokenizer):
    """(prompt tokens, total tokens incl. EOS) for an example, as the trainer will tokenize it."""
    from pipeline.modeling.chat import chat_ids

    def count(ex: Example) -> tuple[int, int]:
        if isinstance(ex.prompt, list):
            prompt = chat_ids(tokenizer, ex.prompt, add_generation_prompt=True)
            return len(prompt), len(chat_ids(tokenizer, ex.prompt + ex.completion))
        prompt = tokenizer(ex.prompt)["input_ids"]  # as TRL tokenizes text prompts
        full = tokenizer(ex.prompt + ex.completion)["input_ids"]
        ends = bool(tokenizer.eos_token) and ex.completion.endswith(tokenizer.eos_token)
        return len(prompt), len(full) + (0 if ends else 1)  # TRL appends EOS unless the completion ends with it

    return count


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"data: format {summary['format']}, template {summary['template']}, max_length {summary['max_length']} ({summary['overlength']})"
    ]
    for split in ("train", "eval"):
        rep = summary.get(split)
        if not rep:
            continue
        lens = rep["token_lengths"]
        lines.append(
            f"  {split}: {rep['rows']} rows, kept {rep['kept']}, dropped {rep['dropped_overlength'] + rep['dropped_prompt_too_long']}, "
            f"truncated {rep['truncated']}, duplicates {rep['duplicates']}; tokens p50 {lens['p50']:.0f} p90 {lens['p90']:.0f} "
            f"p99 {lens['p99']:.0f} max {lens['max']:.0f}"
        )
    lines += summary_lines(summary.get("mixture", []))
    return "\n".join(lines)


def memory(recipe, name: str, prompt_tokens: int | None = None):
    """plan: batch_size rows of data.max_length tokens."""
    from pipeline.plan.memory import training_setup

    return training_setup(recipe, name)


KIND = register(
    StageKind(
        name="sft",
        config=SFTStage,
        run=run,
        memory=memory,
        data_checks=input_files.sft_rows,
        outputs=("model",),
        key_metrics=("eval_loss_before", "eval_loss", "steps", "train_rows"),
        model_head="causal_lm",
    )
)
