"""What a stage sees while it runs: its typed settings, where to write, and the outputs of earlier stages.

``StageContext[SFTStage]`` tells a reader and a type checker what ``ctx.cfg`` holds. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pipeline.config import DataSource, Mixture, Recipe, StageConfig
from pipeline.run.manifest import Manifest
from pipeline.util.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.modeling import ModelRef

C = TypeVar("C", bound=StageConfig)


@dataclass
class StageContext(Generic[C]):
    recipe: Recipe
    name: str
    cfg: C
    run_dir: Path
    stage_dir: Path
    seed: int
    is_main: bool = True
    world_size: int = 1
    process_index: int = 0
    show_progress: bool = False
    device: Any = "cpu"
    config_hash: str = ""
    # filled by the stage: name -> path or structured reference, recorded in the manifest
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest(self) -> Manifest:
        return Manifest(self.run_dir)

    def say(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def upstream_entry(self, stage: str) -> dict[str, Any]:
        entry = self.manifest.stage(stage)
        if entry.get("status") != "done":
            raise PipelineError(not_done(self.name, stage, entry))
        return entry

    def wait(self) -> None:
        """Barrier across processes (no-op in a single process)."""
        from accelerate import PartialState

        PartialState().wait_for_everyone()

    def resolve_source(self, source: DataSource | Mixture | None, default_output: str = "best"):
        """A data source that names an earlier stage's output becomes the file that stage wrote
        (each source of a mixture likewise)."""
        if isinstance(source, Mixture):
            resolved = [self.resolve_source(s, default_output) for s in source.sources]
            return source.model_copy(update={"sources": resolved})
        if source is None or source.from_stage is None:
            return source
        outputs = self.upstream_entry(source.from_stage)["outputs"]
        key = source.output or default_output
        if key not in outputs:
            raise PipelineError(f"stage {source.from_stage!r} has no output {key!r}; it has: {', '.join(outputs)}")
        return source.model_copy(update={"path": outputs[key], "from_stage": None, "output": None})

    def model_of(self, stage: str | None) -> ModelRef | None:
        """The model an earlier stage produced, or None when ``stage`` is None."""
        if stage is None:
            return None
        from pipeline.modeling import ModelRef

        return ModelRef.from_dict(self.upstream_entry(stage)["outputs"]["model"])


def not_done(consumer: str, stage: str, entry: dict[str, Any]) -> str:
    status = entry.get("status", "not run")
    return (
        f"stage {consumer!r} needs the output of stage {stage!r}, which is {status} in this run directory; "
        f"run it first (pipeline run RECIPE --stages {stage},{consumer}) or point --output-dir at the run that has it"
    )
