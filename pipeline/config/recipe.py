"""The whole recipe: model, LoRA, tracking, launch, plugins and the stages by name. No torch here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, field_validator, model_validator

from pipeline.config.base import Strict
from pipeline.config.model import LoraConfig, ModelConfig
from pipeline.config.stage import StageConfig
from pipeline.util.errors import RecipeError
from pipeline.util.text import suggest


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
