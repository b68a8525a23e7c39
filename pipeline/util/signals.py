"""Ctrl-C and SIGTERM end a run cleanly: both raise ``Interrupted`` in the main thread (the runner records the
stage as interrupted, the CLI prints one line and exits 130 / 143).

SIGTERM is what a scheduler (Slurm, Kubernetes) sends some seconds before it kills a job. While a trainer runs in
a single process, it is held until the end of the current optimizer step, the trainer saves a checkpoint there
and then raises it (``pipeline.train.callbacks.CheckpointOnSignal``), so the rerun resumes from that step. If the
step does not end within ``TERM_GRACE_S`` seconds, or a second signal comes, it is raised at once. Stdlib only.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.util.errors import Interrupted

TERM_GRACE_S = 20.0  # Slurm's default KillWait is 30 s

_state = {"holding": 0, "pending": None, "saving": False}


@contextmanager
def handled() -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM raise ``Interrupted`` (main thread only; elsewhere Python keeps
    its defaults); the previous handlers are put back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _on_signal(signum, frame) -> None:
    if signum == signal.SIGTERM and _state["holding"] and _state["pending"] is None:
        _state["pending"] = Interrupted(signum)  # the trainer saves a checkpoint at the end of its step
        if hasattr(signal, "setitimer"):  # ...unless the step takes longer than the grace time
            signal.signal(signal.SIGALRM, _on_grace_over)
            signal.setitimer(signal.ITIMER_REAL, TERM_GRACE_S)
        return
    _state["pending"] = None
    raise Interrupted(signum)


def _on_grace_over(signum, frame) -> None:
    pending = _state["pending"]
    if pending is not None and not _state["saving"]:
        _state["pending"] = None
        raise pending


def pending() -> Interrupted | None:
    """A SIGTERM that is being held for a checkpoint, or None."""
    return _state["pending"]


def saving() -> None:
    """The checkpoint for a held SIGTERM is being written: no longer cut short by the grace timer."""
    _state["saving"] = True
    if _state["pending"] is not None and hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, 0)


def take() -> Interrupted | None:
    """The held SIGTERM, now to be raised (clears it)."""
    found, _state["pending"], _state["saving"] = _state["pending"], None, False
    if found is not None and hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, 0)
    return found


@contextmanager
def checkpoint_on_term(enabled: bool = True) -> Iterator[None]:
    """Hold SIGTERM while this block runs (a training loop that saves a checkpoint first, see the module doc).
    A SIGTERM still held when the block ends is raised then."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["holding"] += 1
    try:
        yield
    finally:
        _state["holding"] -= 1
        held = take()  # also when the block raised: nothing stays held for a later stage
    if held is not None:
        raise held
