"""The console: progress lines (redrawn on a terminal, periodic lines in a log), silenced library noise,
and --verbose bringing it back."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from pipeline.util import console


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(console.time, "monotonic", fake)
    return fake


def test_in_a_log_progress_prints_a_line_per_interval_and_one_at_the_end(clock):
    out = io.StringIO()
    bar = console.Progress("[sft] training", 100, "steps", stream=out)
    for step in range(1, 101):
        clock.now += 1.0  # one second a step: 100 s in all, a line every 30 s
        bar.update(step, f"loss {1 / step:.3f}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[sft] training: 30/100 steps (30%), 30s, ETA 1m10s; loss 0.033"
    assert len(lines) == 4 and lines[-1] == "[sft] training: 100/100 steps (100%), 1m40s; loss 0.010"


def test_on_a_terminal_progress_redraws_one_line_in_place(clock):
    out = Terminal()
    with console.Progress("[bon] sampling", 4, "prompts", stream=out) as bar:
        for _ in range(4):
            clock.now += 2
            bar.advance()
    text = out.getvalue()
    assert text.count("\r") == 5 and text.count("\n") == 1  # four redraws and the final line
    assert "ETA 2s" in text and text.rstrip().endswith("[bon] sampling: 4/4 prompts (100%), 8s\x1b[K")


def test_a_resumed_step_leaves_work_done_before_out_of_its_eta(clock):
    bar = console.Progress("[dpo] training", 100, "steps", stream=io.StringIO(), already=50)
    clock.now += 10
    bar.update(60)
    assert "ETA 40s" in bar.line()  # 10 steps in 10 s, 40 to go; not 60 steps in 10 s


def test_quiet_libraries_drops_the_known_noise_and_keeps_real_warnings(monkeypatch, caplog):
    import transformers

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    with warnings.catch_warnings():
        console.quiet_libraries()
        log = transformers.logging.get_logger("transformers.tokenization_utils_base")
        handlers = logging.getLogger("transformers").handlers
        shown = io.StringIO()
        for handler in handlers:
            monkeypatch.setattr(handler, "stream", shown)
        log.warning("Token indices sequence length is longer than the specified maximum sequence length")
        log.warning("a real problem")
        with caplog.at_level(logging.WARNING):
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from x")
            logging.getLogger("bitsandbytes.backends.cpu.ops").error("a real bitsandbytes error")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            console.quiet_early()
            warnings.warn_explicit(
                "old API", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils"
            )
            warnings.warn_explicit("ours", FutureWarning, "x.py", 1, module="pipeline.x")
    assert handlers and "a real problem" in shown.getvalue() and "Token indices" not in shown.getvalue()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("bitsandbytes")] == [
        "a real bitsandbytes error"
    ]
    assert [str(w.message) for w in caught] == ["ours"]


@pytest.mark.slow
def test_verbose_brings_back_what_the_libraries_print(make_recipe, tmp_path):
    from conftest import run_cli

    recipe = make_recipe()
    quiet = run_cli("run", str(recipe), "--output-dir", str(tmp_path / "quiet"))
    loud = run_cli("run", str(recipe), "--output-dir", str(tmp_path / "loud"), "--verbose")
    assert quiet.returncode == 0 and loud.returncode == 0, loud.stderr[-2000:]
    assert "{'loss':" not in quiet.stdout and "[sft] training: 12/12 steps (100%)" in quiet.stdout
    assert "{'loss':" in loud.stdout and "[sft] training: 12/12 steps (100%)" in loud.stdout
