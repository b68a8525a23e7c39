"""Typed recipes: one YAML describes a whole pipeline.

Everything a run needs is checked here, before anything heavy is imported: unknown keys are refused
with their full path and the closest valid name, wrong values name the key and what is allowed, and
cross-field rules (4-bit needs LoRA; ``*_from`` names an earlier stage of the right kind) hold.
This module must stay importable without torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SerializeAsAny,
    Tag,
    field_validator,
    model_validator,
)

from pipeline.config.registry import PAIRS
from pipeline.util.errors import RecipeError
from pipeline.util.text import suggest

BUILTIN_TINY_MODEL = "builtin:tiny-llama"


class Strict(BaseModel):
    """Refuses unknown keys; values are checked as they are given."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------
# Model, LoRA, quantization, tracking
# --------------------------------------------------------------------------------------------


class QuantConfig(Strict):
    """bitsandbytes settings; used only when ``model.quantization`` is 4bit or 8bit."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    # None: bfloat16 on a GPU that supports it, float32 otherwise.
    compute_dtype: Literal["bfloat16", "float16", "float32"] | None = None


class ModelConfig(Strict):
    name_or_path: str = Field(
        BUILTIN_TINY_MODEL,
        description="Hub id, local directory, or 'builtin:tiny-llama' (built locally, offline).",
    )
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    quant: QuantConfig = QuantConfig()
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3"] | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False

    @field_validator("name_or_path")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a Hub model id, a local directory, or 'builtin:tiny-llama'")
        return value

    @field_validator("name_or_path")
    @classmethod
    def _known_builtin(cls, value: str) -> str:
        from pipeline.builtin.replicas import builtin_names  # torch-free

        known = [BUILTIN_TINY_MODEL, *builtin_names()]
        if value.startswith("builtin:") and value not in known:
            raise ValueError(f"unknown built-in model {value!r}; the built-ins are: {', '.join(known)}")
        return value


class LoraConfig(Strict):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear": every linear layer except the output head (peft's shorthand).
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    modules_to_save: list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one module name, or 'all-linear'")
        return value


class WandbConfig(Strict):
    project: str | None = Field(None, description="Defaults to the recipe name.")
    entity: str | None = None
    tags: list[str] = []
    # auto: online when an API key is configured, offline otherwise.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"


class TrackingConfig(Strict):
    report_to: list[Literal["none", "wandb", "tensorboard"]] = ["none"]
    wandb: WandbConfig = WandbConfig()

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _none_alone(self) -> TrackingConfig:
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError("report_to: 'none' cannot be combined with other trackers")
        return self


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

SFT_FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion")


class DataSource(Strict):
    """Where rows come from: a local file (json, jsonl, csv, parquet) or a Hub dataset."""

    path: str | None = Field(None, description="Local file; relative paths are relative to the recipe file.")
    hub: str | None = Field(None, description="Hugging Face dataset id (needs network access).")
    from_stage: str | None = Field(None, description="An earlier stage's output, e.g. the best-of-n stage's 'best'.")
    output: str | None = Field(None, description="Which output of from_stage: best (default) or pairs.")
    subset: str | None = Field(None, description="Hub dataset configuration name (load_dataset's 'name').")
    data_dir: str | None = Field(
        None, description="Hub datasets: a folder of the dataset repo, e.g. helpful-base of Anthropic/hh-rlhf."
    )
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="Hub datasets: files (globs) of the dataset repo to read; a mapping names their splits."
    )
    split: str = Field("train", description="Any split name (train_prefs, test_sft) or slice (train[:1000]).")
    format: Literal[
        "auto",
        "alpaca",
        "messages",
        "sharegpt",
        "prompt_completion",
        "prompts",  # instruction data and prompts
        "explicit",
        "conversational",
        "implicit",
        "ranked",  # preference data
    ] = "auto"
    # canonical name -> column name in the file, e.g. {instruction: question, output: answer}
    columns: dict[str, str] = {}
    limit: int | None = Field(None, gt=0, description="Read only the first N rows.")
    # In a mixture (a list of sources), how much of this source the mix takes; see Mixture.
    weight: float | None = Field(None, gt=0, description="Mixtures: this source's share of the mix's rows.")
    rows: int | None = Field(None, gt=0, description="Mixtures: take this many rows (repeated if it has fewer).")
    fraction: float | None = Field(None, gt=0, description="Mixtures: take this fraction of its rows (2.0: twice).")

    @model_validator(mode="after")
    def _one_amount(self) -> DataSource:
        given = [k for k in ("weight", "rows", "fraction") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(
                f"give one of {' / '.join(given)}: weight is a share of the mix, rows and fraction fixed amounts"
            )
        return self

    @model_validator(mode="after")
    def _exactly_one_origin(self) -> DataSource:
        if sum(x is not None for x in (self.path, self.hub, self.from_stage)) != 1:
            raise ValueError(
                "give exactly one of 'path' (a local file), 'hub' (a dataset id) or 'from_stage' (an earlier stage)"
            )
        if (self.data_dir is not None or self.data_files is not None) and self.hub is None:
            raise ValueError("'data_dir' and 'data_files' select files of a Hub dataset; they need 'hub'")
        if self.output is not None and self.from_stage is None:
            raise ValueError("'output' only applies with 'from_stage'")
        if self.output is not None and self.output not in ("best", "pairs"):
            raise ValueError(f"output {self.output!r}: a best-of-n stage writes 'best' and 'pairs'")
        if self.path is not None and Path(self.path).suffix.lower() not in (".json", ".jsonl", ".csv", ".parquet"):
            raise ValueError(f"path {self.path!r}: unsupported file type; use .json, .jsonl, .csv or .parquet")
        return self

    def describe(self) -> str:
        if self.from_stage is not None:
            return f"stage:{self.from_stage}/{self.output or 'best'}"
        if self.path is not None:
            return self.path
        where = "/".join(x for x in (self.subset, self.data_dir) if x)
        return f"hub:{self.hub}" + (f"/{where}" if where else "") + f"[{self.split}]"


class Mixture(Strict):
    """Several sources mixed into one dataset (written in a recipe as a list of sources, or as
    ``{rows: N, sources: [...]}``). Either every source has a ``weight`` -- its share of the mix, whose size is
    ``rows`` (default: the largest mix the weights allow without repeating a row) -- or none has, and each
    source gives ``rows``, ``fraction`` or nothing (all its rows). Rows are drawn at random under the seed,
    after each source's own checks, so the shares hold for the rows that are trained on."""

    sources: list[DataSource] = Field(min_length=1)
    rows: int | None = Field(None, gt=0, description="Total rows of a weighted mix.")

    @model_validator(mode="after")
    def _weights_all_or_none(self) -> Mixture:
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            missing = ", ".join(f"sources[{i}]" for i, w in enumerate(weighted) if not w)
            raise ValueError(
                f"{missing} has no weight while others do: give every source a weight (its share of the mix), "
                "or none (each then takes rows / fraction / all of its rows)"
            )
        if self.rows is not None and not all(weighted):
            raise ValueError("'rows' is the size of a weighted mix; give each source a weight, or drop 'rows'")
        return self

    @property
    def weighted(self) -> bool:
        return self.sources[0].weight is not None


def _list_is_mixture(value: Any) -> Any:
    return {"sources": value} if isinstance(value, (list, tuple)) else value


# The union's branch tags; error locations leave them out (pipeline.config.loader).
SOURCE_TAGS = ("one-source", "mixture-of-sources")


def _source_or_mixture(value: Any) -> str:
    return SOURCE_TAGS[isinstance(value, Mixture) or (isinstance(value, dict) and "sources" in value)]


# One source, or several mixed (a list of sources, or {rows: N, sources: [...]}).
Sources = Annotated[
    Annotated[DataSource, Tag(SOURCE_TAGS[0])] | Annotated[Mixture, Tag(SOURCE_TAGS[1])],
    Discriminator(_source_or_mixture),
    BeforeValidator(_list_is_mixture),
]


def as_mixture(value: DataSource | Mixture) -> Mixture:
    return value if isinstance(value, Mixture) else Mixture(sources=[value])


def source_list(value: DataSource | Mixture | None) -> list[DataSource]:
    return [] if value is None else as_mixture(value).sources


class SFTDataConfig(Strict):
    train: Sources
    eval: DataSource | None = None
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Held out from train when no eval source.")
    template: Literal["alpaca", "chat"] = "alpaca"
    max_length: int = Field(512, gt=8)
    overlength: Literal["truncate", "drop", "error"] = "truncate"


class PreferenceDataConfig(Strict):
    """Preference pairs: explicit prompt/chosen/rejected, conversational, implicit (HH transcripts),
    ranked lists, or a best-of-n stage's pairs (``from_stage``)."""

    train: Sources
    eval: DataSource | None = None
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Held out from train when no eval source.")
    # none: prompts are used as written (best-of-n pairs are already rendered with the SFT template);
    # alpaca / chat: plain-text prompts are instructions, rendered like SFT prompts.
    template: Literal["none", "alpaca", "chat"] = "none"
    max_length: int = Field(512, gt=8)
    ranked_strategy: Literal["best_vs_worst", "best_vs_each", "all_pairs"] = "best_vs_worst"
    on_bad_row: Literal["error", "drop"] = "error"
    lint: Literal["drop", "error"] = Field(
        "drop", description="Identical, empty or over-long pairs: drop (counted) or error."
    )


# --------------------------------------------------------------------------------------------
# Training settings shared by the training stages
# --------------------------------------------------------------------------------------------


class TrainConfig(Strict):
    learning_rate: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Overrides epochs when set.")
    batch_size: int = Field(8, gt=0, description="Per device.")
    gradient_accumulation_steps: int = Field(1, gt=0)
    warmup: float = Field(0.0, ge=0, description="Fraction of training (< 1) or a number of steps.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optim: str = "adamw_torch"
    # auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="None: evaluate before and after training only.")
    save_steps: int = Field(200, gt=0, description="Checkpoint interval; a killed run resumes from the last one.")
    save_total_limit: int = Field(2, gt=0)
    eval_batch_size: int | None = Field(None, gt=0)
    batching: Literal["auto", "padded", "grouped", "packed"] = Field(
        "auto",
        description="How rows form batches. padded: random batches, padded to their longest row. grouped: rows of "
        "similar length batched together (sorted within large random buckets; every row once per epoch). packed: "
        "SFT rows packed into max_length sequences with no padding (position_ids keep attention within each row; "
        "batch_size then counts max_length blocks). auto: packed for SFT on a GPU, grouped otherwise (packing is "
        "slower on CPU).",
    )
    # Escape hatch: extra fields of the TRL config class, checked against it at run time.
    trainer_extra: dict[str, Any] = {}


# --------------------------------------------------------------------------------------------
# Stages: the base every stage kind's config extends (the kinds live in pipeline/stages/<kind>.py)
# --------------------------------------------------------------------------------------------


class StageConfig(Strict):
    """Base of all stage configs. ``kind`` says what the stage is; its name is free."""

    # field path -> what that field may point at: capabilities (registry.POLICY, REWARD_MODEL, PAIRS) or kinds
    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {}

    kind: str
    seed: int | None = Field(None, description="Overrides the recipe seed for this stage.")

    def upstream(self) -> dict[str, str]:
        """field path (dotted) -> the stage it takes output from."""
        found = {}
        for path in self.FROM_FIELDS:
            targets = _follow(self, path.split("."))
            if len(targets) > 1:
                found.update({f"{path}[{i}]": target for i, target in enumerate(targets)})
            elif targets:
                found[path] = targets[0]
        return found


def _follow(node: Any, parts: list[str]) -> list[str]:
    """The stage names at ``parts`` under ``node``; a mixture contributes each of its sources'."""
    if isinstance(node, Mixture):
        return [t for source in node.sources for t in _follow(source, parts)]
    if not parts:
        return [t for t in (node if isinstance(node, list) else [node]) if t]
    return _follow(getattr(node, parts[0], None), parts[1:])


class PairsStageConfig(StageConfig):
    """A stage that trains on preference pairs. ``pairs_from: <bon stage>`` is shorthand for
    data.train = that stage's pairs."""

    # the FROM_FIELDS entries every pair-training stage shares
    PAIR_SOURCES: ClassVar[dict[str, tuple[str, ...]]] = {
        "pairs_from": (PAIRS,),
        "data.train.from_stage": (PAIRS,),
        "data.eval.from_stage": (PAIRS,),
    }

    pairs_from: str | None = Field(None, description="A stage that writes preference pairs (best-of-n) to train on.")
    data: PreferenceDataConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _pairs_from(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("pairs_from"):
            data = dict(values.get("data") or {})
            train = data.get("train")
            # a resolved recipe carries both; anything else is a contradiction
            if train is not None and not (isinstance(train, dict) and train.get("from_stage") == values["pairs_from"]):
                raise ValueError("give either 'pairs_from' or 'data.train', not both")
            data["train"] = {"from_stage": values["pairs_from"], "output": "pairs"}
            values = {**values, "data": data}
        return values

    @model_validator(mode="after")
    def _has_data(self) -> PairsStageConfig:
        if self.data is None:
            raise ValueError("needs preference pairs: 'pairs_from: <bon stage>' or a 'data:' block")
        return self


_FUNCTION_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def function_ref(ref: str) -> str:
    """Validates a ``module:function`` reference (checkers, reward functions)."""
    if not _FUNCTION_REF.match(ref):
        raise ValueError(
            f"{ref!r} is not module:function, e.g. 'pipeline.builtin.tasks:preferred' or 'mychecks:is_correct'"
        )
    return ref


def function_refs(refs: dict[str, str]) -> dict[str, str]:
    for ref in refs.values():
        function_ref(ref)
    return refs


# --------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------


class Recipe(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    output_dir: str | None = Field(None, description="Default: runs/<name>, relative to the working directory.")
    model: ModelConfig = ModelConfig()
    lora: LoraConfig | None = None
    tracking: TrackingConfig = TrackingConfig()
    launch: str | None = Field(None, description="accelerate config file used by 'pipeline run'.")
    plugins: list[str] = Field(
        [], description="Modules to import before the stages are read: they register stage kinds of their own."
    )
    stages: dict[str, SerializeAsAny[StageConfig]]
    # Where the recipe came from; not part of the YAML.
    source_path: str | None = Field(None, exclude=True)

    def stage(self, name: str) -> StageConfig:
        if name not in self.stages:
            raise RecipeError(
                f"recipe {self.name!r} has no stage {name!r}{suggest(name, self.stages)}; "
                f"stages: {', '.join(self.stages)}"
            )
        return self.stages[name]

    def policy_template(self, stage: str) -> str:
        """The prompt template the policy of ``stage`` was trained with: its own ``data.template``, else that of the
        stage it starts from (``init_from`` / ``policy_from``), back to an SFT stage."""
        seen: set[str] = set()
        name: str | None = stage
        while name and name in self.stages and name not in seen:
            seen.add(name)
            cfg = self.stages[name]
            template = getattr(getattr(cfg, "data", None), "template", None)
            if template and template != "none":
                return template
            name = getattr(cfg, "init_from", None) or getattr(cfg, "policy_from", None)
        return "alpaca"

    def resolved_dict(self) -> dict[str, Any]:
        """The recipe as it will run: defaults filled in, paths absolute. Saved beside every output."""
        return self.model_dump(mode="json", exclude={"source_path"})

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.resolved_dict(), sort_keys=False, allow_unicode=True)

    def output_path(self, override: str | None = None) -> Path:
        return Path(override or self.output_dir or f"runs/{self.name}").resolve()


# --------------------------------------------------------------------------------------------
# Walking a recipe's data sources (one walker for path checks, path resolution and fingerprints)
# --------------------------------------------------------------------------------------------


def iter_sources(node: Any, where: str = "") -> Iterator[tuple[str, DataSource]]:
    """Every DataSource under ``node`` (a config, dict or list), with its key path."""
    if isinstance(node, DataSource):
        yield where, node
    elif isinstance(node, BaseModel):
        for field in type(node).model_fields:
            yield from iter_sources(getattr(node, field), f"{where}.{field}" if where else field)
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from iter_sources(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from iter_sources(value, f"{where}[{i}]")


def map_sources(node: Any, fn: Callable[[DataSource], DataSource]) -> Any:
    """``node`` with every DataSource replaced by ``fn(source)``; unchanged parts are kept as they are."""
    if isinstance(node, DataSource):
        return fn(node)
    if isinstance(node, BaseModel):
        updates = {}
        for field in type(node).model_fields:
            value = getattr(node, field)
            new = map_sources(value, fn)
            if new is not value:
                updates[field] = new
        return node.model_copy(update=updates) if updates else node
    if isinstance(node, dict):
        new_dict = {k: map_sources(v, fn) for k, v in node.items()}
        return new_dict if any(new_dict[k] is not node[k] for k in node) else node
    if isinstance(node, (list, tuple)):
        new_list = [map_sources(v, fn) for v in node]
        return type(node)(new_list) if any(a is not b for a, b in zip(new_list, node)) else node
    return node
