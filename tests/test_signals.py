"""Ctrl-C and SIGTERM inside one process: what pipeline.util.signals does with them (the end-to-end runs, with a
real training stage interrupted and resumed, are in tests/test_orchestration.py)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipeline.util import signals
from pipeline.util.errors import Interrupted


def test_sigint_and_sigterm_raise_interrupted_with_their_exit_codes():
    for signum, code, name in ((signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")):
        with pytest.raises(Interrupted) as info, signals.handled():
            os.kill(os.getpid(), signum)
            time.sleep(5)
        assert info.value.exit_code == code and info.value.signal_name == name
        assert isinstance(info.value, KeyboardInterrupt)  # code that handles Ctrl-C handles both
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handlers are back


def test_sigterm_is_held_for_a_checkpoint_and_raised_when_the_block_ends():
    with pytest.raises(Interrupted) as info, signals.handled(), signals.checkpoint_on_term():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        held = signals.pending()
        assert held is not None and held.signum == signal.SIGTERM  # held, not raised: the step goes on
    assert info.value is held and signals.pending() is None


def test_a_second_signal_or_the_grace_time_ends_a_held_sigterm(monkeypatch):
    with pytest.raises(Interrupted), signals.handled(), signals.checkpoint_on_term():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's second SIGTERM (or Ctrl-C): at once
        time.sleep(5)
    monkeypatch.setattr(signals, "TERM_GRACE_S", 0.2)
    started = time.time()
    with pytest.raises(Interrupted), signals.handled(), signals.checkpoint_on_term():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # a step that never ends: the grace time raises it
    assert time.time() - started < 3 and signals.pending() is None


def test_interrupted_names_the_stage_and_the_saved_checkpoint():
    plain = Interrupted.of(KeyboardInterrupt(), "sft")
    assert plain.signum == signal.SIGINT and plain.stage == "sft" and plain.reason() == "interrupted by Ctrl-C"
    term = Interrupted(signal.SIGTERM, checkpoint="checkpoint-27")
    assert Interrupted.of(term, "dpo") is term and term.stage == "dpo"
    assert term.reason() == "interrupted by SIGTERM (checkpoint-27 saved)"
