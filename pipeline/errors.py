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
