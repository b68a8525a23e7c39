"""The run-directory lock: a second run is refused while the first lives; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipeline.run.lock import LOCK_NAME, TOKEN_ENV, RunDirLocked, run_dir_lock

from conftest import REPO, run_cli

HOLD = "import sys, time; from pipeline.run.lock import run_dir_lock\nwith run_dir_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)\n"


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the lock of tmp_path/run: (process, run dir)."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, "RANK")}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    yield proc, run_dir
    proc.kill()
    proc.wait()


@pytest.fixture(autouse=True)
def no_inherited_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)


def test_second_run_on_a_locked_run_dir_is_refused_naming_the_holder(holder, make_recipe):
    proc, run_dir = holder
    started = time.time()
    out = run_cli("run", str(make_recipe()), "--output-dir", str(run_dir), env={TOKEN_ENV: ""})
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert f"is in use by pid {proc.pid} on host {socket.gethostname()}" in out.stderr
    assert "since " in out.stderr and "command:" in out.stderr
    assert time.time() - started < 30  # refused at once, not after loading anything
    assert not (run_dir / "manifest.json").exists()


def test_lock_refused_in_process_while_held_and_free_after_the_holder_exits(holder):
    proc, run_dir = holder
    with pytest.raises(RunDirLocked, match=f"pid {proc.pid}"), run_dir_lock(run_dir):
        pass
    proc.kill()
    proc.wait()
    notes = []
    with run_dir_lock(run_dir, say=notes.append):
        info = json.loads((run_dir / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid()
    # killed -9-style (SIGKILL gives no chance to clean up): its record is still there, the process is gone
    assert len(notes) == 1 and f"left by pid {proc.pid}" in notes[0] and "no longer running" in notes[0]


def test_stale_lock_of_a_dead_pid_is_taken_over_by_the_cli(make_recipe, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = {
        "pid": dead.pid,
        "host": socket.gethostname(),
        "command": "pipeline run old.yaml",
        "since": "2024-01-01T00:00:00",
        "token": "x",
    }
    (run_dir / LOCK_NAME).write_text(json.dumps(stale))
    # `stage dpo`-like failure right after the lock: the sft stage it needs is not done here, so nothing trains
    recipe = make_recipe(
        {
            "stages": {
                "dpo": {"kind": "dpo", "policy_from": "sft", "data": {"train": {"path": str(tmp_path / "p.jsonl")}}}
            }
        }
    )
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    out = run_cli("stage", "dpo", str(recipe), "--output-dir", str(run_dir), env={TOKEN_ENV: ""})
    assert out.returncode == 2, out.stderr
    assert f"taking over the lock {run_dir / LOCK_NAME} left by pid {dead.pid}" in out.stderr
    assert "no longer running" in out.stderr
    assert "needs the output of stage 'sft'" in out.stderr
    assert (run_dir / LOCK_NAME).read_text() == ""  # released


def test_child_with_the_holders_token_and_secondary_ranks_share_the_lock(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with run_dir_lock(run_dir):
        token = os.environ[TOKEN_ENV]
        info = json.loads((run_dir / LOCK_NAME).read_text())
        assert info["token"] == token
        # a stage process started by this run (same token): runs under the parent's lock
        code = "import sys; from pipeline.run.lock import run_dir_lock\nwith run_dir_lock(sys.argv[1]): print('ok')"
        child = subprocess.run([sys.executable, "-c", code, str(run_dir)], cwd=REPO, capture_output=True, text=True)
        assert child.returncode == 0 and child.stdout.strip() == "ok", child.stderr
        # rank 1 of a launch: rank 0 holds the lock for it
        rank1 = subprocess.run(
            [sys.executable, "-c", code, str(run_dir)],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, TOKEN_ENV: "", "RANK": "1"},
        )
        assert rank1.returncode == 0, rank1.stderr
        # any other process (no token, rank 0) is refused
        other = subprocess.run(
            [sys.executable, "-c", code, str(run_dir)],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, TOKEN_ENV: "someone-else"},
        )
        assert other.returncode != 0 and "RunDirLocked" in other.stderr
    assert TOKEN_ENV not in os.environ  # restored after release


def test_a_lock_held_by_a_live_process_is_never_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    sleeper = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != TOKEN_ENV},
    )
    try:
        assert sleeper.stdout.readline().strip() == "locked"
        sleeper.send_signal(signal.SIGSTOP)  # alive but stuck: still holds it
        with pytest.raises(RunDirLocked), run_dir_lock(run_dir):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()
