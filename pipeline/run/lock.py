"""One process at a time per run directory: ``<run_dir>/.lock``.

The lock is an ``fcntl.flock`` on that file, so the kernel releases it when its holder dies, however it
dies (kill -9 included): a lock left behind by a killed process is never mistaken for a live one. The file
also records who holds it (pid, host, command, since) for the message a second process prints, and a
token. ``pipeline run`` passes that token to the processes it starts (``accelerate launch`` of every
stage) in ``PIPELINE_RUN_LOCK``; a process that finds its own run's token in the lock file runs under the
lock its parent holds instead of taking it again. Ranks > 0 of a launch never take it: rank 0 does.

The file is emptied, never deleted, on release: deleting it would let a waiting process lock a file
that is no longer the one at ``<run_dir>/.lock``. No torch here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from pipeline.util.errors import PipelineError

LOCK_NAME = ".lock"
TOKEN_ENV = "PIPELINE_RUN_LOCK"


class RunDirLocked(PipelineError):
    """Another live process runs in this run directory."""


def holder_description(info: dict) -> str:
    return (
        f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (command: {info.get('command', '?')}), "
        f"since {info.get('since', '?')}"
    )


def read_holder(path: Path) -> dict:
    """What the lock file says about its holder; {} when it is empty or unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_secondary_rank() -> bool:
    """A launched process other than global rank 0: the lock is rank 0's to take."""
    return int(os.environ.get("RANK", "0")) > 0


def _inherited(path: Path) -> bool:
    """This process was started by the holder of this very lock (it passed its token down)."""
    token = os.environ.get(TOKEN_ENV)
    return bool(token) and read_holder(path).get("token") == token


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, say=print) -> Iterator[None]:
    """Hold the run directory's lock for the duration; refuse at once if a live process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    if _is_secondary_rank() or _inherited(path):
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirLocked(
                f"run directory {run_dir} is in use by {holder_description(read_holder(path))}. "
                "Wait for it to finish or stop it, or give this run another --output-dir"
            ) from None
        _announce_takeover(read_holder(path), path, say)
        token = uuid.uuid4().hex
        _write_holder(
            fd,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": " ".join(sys.argv),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "token": token,
            },
        )
        previous = os.environ.get(TOKEN_ENV)
        os.environ[TOKEN_ENV] = token  # inherited by the stage processes this one launches
        try:
            yield
        finally:
            _restore_env(previous)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _announce_takeover(previous: dict, path: Path, say) -> None:
    """The file names a holder but nobody holds the lock: that process died without releasing it."""
    if not previous.get("pid"):
        return
    here = previous.get("host") == socket.gethostname()
    state = "no longer running" if here and not pid_alive(int(previous["pid"])) else "no longer holding it"
    say(f"note: taking over the lock {path} left by {holder_description(previous)}: that process is {state}")


def _write_holder(fd: int, info: dict) -> None:
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _restore_env(previous: str | None) -> None:
    if previous is None:
        os.environ.pop(TOKEN_ENV, None)
    else:
        os.environ[TOKEN_ENV] = previous
