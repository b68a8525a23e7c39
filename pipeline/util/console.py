"""What a person sees: one line per event from this project, progress with an ETA for every long step,
and the other libraries' expected noise silenced (``pipeline run --verbose`` brings it all back).

Silenced unless verbose: bitsandbytes' optional-kernels message, transformers' "Token indices sequence
length is longer than ..." (the SFT stage counts over-length rows itself), FutureWarning / DeprecationWarning
raised inside the libraries, the Trainer's per-log dicts and tqdm bars, and W&B's banners (the tracker says
in one line where an offline run is and how to upload it). Errors are never silenced.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import TextIO

VERBOSE_ENV = "PIPELINE_VERBOSE"  # set by `pipeline run --verbose`; child processes (accelerate launch) inherit it
LIBRARIES = ("transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "torch", "deepspeed", "wandb")
NOISE = (
    "Token indices sequence length is longer than",
    "Failed to load CPU gemm_4bit_forward",
    "mtime may not be reliable on this filesystem",  # transformers sorts checkpoints by number then, as we do
)


_current_stage = ""  # set by the runner, for progress from inside a library's trainer (pipeline.compat)


def set_stage(name: str) -> None:
    global _current_stage
    _current_stage = name


def stage_label() -> str:
    return f"[{_current_stage}]" if _current_stage else ""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern in message for pattern in NOISE)


def quiet_early() -> None:
    """The part of quiet_libraries that imports nothing: for the CLI to call first, before any library loads
    (bitsandbytes logs on import)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose():
        return
    os.environ.setdefault("TQDM_DISABLE", "1")  # the libraries' own bars; ours are pipeline.util.console.Progress
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")  # W&B would otherwise mirror every printed line
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=rf"({'|'.join(LIBRARIES)})(\.|$)")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def quiet_libraries() -> None:
    """Silence the libraries' expected noise in this process (a no-op when verbose)."""
    quiet_early()
    if verbose():
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()  # per-shard load/save bars drown the useful lines
    for handler in logging.getLogger("transformers").handlers:
        if not any(isinstance(f, _DropNoise) for f in handler.filters):
            handler.addFilter(_DropNoise())


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
    """Progress of one long step (training, sampling, scoring, reference log-probs).

    On a terminal, one line redrawn in place; otherwise (a log file, CI, a pipe) a line every ``every_s``
    seconds and one at the end: ``[sft] training: 440/1100 steps (40%), 23s, ETA 35s; loss 0.51``.
    """

    every_s = 30.0

    def __init__(
        self, label: str, total: int, unit: str, enabled: bool = True, stream: TextIO | None = None, already: int = 0
    ):
        """``already``: done before this process started (a resumed run), left out of the ETA's pace."""
        self.label, self.total, self.unit, self.enabled = label, max(int(total), 0), unit, enabled
        self.stream = stream or sys.stdout
        self.terminal = self.stream.isatty()
        self.started = time.monotonic()
        self.done = self.already = already
        self.note, self.closed, self.last_line = "", False, self.started

    def update(self, done: int, note: str = "") -> None:
        """``done`` of ``total`` finished; ``note``: a short figure to show with it (loss, tokens/s)."""
        self.done, self.note = min(done, self.total) if self.total else done, note or self.note
        if not self.enabled:
            return
        if self.terminal:
            self.stream.write("\r" + self.line() + "\033[K")
            self.stream.flush()
        elif time.monotonic() - self.last_line >= self.every_s and self.done < self.total:
            self.last_line = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def advance(self, n: int = 1, note: str = "") -> None:
        self.update(self.done + n, note)

    def close(self, note: str = "") -> None:
        """The final line (always printed once, also for a step that had nothing to do)."""
        if self.closed or not self.enabled:
            return
        self.closed, self.note = True, note or self.note
        erase = ("\r", "\033[K") if self.terminal else ("", "")
        print(erase[0] + self.line(final=True) + erase[1], file=self.stream, flush=True)

    def line(self, final: bool = False) -> str:
        elapsed = time.monotonic() - self.started
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        eta = ""
        if not final and self.already < self.done < self.total:
            eta = f", ETA {duration(elapsed / (self.done - self.already) * (self.total - self.done))}"
        note = f"; {self.note}" if self.note else ""
        return f"{self.label}: {self.done}/{self.total} {self.unit}{share}, {duration(elapsed)}{eta}{note}"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self.terminal and self.enabled:
            print(file=self.stream)  # leave the bar's line before the error


def stage_progress(ctx, what: str, total: int, unit: str, already: int = 0) -> Progress:
    """A Progress labelled ``[<stage>] <what>``, shown by the main process only."""
    return Progress(f"[{ctx.name}] {what}", total, unit, enabled=ctx.is_main, already=already)
