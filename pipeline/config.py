"""Typed recipes: one YAML describes a whole pipeline.

Everything a run needs is checked here, before anything heavy is imported: unknown keys are refused
with their full path and the closest valid name, wrong values name the key and what is allowed, and
cross-field rules (4-bit needs LoRA; ``*_from`` names an earlier stage of the right kind) hold.
This module must stay importable without torch.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from pipeline.errors import RecipeError

BUILTIN_TINY_MODEL = "builtin:tiny-llama"


class _Strict(BaseModel):
    """Refuses unknown keys; values are checked as they are given."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------
# Model, LoRA, quantization, tracking
# --------------------------------------------------------------------------------------------


class QuantConfig(_Strict):
    """bitsandbytes settings; used only when ``model.quantization`` is 4bit or 8bit."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    # None: bfloat16 on a GPU that supports it, float32 otherwise.
    compute_dtype: Literal["bfloat16", "float16", "float32"] | None = None


class ModelConfig(_Strict):
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
        from pipeline.replicas import builtin_names  # torch-free

        known = [BUILTIN_TINY_MODEL, *builtin_names()]
        if value.startswith("builtin:") and value not in known:
            raise ValueError(f"unknown built-in model {value!r}; the built-ins are: {', '.join(known)}")
        return value


class LoraConfig(_Strict):
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


class WandbConfig(_Strict):
    project: str | None = Field(None, description="Defaults to the recipe name.")
    entity: str | None = None
    tags: list[str] = []
    # auto: online when an API key is configured, offline otherwise.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"


class TrackingConfig(_Strict):
    report_to: list[Literal["none", "wandb", "tensorboard"]] = ["none"]
    wandb: WandbConfig = WandbConfig()

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _none_alone(self) -> "TrackingConfig":
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError("report_to: 'none' cannot be combined with other trackers")
        return self


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

SFT_FORMATS = ("auto", "alpaca", "messages", "prompt_completion")


class DataSource(_Strict):
    """Where rows come from: a local file (json, jsonl, csv, parquet) or a Hub dataset."""

    path: str | None = Field(None, description="Local file; relative paths are relative to the recipe file.")
    hub: str | None = Field(None, description="Hugging Face dataset id (needs network access).")
    from_stage: str | None = Field(None, description="An earlier stage's output, e.g. the best-of-n stage's 'best'.")
    output: str | None = Field(None, description="Which output of from_stage: best (default) or pairs.")
    subset: str | None = None
    split: str = "train"
    format: Literal[
        "auto", "alpaca", "messages", "prompt_completion", "prompts",  # instruction data and prompts
        "explicit", "conversational", "implicit", "ranked",  # preference data
    ] = "auto"
    # canonical name -> column name in the file, e.g. {instruction: question, output: answer}
    columns: dict[str, str] = {}
    limit: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _exactly_one_origin(self) -> "DataSource":
        if sum(x is not None for x in (self.path, self.hub, self.from_stage)) != 1:
            raise ValueError("give exactly one of 'path' (a local file), 'hub' (a dataset id) or 'from_stage' (an earlier stage)")
        if self.output is not None and self.from_stage is None:
            raise ValueError("'output' only applies with 'from_stage'")
        if self.output is not None and self.output not in ("best", "pairs"):
            raise ValueError(f"output {self.output!r}: a best-of-n stage writes 'best' and 'pairs'")
        if self.path is not None and Path(self.path).suffix.lower() not in (".json", ".jsonl", ".csv", ".parquet"):
            raise ValueError(
                f"path {self.path!r}: unsupported file type; use .json, .jsonl, .csv or .parquet"
            )
        return self

    def describe(self) -> str:
        if self.from_stage is not None:
            return f"stage:{self.from_stage}/{self.output or 'best'}"
        return self.path if self.path is not None else f"hub:{self.hub}[{self.split}]"


class SFTDataConfig(_Strict):
    train: DataSource
    eval: DataSource | None = None
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Held out from train when no eval source.")
    template: Literal["alpaca", "chat"] = "alpaca"
    max_length: int = Field(512, gt=8)
    overlength: Literal["truncate", "drop", "error"] = "truncate"


class PreferenceDataConfig(_Strict):
    """Preference pairs: explicit prompt/chosen/rejected, conversational, implicit (HH transcripts),
    ranked lists, or a best-of-n stage's pairs (``from_stage``)."""

    train: DataSource
    eval: DataSource | None = None
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Held out from train when no eval source.")
    # none: prompts are used as written (best-of-n pairs are already rendered with the SFT template);
    # alpaca / chat: plain-text prompts are instructions, rendered like SFT prompts.
    template: Literal["none", "alpaca", "chat"] = "none"
    max_length: int = Field(512, gt=8)
    ranked_strategy: Literal["best_vs_worst", "best_vs_each", "all_pairs"] = "best_vs_worst"
    on_bad_row: Literal["error", "drop"] = "error"
    lint: Literal["drop", "error"] = Field("drop", description="Identical, empty or over-long pairs: drop (counted) or error.")


# --------------------------------------------------------------------------------------------
# Training settings shared by the training stages
# --------------------------------------------------------------------------------------------


class TrainConfig(_Strict):
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
    # Escape hatch: extra fields of the TRL config class, checked against it at run time.
    trainer_extra: dict[str, Any] = {}


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


class StageConfig(_Strict):
    """Base of all stage configs. ``kind`` says what the stage is; its name is free."""

    KIND: ClassVar[str] = ""
    # field name -> stage kinds that field may point at
    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {}

    kind: str
    seed: int | None = Field(None, description="Overrides the recipe seed for this stage.")

    def upstream(self) -> dict[str, str]:
        """field path (dotted) -> the stage it takes output from."""
        found = {}
        for path in self.FROM_FIELDS:
            node: Any = self
            for part in path.split("."):
                node = getattr(node, part, None)
            if isinstance(node, list):
                found.update({f"{path}[{i}]": target for i, target in enumerate(node)})
            elif node:
                found[path] = node
        return found


class SFTStage(StageConfig):
    KIND: ClassVar[str] = "sft"
    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "init_from": ("sft",),
        "data.train.from_stage": ("bon",),  # rejection-sampling fine-tuning: SFT on best-of-n's best
        "data.eval.from_stage": ("bon",),
    }

    kind: Literal["sft"] = "sft"
    data: SFTDataConfig
    train: TrainConfig = TrainConfig()
    init_from: str | None = Field(None, description="Continue from the model of an earlier sft stage.")


_FUNCTION_REF = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


def _check_function_ref(ref: str) -> str:
    import re

    if not re.match(_FUNCTION_REF, ref):
        raise ValueError(f"{ref!r} is not module:function, e.g. 'pipeline.tinytasks:preferred' or 'mychecks:is_correct'")
    return ref


def _check_function_refs(refs: dict[str, str]) -> dict[str, str]:
    for ref in refs.values():
        _check_function_ref(ref)
    return refs


class ScorerConfig(_Strict):
    """How candidates are scored: a checker function (verifiable rewards) or a trained reward model."""

    checker: str | None = Field(None, description="module:function(row, response) -> float | bool")
    reward_from: str | None = Field(None, description="A reward stage whose model scores prompt + response.")
    batch_size: int = Field(64, gt=0, description="Reward-model scoring batch size.")

    @field_validator("checker")
    @classmethod
    def _ref(cls, value: str | None) -> str | None:
        return None if value is None else _check_function_ref(value)

    @model_validator(mode="after")
    def _one(self) -> "ScorerConfig":
        if (self.checker is None) == (self.reward_from is None):
            raise ValueError("give exactly one of 'checker' (module:function) or 'reward_from' (a reward stage)")
        return self


class SelectConfig(_Strict):
    top_k: int = Field(1, gt=0, description="Responses kept per prompt in 'best' (1: the best one).")
    min_score: float | None = Field(None, description="Best responses scoring below this are not kept.")
    min_margin: float = Field(0.0, ge=0, description="Pairs need chosen - rejected >= this (and > 0).")


class BonStage(StageConfig):
    """Best-of-n: the policy samples n responses per prompt, a scorer scores them, selection keeps
    the best as SFT rows and best-vs-worst as preference pairs."""

    KIND: ClassVar[str] = "bon"
    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"policy_from": ("sft",), "scorer.reward_from": ("reward",)}

    kind: Literal["bon"] = "bon"
    policy_from: str = Field(..., description="The sft stage whose model samples.")
    prompts: DataSource
    template: Literal["alpaca", "chat"] | None = Field(None, description="Default: the policy stage's template.")
    n: int = Field(8, gt=0)
    temperature: float = Field(1.0, ge=0, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(64, gt=0, description="Prompts per generation batch (each with n samples).")
    shard_size: int = Field(256, gt=0, description="Prompts per shard; an interrupted run redoes at most one.")
    scorer: ScorerConfig
    select: SelectConfig = SelectConfig()
    # name -> module:function; reported per checker: first-sample rate, best rate, oracle pass@n
    report: dict[str, str] = {}

    _refs = field_validator("report")(classmethod(lambda cls, value: _check_function_refs(value)))


class _PairsFrom(StageConfig):
    """``pairs_from: <bon stage>`` is shorthand for data.train = that stage's pairs."""

    pairs_from: str | None = Field(None, description="A best-of-n stage whose pairs to train on.")
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
    def _has_data(self) -> "_PairsFrom":
        if self.data is None:
            raise ValueError("needs preference pairs: 'pairs_from: <bon stage>' or a 'data:' block")
        return self


class RewardStage(_PairsFrom):
    """A reward model: a sequence classifier with one output, trained on preference pairs (TRL RewardTrainer)."""

    KIND: ClassVar[str] = "reward"
    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "base_from": ("sft",), "pairs_from": ("bon",), "data.train.from_stage": ("bon",), "data.eval.from_stage": ("bon",),
    }

    kind: Literal["reward"] = "reward"
    base_from: str | None = Field(None, description="Start from an sft stage's model (default: the recipe's base model).")
    train: TrainConfig = TrainConfig()
    min_accuracy: float | None = Field(None, ge=0, le=1, description="Quality gate on held-out pairwise accuracy.")


class DPOStage(_PairsFrom):
    """DPO against a frozen reference: the policy_from model (TRL DPOTrainer)."""

    KIND: ClassVar[str] = "dpo"
    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "policy_from": ("sft",), "pairs_from": ("bon",), "data.train.from_stage": ("bon",), "data.eval.from_stage": ("bon",),
    }

    kind: Literal["dpo"] = "dpo"
    policy_from: str = Field(..., description="The sft stage whose model is the policy's start and the frozen reference.")
    beta: float = Field(0.1, gt=0)
    loss_type: str | list[str] = Field("sigmoid", description="Any TRL DPO loss, or a list combined with loss_weights.")
    loss_weights: list[float] | None = None
    precompute_ref_log_probs: bool = False
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _weights_match(self) -> "DPOStage":
        losses = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} values for {len(losses)} loss type(s)")
        return self


class EvalStage(StageConfig):
    """Held-out evaluation of every policy: checker rates (alignment gained, capability kept), reward-model
    score, win rate against the reference policy, KL to it, response length. Writes eval/metrics.json."""

    KIND: ClassVar[str] = "eval"
    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "policies": ("sft", "dpo"), "reference": ("sft", "dpo"), "bon_from": ("bon",), "reward_from": ("reward",),
    }

    kind: Literal["eval"] = "eval"
    prompts: DataSource
    policies: list[str] = Field(..., min_length=1, description="Stages whose models are evaluated (greedy decoding).")
    reference: str = Field(..., description="The baseline policy for win rate and KL (usually the SFT stage).")
    bon_from: str | None = Field(None, description="Also evaluate best-of-n as a selection policy, as this bon stage samples and scores.")
    reward_from: str | None = Field(None, description="Reward model for reward_mean and win rates.")
    # metric name -> module:function(row, response) -> bool, e.g. preference_pass, gold_accuracy
    checkers: dict[str, str] = {}
    template: Literal["alpaca", "chat"] | None = Field(None, description="Default: the reference stage's template.")
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(64, gt=0)
    kl_samples: int = Field(4, ge=0, description="Samples per prompt (temperature 1) for the KL estimate; 0 skips it.")

    _refs = field_validator("checkers")(classmethod(lambda cls, value: _check_function_refs(value)))


STAGE_TYPES: dict[str, type[StageConfig]] = {
    "sft": SFTStage, "bon": BonStage, "reward": RewardStage, "dpo": DPOStage, "eval": EvalStage,
}


# --------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------


class Recipe(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    output_dir: str | None = Field(None, description="Default: runs/<name>, relative to the working directory.")
    model: ModelConfig = ModelConfig()
    lora: LoraConfig | None = None
    tracking: TrackingConfig = TrackingConfig()
    launch: str | None = Field(None, description="accelerate config file used by 'pipeline run'.")
    stages: dict[str, SerializeAsAny[StageConfig]]
    # Where the recipe came from; not part of the YAML.
    source_path: str | None = Field(None, exclude=True)

    def stage(self, name: str) -> StageConfig:
        if name not in self.stages:
            raise RecipeError(
                f"recipe {self.name!r} has no stage {name!r}{_suggest(name, self.stages)}; "
                f"stages: {', '.join(self.stages)}"
            )
        return self.stages[name]

    def resolved_dict(self) -> dict[str, Any]:
        """The recipe as it will run: defaults filled in, paths absolute. Saved beside every output."""
        return self.model_dump(mode="json", exclude={"source_path"})

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.resolved_dict(), sort_keys=False, allow_unicode=True)

    def output_path(self, override: str | None = None) -> Path:
        return Path(override or self.output_dir or f"runs/{self.name}").resolve()


def missing_data_files(recipe: Recipe, stages: list[str] | None = None) -> list[str]:
    """Local data files the given stages read that do not exist, as 'key.path: file' lines."""
    missing = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, DataSource):
            if node.path is not None and not Path(node.path).is_file():
                missing.append(f"{path}.path: file not found: {node.path}")
        elif isinstance(node, BaseModel):
            for field in type(node).model_fields:
                walk(getattr(node, field), f"{path}.{field}")

    for name in stages or list(recipe.stages):
        walk(recipe.stages[name], f"stages.{name}")
    return missing


def config_hash(obj: Any) -> str:
    """Stable short hash of JSON-able settings."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading: YAML -> overrides -> validation -> cross-field rules
# --------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping with at least 'name' and 'stages'")
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw, source=path)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` to the raw recipe dict; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item!r}: expected key.path=value, e.g. stages.sft.train.learning_rate=1e-4")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise RecipeError(f"--set {item!r}: {where} is a value, not a section, so it has no key {parts[depth + 1]!r}")
        node = child
    node[parts[-1]] = value


def recipe_from_dict(raw: dict[str, Any], source: Path | None = None) -> Recipe:
    raw = copy.deepcopy(raw)
    where = f"{source}: " if source else ""
    errors: list[str] = []

    stages_raw = raw.pop("stages", None)
    if not isinstance(stages_raw, dict) or not stages_raw:
        errors.append("stages: required; a mapping of stage name -> settings, e.g. stages: {sft: {kind: sft, ...}}")
        stages_raw = {}
    stages: dict[str, StageConfig] = {}
    for name, body in stages_raw.items():
        stage = _validate_stage(str(name), body, errors)
        if stage is not None:
            stages[str(name)] = stage

    base_dir = source.resolve().parent if source else Path.cwd()
    try:
        recipe = Recipe.model_validate({**raw, "stages": {}, "source_path": str(source) if source else None})
    except ValidationError as exc:
        errors.extend(_format_errors(exc, prefix=(), model=Recipe))
        recipe = None

    if errors:
        raise RecipeError(where + "invalid recipe:\n" + "\n".join(f"  - {e}" for e in errors))
    assert recipe is not None
    recipe = recipe.model_copy(update={"stages": stages})
    _check_cross_fields(recipe, errors)
    if errors:
        raise RecipeError(where + "invalid recipe:\n" + "\n".join(f"  - {e}" for e in errors))
    return _resolve_paths(recipe, base_dir)


def _validate_stage(name: str, body: Any, errors: list[str]) -> StageConfig | None:
    loc = f"stages.{name}"
    if not isinstance(body, dict):
        errors.append(f"{loc}: must be a mapping of settings, got {type(body).__name__}")
        return None
    kind = body.get("kind", name if name in STAGE_TYPES else None)
    if kind is None:
        errors.append(f"{loc}.kind: required (the stage name {name!r} is not a stage kind); one of: {', '.join(STAGE_TYPES)}")
        return None
    if kind not in STAGE_TYPES:
        errors.append(f"{loc}.kind: unknown stage kind {kind!r}{_suggest(str(kind), STAGE_TYPES)}; one of: {', '.join(STAGE_TYPES)}")
        return None
    model = STAGE_TYPES[kind]
    try:
        return model.model_validate({**body, "kind": kind})
    except ValidationError as exc:
        errors.extend(_format_errors(exc, prefix=("stages", name), model=model))
        return None


def _check_cross_fields(recipe: Recipe, errors: list[str]) -> None:
    if recipe.model.quantization != "none" and recipe.lora is None:
        errors.append(
            f"model.quantization: {recipe.model.quantization} needs a 'lora:' block — quantized weights cannot be "
            "trained directly (QLoRA trains a LoRA adapter on the frozen quantized base); add e.g. 'lora: {r: 16}'"
        )
    names = list(recipe.stages)
    for position, (name, stage) in enumerate(recipe.stages.items()):
        reported = set()
        for field, target in stage.upstream().items():
            if target in reported:
                continue
            reported.add(target)
            allowed = stage.FROM_FIELDS[field.split("[")[0]]
            loc = f"stages.{name}.{field}"
            if target not in recipe.stages:
                errors.append(f"{loc}: no stage named {target!r}{_suggest(target, names)}; stages: {', '.join(names)}")
            elif names.index(target) >= position:
                errors.append(f"{loc}: stage {target!r} must come before {name!r} in the recipe")
            elif recipe.stages[target].kind not in allowed:
                errors.append(
                    f"{loc}: stage {target!r} is a {recipe.stages[target].kind!r} stage; "
                    f"{field} takes the output of a stage of kind {' or '.join(map(repr, allowed))}"
                )


def _resolve_paths(recipe: Recipe, base_dir: Path) -> Recipe:
    """Make data and launch paths absolute (relative ones are relative to the recipe file)."""

    def fix(node: Any) -> Any:
        if isinstance(node, DataSource) and node.path is not None and not Path(node.path).is_absolute():
            return node.model_copy(update={"path": str((base_dir / node.path).resolve())})
        if isinstance(node, BaseModel):
            updates = {}
            for field in type(node).model_fields:
                value = getattr(node, field)
                new = fix(value)
                if new is not value:
                    updates[field] = new
            return node.model_copy(update=updates) if updates else node
        if isinstance(node, dict):
            new_dict = {k: fix(v) for k, v in node.items()}
            return new_dict if any(new_dict[k] is not node[k] for k in node) else node
        return node

    recipe = fix(recipe)
    if recipe.launch and not Path(recipe.launch).is_absolute():
        recipe = recipe.model_copy(update={"launch": str((base_dir / recipe.launch).resolve())})
    if recipe.launch and not Path(recipe.launch).is_file():
        raise RecipeError(f"launch: accelerate config file not found: {recipe.launch} (relative paths are relative to the recipe file)")
    name = recipe.model.name_or_path
    if name.startswith((".", "/")) or (not name.startswith("builtin:") and (base_dir / name).is_dir()):
        local = Path(name) if Path(name).is_absolute() else (base_dir / name).resolve()
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name_or_path": str(local)})})
    return recipe


# --------------------------------------------------------------------------------------------
# Error messages
# --------------------------------------------------------------------------------------------


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid field names of the model reached by following ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f for f in current.model_fields if f != "source_path"]
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _format_errors(exc: ValidationError, prefix: tuple[str, ...], model: type[BaseModel]) -> list[str]:
    lines = []
    for err in exc.errors():
        # pydantic adds union branch names ('list[str]', 'literal[...]') to locations; drop them.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("function-after",))))
        path = ".".join(str(p) for p in prefix + loc)
        if err["type"] == "extra_forbidden":
            valid = _fields_at(model, loc[:-1])
            hint = _suggest(str(loc[-1]), valid)
            listing = f"; valid keys here: {', '.join(valid)}" if valid and not hint else ""
            lines.append(f"{path}: unknown key{hint}{listing}")
        elif err["type"] == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            given = err.get("input")
            shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
            lines.append(f"{path or '(top level)'}: {msg}{shown}")
    # A union reports once per branch; keep each message once.
    return list(dict.fromkeys(lines))
