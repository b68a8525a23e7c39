"""User-facing errors: the CLI prints these as one clear message, never a traceback."""


class PipelineError(Exception):
    """Something the user can fix: a bad recipe, a bad data file, a missing output."""


class RecipeError(PipelineError):
    """The recipe (or a --set override) is invalid."""


class DataError(PipelineError):
    """A data file is missing, malformed, or has bad rows."""


class GateFailed(PipelineError):
    """A stage finished but its quality gate failed; downstream stages must not start.

    Carries the stage's metrics so the manifest shows what was measured."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = metrics or {}


class DiskFull(PipelineError):
    """The disk filled up while a stage wrote its outputs or checkpoints."""

    @classmethod
    def during(cls, stage: str, run_dir, exc: OSError) -> "DiskFull":
        where = f" while writing {exc.filename}" if getattr(exc, "filename", None) else ""
        return cls(
            f"stage {stage!r}: the disk is full{where} ({exc.strerror or exc}). Free space on the disk holding "
            f"{run_dir} and rerun: finished stages are kept and this one resumes from its last complete checkpoint."
        )
