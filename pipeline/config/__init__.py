"""Typed recipes: the schema (``schema``) and loading YAML with ``--set`` overrides (``loader``).

No torch here: a recipe is checked completely before anything heavy is imported.
"""

from pipeline.config.loader import apply_override, load_recipe, missing_data_files, recipe_from_dict
from pipeline.config.schema import (
    BUILTIN_TINY_MODEL,
    DataSource,
    LoraConfig,
    Mixture,
    ModelConfig,
    PairsStageConfig,
    PreferenceDataConfig,
    QuantConfig,
    Recipe,
    SFTDataConfig,
    StageConfig,
    TrackingConfig,
    TrainConfig,
    WandbConfig,
    as_mixture,
    function_ref,
    function_refs,
    iter_sources,
    map_sources,
    source_list,
    suggest,
)

__all__ = [
    "BUILTIN_TINY_MODEL",
    "DataSource",
    "LoraConfig",
    "Mixture",
    "ModelConfig",
    "PairsStageConfig",
    "PreferenceDataConfig",
    "QuantConfig",
    "Recipe",
    "SFTDataConfig",
    "StageConfig",
    "TrackingConfig",
    "TrainConfig",
    "WandbConfig",
    "as_mixture",
    "apply_override",
    "function_ref",
    "function_refs",
    "iter_sources",
    "load_recipe",
    "map_sources",
    "source_list",
    "missing_data_files",
    "recipe_from_dict",
    "suggest",
]
