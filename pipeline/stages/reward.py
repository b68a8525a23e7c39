"""Reward model: preference pairs -> TRL's RewardTrainer on a one-output sequence classifier.

Then a held-out evaluation (pairwise accuracy, margin, length bias), the preference benchmarks (RewardBench's
layout: accuracy per subset and overall) and the quality gate: below ``min_accuracy`` (on the held-out pairs or
a benchmark) the stage fails with the reason, so no downstream stage trusts a weak reward model. The trained model
is kept either way.
"""

from __future__ import annotations

import re
import statistics
from functools import partial
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator

from pipeline import compat
from pipeline.config import DataSource, PairsStageConfig, TrainConfig, source_list
from pipeline.config.registry import POLICY, StageKind, register
from pipeline.data.preference.benchmarks import Benchmark, accuracy_by_subset, load_benchmark
from pipeline.data.preference.prepare import prepare_pairs, summary_line
from pipeline.observe import plots
from pipeline.run.context import StageContext
from pipeline.stages import input_files, keep_checks
from pipeline.util.errors import GateFailed
from pipeline.util.files import write_json_atomic
from pipeline.util.text import suggest

HELD_OUT = "held_out"  # the min_accuracy key of the held-out pairs
# A benchmark's name is a key of min_accuracy, of the metrics and of --set paths: no dots, no slashes.
_BENCHMARK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _benchmark_name(name: str) -> str:
    if not _BENCHMARK_NAME.match(name):
        raise ValueError("a benchmark name is letters, digits, '_' and '-' (it becomes a key of the metrics)")
    if name == HELD_OUT:
        raise ValueError(f"{HELD_OUT!r} is the held-out pairs' key in min_accuracy; name the benchmark otherwise")
    return name


def _path_shorthand(value: Any) -> Any:
    """``name: path/to/file.jsonl`` is ``name: {path: path/to/file.jsonl}``."""
    return {"path": value} if isinstance(value, str) else value


def _benchmark_source(source: DataSource) -> DataSource:
    """A benchmark is a file or a Hub dataset, read whole, in the explicit pair layout."""
    if source.from_stage is not None:
        raise ValueError("a benchmark is a file ('path') or a Hub dataset ('hub'), not a stage's output")
    if source.format not in ("auto", "explicit"):
        raise ValueError(f"format {source.format!r}: a benchmark's rows are prompt / chosen / rejected (explicit)")
    mixing = [k for k in ("weight", "rows", "fraction") if getattr(source, k) is not None]
    if mixing:
        raise ValueError(f"{' / '.join(mixing)} size a training mixture; a benchmark is scored whole (use limit)")
    return source


BenchmarkName = Annotated[str, AfterValidator(_benchmark_name)]
BenchmarkSource = Annotated[DataSource, BeforeValidator(_path_shorthand), AfterValidator(_benchmark_source)]


class RewardStage(PairsStageConfig):
    """A reward model: a sequence classifier with one output, trained on preference pairs (TRL RewardTrainer)."""

    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"base_from": (POLICY,), **PairsStageConfig.PAIR_SOURCES}

    kind: Literal["reward"] = "reward"
    base_from: str | None = Field(
        None, description="Start from an sft stage's model (default: the recipe's base model)."
    )
    train: TrainConfig = TrainConfig()
    benchmarks: dict[BenchmarkName, BenchmarkSource] = Field(
        {},
        description="Preference benchmarks scored after training, name -> a file path (relative to the recipe "
        "file) or a source {path | hub, split, columns, limit}: rows of prompt, chosen, rejected, subset (RewardBench's "
        "layout). Accuracy per subset and overall goes to the metrics, the report and the trackers.",
        # left out of dumps when empty: the stage hashes of runs finished before the key existed stay cached
        exclude_if=lambda value: not value,
    )
    min_accuracy: float | dict[str, float] | None = Field(
        None,
        description="Quality gate: a number gates the held-out pairwise accuracy; a mapping gates each key it "
        "names, 'held_out' or a benchmark name, e.g. {held_out: 0.9, my_bench: 0.7}.",
    )

    @field_validator("min_accuracy", mode="before")
    @classmethod
    def _gate_shape(cls, value: Any) -> Any:
        def number(v: Any) -> bool:  # a quoted number, as pydantic reads one, still counts
            if isinstance(v, str):
                try:
                    float(v)
                except ValueError:
                    return False
                return True
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if value is None or number(value):
            return value
        if isinstance(value, dict) and all(isinstance(k, str) and number(v) for k, v in value.items()):
            return value
        raise ValueError(
            "give a number (gates the held-out pairs) or a mapping of 'held_out' / a benchmark name to a number, "
            "e.g. {held_out: 0.9, my_bench: 0.7}"
        )

    @field_validator("min_accuracy")
    @classmethod
    def _gate_keys(cls, value: Any, info: ValidationInfo) -> Any:
        for key, threshold in gates(value).items():
            if not 0 <= threshold <= 1:
                where = f" (key {key!r})" if isinstance(value, dict) else ""
                raise ValueError(f"{threshold}{where} is not an accuracy: give a number between 0 and 1")
        if "benchmarks" not in info.data:  # the benchmarks themselves failed: reported there
            return value
        known = [HELD_OUT, *info.data["benchmarks"]]
        for key in gates(value):
            if key not in known:
                raise ValueError(
                    f"key {key!r} names no benchmark{suggest(key, known)}; a key is {HELD_OUT!r} (the held-out pairs) "
                    f"or a name under benchmarks ({', '.join(known[1:]) or 'none given'})"
                )
        return value


def gates(min_accuracy: float | dict[str, float] | None) -> dict[str, float]:
    """What ``min_accuracy`` gates: key ('held_out' or a benchmark name) -> the least accuracy it must reach."""
    if min_accuracy is None:
        return {}
    return dict(min_accuracy) if isinstance(min_accuracy, dict) else {HELD_OUT: min_accuracy}


def gate_label(min_accuracy: float | dict[str, float] | None, key: str) -> str:
    """How a message names a gate: the recipe key it was given at."""
    return f"min_accuracy.{key}" if isinstance(min_accuracy, dict) else "min_accuracy"


def run(ctx: StageContext[RewardStage]) -> dict[str, Any]:
    from pipeline.train.fit import fit

    benchmarks = load_benchmarks(ctx)  # before training: a bad benchmark file fails in seconds, not after it
    trainer, tokenizer, held, base, summary = build_trainer(ctx)
    metrics = fit(trainer, ctx, base=base)
    warnings = keep_checks.pair_warnings(ctx.name, summary)
    if held or benchmarks:
        from pipeline.rollout.scoring import RewardModelScorer

        scorer = RewardModelScorer(trainer.model, tokenizer, "reward model", max_length=ctx.cfg.data.max_length)
        if held:
            metrics.update(evaluate_pairs(scorer, tokenizer, held, ctx))
        if benchmarks:
            metrics["benchmarks"] = {b.name: score_benchmark(scorer, b) for b in benchmarks}
            warnings += truncation_warnings(ctx.name, metrics["benchmarks"], ctx.cfg.data.max_length)
    keep_checks.record(metrics, warnings, ctx.say)
    check_gate(ctx.cfg.min_accuracy, metrics)  # after the model is saved: a failed gate keeps it and the metrics
    return metrics


def build_trainer(ctx: StageContext[RewardStage]):
    """(RewardTrainer, tokenizer, held-out pairs, the base a new adapter belongs to, data summary)."""
    from trl import RewardConfig, RewardTrainer

    from pipeline import modeling
    from pipeline.train.args import trl_args
    from pipeline.train.batching import length_grouped
    from pipeline.train.fit import to_dataset

    cfg, recipe = ctx.cfg, ctx.recipe
    init = ctx.model_of(cfg.base_from)
    tokenizer = modeling.load_tokenizer(recipe.model, path=init.path if init else None)
    keep_checks.check_upstream_output(ctx, cfg.data.train, "preference pairs", "pairs")
    train, held, summary = prepare_pairs(
        ctx.resolve_source(cfg.data.train, "pairs"),
        ctx.resolve_source(cfg.data.eval, "pairs"),
        cfg.data,
        count_tokens=partial(modeling.token_length, tokenizer),
        seed=ctx.seed,
    )
    if ctx.is_main:
        write_json_atomic(ctx.stage_dir / "data_summary.json", summary)
        ctx.say(summary_line(ctx.name, summary))
    keep_checks.check_training_rows(
        ctx, cfg.data.train, len(train), "preference pairs", "pairs"
    )  # before the model loads
    quantized = recipe.model.quantization != "none"
    args = trl_args(
        RewardConfig,
        ctx,
        max_length=cfg.data.max_length,
        precision=compat.KBIT_REWARD_PRECISION if quantized else None,
    )
    model, base = modeling.load_reward_model(recipe.model, recipe.lora, init=init, work_dir=ctx.stage_dir)
    trainer = length_grouped(RewardTrainer)(
        model=model,
        args=args,
        train_dataset=to_dataset(train),
        eval_dataset=to_dataset(held),
        processing_class=tokenizer,
    )
    return trainer, tokenizer, held, base, summary


def check_gate(min_accuracy: float | dict[str, float] | None, metrics: dict[str, Any]) -> None:
    """The quality gate: an accuracy below its ``min_accuracy`` fails the stage, so no downstream stage trusts the
    model. Every gate is checked and every failure named in one message."""
    failures = []
    for key, threshold in gates(min_accuracy).items():
        label = gate_label(min_accuracy, key)
        if key == HELD_OUT:
            found = _held_out_gate(label, threshold, metrics)
        else:
            found = _benchmark_gate(key, label, threshold, (metrics.get("benchmarks") or {}).get(key))
        failures += [found] if found else []
    if failures:
        raise GateFailed(
            "quality gate: "
            + "; ".join(failures)
            + "; downstream stages would trust a weak reward model. The trained model and these metrics are kept. "
            "Check the pairs (data_summary.json), train longer, or lower min_accuracy deliberately.",
            metrics,
        )


def _held_out_gate(label: str, threshold: float, metrics: dict[str, Any]) -> str | None:
    accuracy = metrics.get("heldout_accuracy")
    if accuracy is None:
        return f"{label} is set but there are no held-out pairs to measure it (set data.eval or data.eval_fraction)"
    if accuracy < threshold:
        return (
            f"held-out pairwise accuracy {accuracy:.3f} is below {label} {threshold} ({metrics['heldout_pairs']} pairs)"
        )
    return None


def _benchmark_gate(name: str, label: str, threshold: float, result: dict[str, Any] | None) -> str | None:
    if result is None:
        return f"{label} is set but benchmark {name!r} was not scored"
    if result["accuracy"] >= threshold:
        return None
    subsets = ", ".join(f"{subset} {r['accuracy']:.3f}" for subset, r in result["subsets"].items())
    return (
        f"benchmark {name!r} accuracy {result['accuracy']:.3f} is below {label} {threshold} "
        f"({result['pairs']} pairs; by subset: {subsets})"
    )


def benchmark_template(recipe, cfg: RewardStage) -> str:
    """How benchmark prompts are rendered: as this stage's training prompts were. Its ``data.template``; with
    none, pairs from a best-of-n stage carry that stage's policy template; local pairs are used as written."""
    if cfg.data.template != "none":
        return cfg.data.template
    for source in source_list(cfg.data.train):
        if source.from_stage is not None:
            upstream = recipe.stages.get(source.from_stage)
            return getattr(upstream, "template", None) or recipe.policy_template(source.from_stage)
    return "none"


def load_benchmarks(ctx: StageContext[RewardStage]) -> list[Benchmark]:
    template = benchmark_template(ctx.recipe, ctx.cfg)
    return [
        load_benchmark(name, source, template, f"stages.{ctx.name}.benchmarks.{name}")
        for name, source in ctx.cfg.benchmarks.items()
    ]


def score_pairs(scorer, pairs: list[dict]) -> tuple[list[float], list[float]]:
    """The reward of each pair's chosen and rejected response (TRL records: rendered prompt, chosen, rejected)."""
    chosen = scorer.score([{"prompt": p["prompt"], "response": response_text(p["chosen"])} for p in pairs])
    rejected = scorer.score([{"prompt": p["prompt"], "response": response_text(p["rejected"])} for p in pairs])
    return chosen, rejected


def response_text(side: Any) -> str:
    """A response: text, or the assistant message(s) of a conversational pair."""
    return side if isinstance(side, str) else " ".join(m["content"] for m in side)


def score_benchmark(scorer, benchmark: Benchmark) -> dict[str, Any]:
    """Accuracy (chosen scored strictly above rejected) over all pairs and per subset, the mean margin, and how
    many pairs were cut at the scorer's max_length."""
    chosen, rejected = score_pairs(scorer, benchmark.records)
    result = {"source": benchmark.source}
    result.update(accuracy_by_subset(benchmark.subsets, [c > r for c, r in zip(chosen, rejected)]))
    result["margin_mean"] = round(statistics.fmean(c - r for c, r in zip(chosen, rejected)), 4)
    result["truncated"] = count_cut(scorer, benchmark.records)
    return result


def count_cut(scorer, records: list[dict]) -> int:
    """Pairs with a side longer than the scorer's max_length: scored on their first tokens only."""
    if not scorer.max_length:
        return 0
    whole = type(scorer)(scorer.model, scorer.tokenizer, scorer.name)  # the same encoding, never truncated
    return sum(
        any(
            len(whole.encode(r["prompt"], response_text(side))) > scorer.max_length
            for side in (r["chosen"], r["rejected"])
        )
        for r in records
    )


def truncation_warnings(stage: str, results: dict[str, dict[str, Any]], max_length: int) -> list[str]:
    return [
        f"[{stage}] benchmark {name!r}: {r['truncated']} of {r['pairs']} pairs are longer than data.max_length="
        f"{max_length} tokens and were scored on their first {max_length} (a pair cut inside its prompt ties, and "
        "a tie counts as wrong); raise data.max_length to score them whole"
        for name, r in results.items()
        if r["truncated"]
    ]


def evaluate_pairs(scorer, tokenizer, pairs: list[dict], ctx: StageContext[RewardStage]) -> dict[str, Any]:
    """Held-out pairwise accuracy, margin, and length bias; writes rewards.jsonl-style stats and a histogram."""
    chosen, rejected = score_pairs(scorer, pairs)
    from pipeline.modeling import token_length

    lengths_c = [token_length(tokenizer, response_text(p["chosen"])) for p in pairs]
    lengths_r = [token_length(tokenizer, response_text(p["rejected"])) for p in pairs]
    wins = [c > r for c, r in zip(chosen, rejected)]

    def accuracy(mask: list[bool]) -> float | None:
        picked = [w for w, m in zip(wins, mask) if m]
        return round(sum(picked) / len(picked), 4) if picked else None

    metrics = {
        "heldout_pairs": len(pairs),
        "heldout_accuracy": round(sum(wins) / len(wins), 4),
        "heldout_margin_mean": round(statistics.fmean(c - r for c, r in zip(chosen, rejected)), 4),
        "heldout_reward_chosen_mean": round(statistics.fmean(chosen), 4),
        "heldout_reward_rejected_mean": round(statistics.fmean(rejected), 4),
        # length bias: a reward that tracks length, or accuracy that depends on which side is longer
        "reward_length_correlation": _correlation(chosen + rejected, lengths_c + lengths_r),
        "accuracy_chosen_longer": accuracy([lc > lr for lc, lr in zip(lengths_c, lengths_r)]),
        "accuracy_chosen_shorter": accuracy([lc < lr for lc, lr in zip(lengths_c, lengths_r)]),
        "chosen_longer_fraction": round(sum(lc > lr for lc, lr in zip(lengths_c, lengths_r)) / len(pairs), 4),
    }
    if ctx.is_main:
        path = plots.histogram(
            ctx.stage_dir / "reward_histogram.png",
            {"chosen": chosen, "rejected": rejected},
            f"{ctx.name}: held-out rewards (accuracy {metrics['heldout_accuracy']:.3f})",
            "reward",
        )
        ctx.outputs["reward_histogram"] = str(path)
    return metrics


def _correlation(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or len(set(ys)) < 2 or len(set(xs)) < 2:
        return None
    return round(statistics.correlation(xs, ys), 4)


def memory(recipe, name: str, prompt_tokens: int | None = None):
    """plan: the chosen and rejected response of batch_size pairs, through the one-output reward head."""
    from pipeline.plan.memory import training_setup

    return training_setup(recipe, name, pairs=True)


def data_checks(recipe, name: str) -> list:
    """validate: the stage's local preference pairs, and each local benchmark file read and checked as run reads it."""
    cfg = recipe.stages[name]
    template = benchmark_template(recipe, cfg)
    benchmarks = [
        lambda n=n, s=s: load_benchmark(n, s, template, f"benchmarks.{n}")
        for n, s in cfg.benchmarks.items()
        if s.path is not None
    ]
    return input_files.pairs(recipe, name) + benchmarks


def tables(metrics: dict[str, Any], detailed: bool) -> dict[str, tuple[str, list[list[str]]]]:
    """The benchmarks' accuracy, overall and per subset, beside the held-out pairs' (report, console, trackers)."""
    results = metrics.get("benchmarks")
    if not isinstance(results, dict) or not results:
        return {}
    rows = [["benchmark", "subset", "pairs", "accuracy"]]
    if isinstance(metrics.get("heldout_accuracy"), (int, float)):
        rows.append([HELD_OUT, "all", str(metrics.get("heldout_pairs", "-")), f"{metrics['heldout_accuracy']:.3f}"])
    for name, result in results.items():
        rows.append([name, "all", str(result["pairs"]), f"{result['accuracy']:.3f}"])
        if list(result["subsets"]) != ["all"]:
            rows += [[name, s, str(r["pairs"]), f"{r['accuracy']:.3f}"] for s, r in result["subsets"].items()]
    title = "reward model on preference benchmarks (accuracy: chosen scored above rejected)"
    return {"benchmarks": (title, rows)}


KIND = register(
    StageKind(
        name="reward",
        config=RewardStage,
        run=run,
        memory=memory,
        data_checks=data_checks,
        tables=tables,
        outputs=("model", "reward_histogram"),
        key_metrics=("heldout_accuracy", "heldout_margin_mean", "reward_length_correlation", "steps"),
        model_head="reward",
        plots={"reward_histogram": "{name}: chosen vs rejected rewards"},
    )
)
