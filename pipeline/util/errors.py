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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM (what a scheduler such as Slurm sends before it kills a job) ended the run.

    A KeyboardInterrupt, so code that handles Ctrl-C handles both. The runner records the stage as
    ``interrupted`` (never ``done``) and fills in ``stage``; a trainer that saved a checkpoint on SIGTERM names it.
    The CLI prints one line and exits 128 + the signal number (130, 143)."""

    def __init__(self, signum: int = 2, stage: str | None = None, checkpoint: str | None = None):
        super().__init__(signum, stage, checkpoint)
        self.signum, self.stage, self.checkpoint = signum, stage, checkpoint

    @classmethod
    def of(cls, exc: BaseException, stage: str | None = None) -> "Interrupted":
        """``exc`` (any KeyboardInterrupt) as an Interrupted naming ``stage`` unless it names one already."""
        if isinstance(exc, Interrupted):
            if exc.stage is None and stage is not None:
                exc.stage = stage
            return exc
        return cls(2, stage)

    @property
    def signal_name(self) -> str:
        return {2: "Ctrl-C", 15: "SIGTERM"}.get(self.signum, f"signal {self.signum}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def reason(self) -> str:
        """For the manifest: 'interrupted by SIGTERM (checkpoint-27 saved)'."""
        saved = f" ({self.checkpoint} saved)" if self.checkpoint else ""
        return f"interrupted by {self.signal_name}{saved}"

    def __str__(self) -> str:
        return self.reason() + (f" during stage {self.stage!r}" if self.stage else "")
