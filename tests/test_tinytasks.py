"""Tests for pipeline.builtin.tasks (stdlib only, fast)."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from pipeline.builtin import tasks as tt

DATA = Path(__file__).resolve().parent.parent / "data" / "tiny"
ROW = {"answer": "8"}
CAP = {"answer": "Paris", "task": "capital"}


def test_deterministic_by_seed():
    assert tt.generate_rows(300, 7) == tt.generate_rows(300, 7)
    assert tt.generate_rows(300, 7) != tt.generate_rows(300, 8)
    # Unstyled rows share the prompts of styled rows with the same seed.
    styled, plain = tt.generate_rows(200, 5), tt.generate_rows(200, 5, styled=False)
    strip = lambda r: {k: v for k, v in r.items() if k != "output"}
    assert [strip(r) for r in styled] == [strip(r) for r in plain]


def test_row_schema_and_tasks():
    rows = tt.generate_rows(1000, 0)
    for r in rows:
        assert set(r) == {"instruction", "input", "output", "task", "answer"}
        assert all(isinstance(v, str) for v in r.values())
        assert r["instruction"] and r["answer"]
    assert set(Counter(r["task"] for r in rows)) == set(tt.TASKS)
    for r in rows:
        if r["task"] == "addition":
            assert 0 <= int(r["answer"]) <= 18
        elif r["task"] == "word_count":
            assert 2 <= int(r["answer"]) <= 6
            sentence = r["input"] or r["instruction"]
            assert any(
                len(s.split()) == int(r["answer"])
                for s in [r["input"], sentence.split('"')[1] if '"' in sentence else sentence.split(": ", 1)[-1]]
            )
        elif r["task"] == "capital":
            assert r["answer"] in tt.CAPITALS.values() and r["answer"].isascii()
        else:
            assert r["answer"] in tt.OPPOSITES.values()


def test_shipped_files_match_fresh_generation(tmp_path):
    counts = tt.write_splits(tmp_path)
    assert counts == {name: n for name, (n, _, _) in tt.SPLITS.items()}
    assert counts == {
        "sft_train.jsonl": 4000,
        "sft_eval.jsonl": 200,
        "prompts_label.jsonl": 1000,
        "prompts_bon.jsonl": 1000,
        "prompts_eval.jsonl": 400,
    }
    for name, n in counts.items():
        fresh = (tmp_path / name).read_bytes()
        assert (DATA / name).read_bytes() == fresh, name
        lines = fresh.decode("utf-8").split("\n")
        assert lines[-1] == "" and len(lines) == n + 1
        assert b"\r" not in fresh
    # A second call is byte-identical too.
    again = tmp_path / "again"
    tt.write_splits(again)
    for name in counts:
        assert (again / name).read_bytes() == (tmp_path / name).read_bytes()


def _load(name):
    return [json.loads(line) for line in (DATA / name).read_text("utf-8").splitlines()]


def test_style_frequencies():
    rows = tt.generate_rows(4000, 0)
    styles = Counter(tt.classify_style(r, r["output"]) for r in rows)
    assert None not in styles
    for style, p in tt.STYLE_PROBS.items():
        tol = max(0.01, 4 * math.sqrt(p * (1 - p) / len(rows)))
        assert abs(styles[style] / len(rows) - p) < tol, (style, styles[style])
    assert set(tt.STYLE_PROBS) == {"preferred", "chatter", "bare", "rude", "repeat", "no_period", "lowercase"}
    assert sum(tt.STYLE_PROBS.values()) == pytest.approx(1.0)


def test_both_template_variants_present():
    for name in tt.SPLITS:
        rows = _load(name)
        frac_empty = sum(r["input"] == "" for r in rows) / len(rows)
        assert 0.35 < frac_empty < 0.65, (name, frac_empty)
    rows = tt.generate_rows(1000, 0)
    for task in tt.TASKS:
        kinds = {r["input"] == "" for r in rows if r["task"] == task}
        assert kinds == {True, False}, task


def test_sft_outputs_correct():
    for name in ("sft_train.jsonl", "sft_eval.jsonl"):
        for r in _load(name):
            assert tt.answer_correct(r, r["output"]), r


def test_prompt_outputs_preferred():
    for name in ("prompts_label.jsonl", "prompts_bon.jsonl", "prompts_eval.jsonl"):
        for r in _load(name):
            assert tt.preferred(r, r["output"]), r
            assert tt.preferred_style(r, r["output"])
            assert tt.answer_correct(r, r["output"])


@pytest.mark.parametrize(
    "response, correct, pref, style",
    [
        ("The answer is 8.", True, True, True),
        ("  The answer is 8.\n", True, True, True),  # surrounding whitespace ok
        ("The answer is 9.", False, False, True),  # wrong number, right style
        ("The answer is 18.", False, False, True),  # not a prefix match
        ("The answer is 8. Anyway, whatever.", True, False, False),  # chatter
        ("the answer is 8.", True, False, False),  # lowercase
        ("The answer is 8", True, False, False),  # missing period
        ("The answer is 8. The answer is 8.", True, False, False),  # repetition
        ("The answer is 8. The answer is 9.", True, False, False),  # first statement counts
        ("8", True, False, False),  # bare answer
        ("8.", True, False, False),
        ("9", False, False, False),
        ("Ugh. The answer is 8.", True, False, False),  # rude prefix
        ("Seriously? The answer is 9.", False, False, False),
        ("The answer is: 8.", True, False, False),
        ("The answer is", False, False, False),
        ("", False, False, False),  # empty response
        ("   ", False, False, False),
    ],
)
def test_checkers_number(response, correct, pref, style):
    assert tt.answer_correct(ROW, response) is correct
    assert tt.preferred(ROW, response) is pref
    assert tt.preferred_style(ROW, response) is style


@pytest.mark.parametrize(
    "response, correct, pref, style",
    [
        ("The answer is Paris.", True, True, True),
        ("The answer is paris.", True, False, True),  # gold capitalisation required
        ("the answer is paris.", True, False, False),
        ("The answer is Rome.", False, False, True),
        ("Paris", True, False, False),
        ("Paris. Anyway, whatever.", True, False, False),
        ('The answer is "Paris".', True, False, False),
        ("The answer is Parisian.", False, False, True),
        ("Obviously. The answer is Paris.", True, False, False),
    ],
)
def test_checkers_word(response, correct, pref, style):
    assert tt.answer_correct(CAP, response) is correct
    assert tt.preferred(CAP, response) is pref
    assert tt.preferred_style(CAP, response) is style


def test_checkers_registry_and_extra_keys():
    assert set(tt.CHECKERS) == {"answer_correct", "preferred", "preferred_style"}
    row = {"answer": "cold", "task": "opposite", "instruction": "x", "extra": 1}
    for fn in tt.CHECKERS.values():
        assert fn(row, "The answer is cold.") is True
    assert tt.extract_answer("The answer is 10. Anyway") == "10"
    assert tt.extract_answer("") is None


def test_render_roundtrip():
    for style in tt.STYLE_PROBS:
        out = tt.render(style, "Paris")
        assert tt.answer_correct(CAP, out)
        assert tt.classify_style(CAP, out) == style
        assert tt.preferred(CAP, out) is (style == "preferred")
    with pytest.raises(ValueError):
        tt.render("nope", "x")
