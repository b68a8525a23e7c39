"""Typed recipes, one module per concern -- ``model`` (model, quantization, LoRA), ``data`` (sources, mixtures,
data sections), ``train`` (training settings), ``stage`` (the base of every stage kind's config), ``recipe`` (the
whole recipe), ``loader`` (YAML, ``--set``, cross-stage rules), ``rounds`` (round groups) and ``registry`` (the
stage kinds). Import the names from here.

No torch here: a recipe is checked completely before anything heavy is imported.
"""

from pipeline.config.base import Strict
from pipeline.config.data import (
    DataSource,
    Mixture,
    PreferenceDataConfig,
    SFTDataConfig,
    Sources,
    as_mixture,
    iter_sources,
    map_sources,
    source_list,
)
from pipeline.config.loader import apply_override, load_recipe, missing_data_files, recipe_from_dict
from pipeline.config.model import BUILTIN_TINY_MODEL, LoraConfig, ModelConfig, QuantConfig
from pipeline.config.recipe import Recipe, TrackingConfig, WandbConfig
from pipeline.config.stage import PairsStageConfig, StageConfig, function_ref, function_refs
from pipeline.config.train import TrainConfig

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
    "Sources",
    "StageConfig",
    "Strict",
    "TrackingConfig",
    "TrainConfig",
    "WandbConfig",
    "apply_override",
    "as_mixture",
    "function_ref",
    "function_refs",
    "iter_sources",
    "load_recipe",
    "map_sources",
    "missing_data_files",
    "recipe_from_dict",
    "source_list",
]
