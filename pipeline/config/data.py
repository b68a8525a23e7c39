"""Where rows come from: one source or a weighted mixture, and the SFT / preference data sections; one walker
over a config's sources. No torch here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Discriminator, Field, Tag, model_validator

from pipeline.config.base import Strict

SFT_FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion")

# Local data files: the type by suffix, each optionally compressed (pipeline.data.sources reads them all).
FILE_TYPES = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
FILE_TYPES_TEXT = ".json, .jsonl (.ndjson), .csv, .tsv or .parquet, each also compressed (.gz, .bz2, .xz, .zst)"


def file_type(path: str | Path) -> tuple[str, str | None]:
    """(type, compression or None) of a local data file from its name, e.g. 'hh.jsonl.gz' -> ('jsonl', 'gzip');
    ValueError saying what is accepted when the name has no known type."""
    suffixes = [x.lower() for x in Path(path).suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    kind = FILE_TYPES.get(suffixes[-1]) if suffixes else None
    if kind is not None:
        return kind, compression
    name = Path(path).name
    if not suffixes:
        raise ValueError(
            f"path {str(path)!r}: {name!r} has no file type (a directory is not read); name one file ending in "
            f"{FILE_TYPES_TEXT} (several files: a list of sources)"
        )
    raise ValueError(f"path {str(path)!r}: unsupported file type {suffixes[-1]!r}; use {FILE_TYPES_TEXT}")


class DataSource(Strict):
    """Where rows come from: a local file (json, jsonl, csv, tsv, parquet; also compressed) or a Hub dataset."""

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
        if self.path is not None:
            file_type(self.path)  # raises, saying which types are read
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
