"""SFT: instruction data -> prompt/completion examples -> TRL's SFTTrainer, loss on the response only."""

from __future__ import annotations

import random
from typing import Any

from pipeline import modeling, training
from pipeline.artifacts import write_json_atomic
from pipeline.data.sft import Example, apply_length_policy, load_sft_examples


def run(ctx) -> dict[str, Any]:
    trainer, summary = build_trainer(ctx)
    init = ctx.model_of(ctx.cfg.init_from)
    # a new adapter on an earlier stage's full model belongs to that model; otherwise the recipe's base
    base = init.path if init is not None and init.kind == "full" else (init.base if init is not None else None)
    metrics = training.fit(trainer, ctx, base=base)
    metrics.update(train_rows=summary["train"]["kept"], eval_rows=summary["eval"]["kept"] if summary.get("eval") else 0)
    return metrics


def build_trainer(ctx):
    from trl import SFTConfig, SFTTrainer

    cfg, recipe = ctx.cfg, ctx.recipe
    init = ctx.model_of(cfg.init_from)
    tokenizer = modeling.load_tokenizer(recipe.model, path=init.path if init else None)
    train_ds, eval_ds, summary = prepare_data(ctx, tokenizer)
    # Args before the model: under DeepSpeed ZeRO-3 they make from_pretrained load sharded (zero3_init).
    args = training.trl_args(
        SFTConfig,
        ctx,
        max_length=cfg.data.max_length,
        completion_only_loss=True,  # prompt/completion data: loss on the response tokens only
        packing=False,  # padding-free packing is slow on CPU SDPA (STACK_NOTES); opt in via trainer_extra
    )
    model = modeling.load_policy(recipe.model, recipe.lora, init=init)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer)
    return trainer, summary


def prepare_data(ctx, tokenizer):
    """Validate, render, apply the length policy; save and print the data summary."""
    import datasets

    data = ctx.cfg.data
    train_source, eval_source = ctx.resolve_source(data.train), ctx.resolve_source(data.eval)
    train, fmt = load_sft_examples(train_source, data.template)
    evals: list[Example] = []
    if eval_source is not None:
        evals, _ = load_sft_examples(eval_source, data.template)
    elif data.eval_fraction > 0:
        rng = random.Random(ctx.seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        n_eval = max(1, int(len(train) * data.eval_fraction))
        held = set(order[:n_eval])
        evals = [ex for i, ex in enumerate(train) if i in held]
        train = [ex for i, ex in enumerate(train) if i not in held]

    count = token_counter(tokenizer, data.template)
    train, train_report = apply_length_policy(train, count, data.max_length, data.overlength, train_source.describe())
    summary: dict[str, Any] = {"format": fmt, "template": data.template, "max_length": data.max_length,
                               "overlength": data.overlength, "train": train_report.as_dict()}
    if evals:
        source = eval_source.describe() if eval_source else f"{train_source.describe()} (held-out fraction)"
        evals, eval_report = apply_length_policy(evals, count, data.max_length, data.overlength, source)
        summary["eval"] = eval_report.as_dict()
    if ctx.is_main:
        write_json_atomic(ctx.stage_dir / "data_summary.json", summary)
        ctx.say(format_summary(summary))
    to_ds = lambda exs: datasets.Dataset.from_list([ex.as_record() for ex in exs])  # noqa: E731
    return to_ds(train), (to_ds(evals) if evals else None), summary


def token_counter(tokenizer, template: str):
    """(prompt tokens, total tokens incl. EOS) for an example, as the trainer will tokenize it."""

    def count(ex: Example) -> tuple[int, int]:
        if template == "chat":
            prompt = tokenizer.apply_chat_template(ex.prompt, tokenize=True, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(ex.prompt + ex.completion, tokenize=True)
            prompt, full = _ids(prompt), _ids(full)
            return len(prompt), len(full)
        prompt = tokenizer(ex.prompt)["input_ids"]  # as TRL tokenizes text prompts
        full = tokenizer(ex.prompt + ex.completion)["input_ids"]
        return len(prompt), len(full) + 1

    return count


def _ids(out) -> list[int]:
    return out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"data: format {summary['format']}, template {summary['template']}, max_length {summary['max_length']} ({summary['overlength']})"]
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
    return "\n".join(lines)
