"""Preference data: the four adapters, auto-detection, per-row errors naming file and row, the pair linter. No torch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from pipeline.data.preference.formats import PreferencePair, detect_preference_format, load_preference_pairs
from pipeline.data.preference.lint import lint_pairs
from pipeline.data.preference.prepare import pair_to_record
from pipeline.data.sources import Rows, read_file
from pipeline.util.errors import DataError, RecipeError
from pipeline.util.text import MAX_REPORTED

H, A = "\n\nHuman:", "\n\nAssistant:"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(tmp_path, rows, name="prefs.jsonl", **kw):
    """Write rows to a real jsonl file, read it back the way the pipeline does, adapt it."""
    return load_preference_pairs(read_file(write_jsonl(tmp_path / name, rows)), **{"format": "auto", **kw})


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


# ----------------------------------------------------------------------------------------------
# explicit
# ----------------------------------------------------------------------------------------------


def test_explicit_text_pairs_keep_other_columns_as_meta(tmp_path):
    pairs, stats = load(
        tmp_path,
        [
            {
                "prompt": "2+2?",
                "chosen": "4",
                "rejected": "5",
                "prompt_id": "p1",
                "chosen_score": 0.9,
                "rejected_score": 0.1,
                "margin": 0.8,
                "instruction": "2+2?",
                "input": "",
                "answer": "4",
            },
            {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.", "prompt_id": "p2"},
        ],
        format="explicit",
    )
    assert stats["format"] == "explicit" and stats["rows"] == 2 and stats["pairs"] == 2 and stats["dropped"] == {}
    p = pairs[0]
    assert (p.prompt, p.chosen, p.rejected) == ("2+2?", "4", "5")
    assert p.where == f"{tmp_path / 'prefs.jsonl'} row 1 (line 1)"
    assert p.meta == {
        "prompt_id": "p1",
        "chosen_score": 0.9,
        "rejected_score": 0.1,
        "margin": 0.8,
        "instruction": "2+2?",
        "input": "",
        "answer": "4",
    }
    assert not p.conversational
    assert pair_to_record(p) == {"prompt": "2+2?", "chosen": "4", "rejected": "5"}


def test_explicit_with_message_prompt_becomes_conversational(tmp_path):
    pairs, stats = load(
        tmp_path,
        [
            {"prompt": [user("2+2?")], "chosen": "4", "rejected": "5", "prompt_id": "p1", "margin": 1.0},
        ],
    )
    assert stats["format"] == "explicit"
    p = pairs[0]
    assert p.conversational and p.prompt == [user("2+2?")]
    assert pair_to_record(p) == {"prompt": [user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]}
    assert p.meta == {"prompt_id": "p1", "margin": 1.0}


def test_explicit_from_csv(tmp_path):
    path = tmp_path / "prefs.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "chosen", "rejected", "note"])
        w.writerow(["Say hi, politely", "Hello there.", "hi", "x"])
    pairs, stats = load_preference_pairs(read_file(path), "auto")
    assert stats["format"] == "explicit"
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected, pairs[0].meta) == (
        "Say hi, politely",
        "Hello there.",
        "hi",
        {"note": "x"},
    )
    assert pairs[0].where.endswith("prefs.csv row 1 (line 2)")


# ----------------------------------------------------------------------------------------------
# conversational
# ----------------------------------------------------------------------------------------------


def test_conversational_without_prompt_splits_at_the_final_assistant_message(tmp_path):
    history = [{"role": "system", "content": "Be brief."}, user("hi"), bot("hello"), user("2+2?")]
    pairs, stats = load(tmp_path, [{"chosen": history + [bot("4")], "rejected": history + [bot("5")], "id": 7}])
    assert stats["format"] == "conversational"
    p = pairs[0]
    assert p.prompt == history and p.chosen == [bot("4")] and p.rejected == [bot("5")] and p.meta == {"id": 7}
    assert pair_to_record(p) == {"prompt": history, "chosen": [bot("4")], "rejected": [bot("5")]}


def test_conversational_with_prompt_column(tmp_path):
    pairs, _ = load(
        tmp_path,
        [
            {"prompt": [user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]},
            # the prompt repeated in front of each response is taken off
            {"prompt": [user("3+3?")], "chosen": [user("3+3?"), bot("6")], "rejected": [user("3+3?"), bot("7")]},
            # multi-message assistant turns are kept whole
            {"prompt": [user("count")], "chosen": [bot("1"), bot("2")], "rejected": [bot("one")]},
        ],
    )
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ([user("2+2?")], [bot("4")], [bot("5")]),
        ([user("3+3?")], [bot("6")], [bot("7")]),
        ([user("count")], [bot("1"), bot("2")], [bot("one")]),
    ]


def test_conversational_full_transcripts_with_text_prompt_column_ultrafeedback_style(tmp_path):
    pairs, stats = load(
        tmp_path,
        [
            {
                "prompt": "2+2?",
                "prompt_id": "a",
                "chosen": [user("2+2?"), bot("4")],
                "rejected": [user("2+2?"), bot("5")],
                "score_chosen": 9.0,
            }
        ],
    )
    assert stats["format"] == "conversational"
    assert pairs[0].prompt == [user("2+2?")] and pairs[0].chosen == [bot("4")]
    assert pairs[0].meta == {"prompt": "2+2?", "prompt_id": "a", "score_chosen": 9.0}


def test_conversational_prompt_mismatch_is_a_row_error(tmp_path):
    rows = [
        {"chosen": [user("hi"), bot("4")], "rejected": [user("hi"), bot("5")]},
        {"chosen": [user("2+2?"), bot("4")], "rejected": [user("2+3?"), bot("5")]},
    ]
    with pytest.raises(DataError) as err:
        load(tmp_path, rows)
    msg = str(err.value)
    assert f"{tmp_path / 'prefs.jsonl'} row 2 (line 2): prompt mismatch" in msg and "message 0" in msg
    assert "row 1 " not in msg
    pairs, stats = load(tmp_path, rows, on_bad_row="drop")
    assert len(pairs) == 1 and stats["dropped"] == {"prompt_mismatch": 1} and stats["bad_rows"] == 1


# ----------------------------------------------------------------------------------------------
# implicit (Anthropic HH)
# ----------------------------------------------------------------------------------------------


def test_hh_single_turn(tmp_path):
    chosen = f"{H} hi{A} hello, how can I help?"
    rejected = f"{H} hi{A} go away"
    pairs, stats = load(tmp_path, [{"chosen": chosen, "rejected": rejected}])
    assert stats["format"] == "implicit" and stats["split_failures"] == 0
    p = pairs[0]
    assert p.prompt == "\n\nHuman: hi\n\nAssistant:"
    assert p.chosen == "hello, how can I help?" and p.rejected == "go away"
    rec = pair_to_record(p)
    # TRL tokenizes prompt + chosen as one string: the record reproduces the transcript exactly
    assert rec["prompt"] + rec["chosen"] == chosen and rec["prompt"] + rec["rejected"] == rejected


def test_hh_multi_turn_splits_at_the_turn_not_the_character_prefix(tmp_path):
    earlier = f"{H} What is 12+22?{A} Let me think.{H} Just the number please."
    chosen, rejected = f"{earlier}{A} 34", f"{earlier}{A} 35"
    assert os.path.commonprefix([chosen, rejected]).endswith("Assistant: 3")  # the character-prefix trap
    pairs, _ = load(tmp_path, [{"chosen": chosen, "rejected": rejected, "source": "hh"}])
    p = pairs[0]
    assert p.prompt == earlier + A  # keeps all earlier turns, ends with the marker
    assert p.prompt.endswith("\n\nAssistant:") and "Let me think." in p.prompt
    assert (p.chosen, p.rejected) == ("34", "35")
    assert p.meta == {"source": "hh"}


def test_hh_custom_turn_markers(tmp_path):
    pairs, _ = load(
        tmp_path,
        [{"chosen": "\n\nUser: hi\n\nBot: hey", "rejected": "\n\nUser: hi\n\nBot: no"}],
        turn_markers=("\n\nUser:", "\n\nBot:"),
    )
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("\n\nUser: hi\n\nBot:", "hey", "no")


def test_hh_unsplittable_rows_error_with_row_numbers_or_are_dropped_and_counted(tmp_path):
    rows = [
        {"chosen": f"{H} hi{A} hello", "rejected": f"{H} hi{A} bye"},
        {"chosen": f"{H} hi there", "rejected": f"{H} hi there, again"},  # no Assistant turn
        {"chosen": f"{H} a{A} b{H} c{A} d", "rejected": f"{H} a{A} X{H} c{A} e"},  # earlier turns differ
        {"chosen": f"{H} hi{A} hello{H} thanks", "rejected": f"{H} hi{A} bye{H} thanks"},  # ends with Human
    ]
    with pytest.raises(DataError) as err:
        load(tmp_path, rows, name="hh.jsonl")
    msg = str(err.value)
    f = tmp_path / "hh.jsonl"
    assert "3 bad row(s)" in msg and "unsplittable: 3" in msg and "on_bad_row: drop" in msg
    assert f"{f} row 2 (line 2): 'chosen' has no '\\n\\nAssistant:' turn" in msg
    assert f"{f} row 3 (line 3): chosen and rejected differ before their final" in msg
    assert f"{f} row 4 (line 4): 'chosen' ends with a '\\n\\nHuman:' turn" in msg
    pairs, stats = load(tmp_path, rows, name="hh.jsonl", on_bad_row="drop")
    assert len(pairs) == 1 and pairs[0].chosen == "hello"
    assert stats["dropped"] == {"unsplittable": 3} and stats["split_failures"] == 3 and stats["pairs"] == 1


def test_all_rows_dropped_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"no usable preference rows: all 1 row\(s\) were dropped \(unsplittable: 1\)"):
        load(tmp_path, [{"chosen": "no turns", "rejected": "at all"}], on_bad_row="drop")


# ----------------------------------------------------------------------------------------------
# ranked
# ----------------------------------------------------------------------------------------------

RANKED = [
    {"prompt": "Q1", "responses": ["a", "b", "c", "d"], "scores": [3, 1, 3, 2], "prompt_id": 1},
    {"prompt": "Q2", "responses": ["x", "y"], "scores": [0.5, 0.5]},  # all tied
]


@pytest.mark.parametrize(
    "strategy, expected, ties",
    [
        ("best_vs_worst", [("a", "b")], 0 + 1),  # only the all-tied row counts
        ("best_vs_each", [("a", "b"), ("a", "d")], 1 + 1),  # c ties with the best
        ("all_pairs", [("a", "b"), ("a", "d"), ("c", "b"), ("d", "b"), ("c", "d")], 1 + 1),  # (a, c) tied
    ],
)
def test_ranked_strategies_skip_and_count_ties(tmp_path, strategy, expected, ties):
    pairs, stats = load(tmp_path, RANKED, ranked_strategy=strategy)
    assert stats["format"] == "ranked" and stats["ranked_strategy"] == strategy
    assert [(p.chosen, p.rejected) for p in pairs] == expected
    assert stats["skipped_ties"] == ties and stats["rows_without_pairs"] == 1 and stats["pairs"] == len(expected)
    assert all(p.prompt == "Q1" and p.meta["prompt_id"] == 1 for p in pairs)
    assert all(p.meta["chosen_score"] > p.meta["rejected_score"] and p.meta["margin"] > 0 for p in pairs)


def test_ranked_with_message_prompt_and_all_tied_file(tmp_path):
    pairs, _ = load(tmp_path, [{"prompt": [user("Q")], "responses": ["good", "bad"], "scores": [1.0, -1.0]}])
    assert pairs[0].conversational and pairs[0].chosen == [bot("good")] and pairs[0].rejected == [bot("bad")]
    with pytest.raises(DataError, match="scores of every row are tied"):
        load(tmp_path, [RANKED[1]])


# ----------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "explicit"),
        ({"prompt": [user("p")], "chosen": "a", "rejected": "b"}, "explicit"),
        ({"chosen": [user("p"), bot("a")], "rejected": [user("p"), bot("b")]}, "conversational"),
        ({"prompt": [user("p")], "chosen": [bot("a")], "rejected": [bot("b")]}, "conversational"),
        ({"chosen": f"{H} p{A} a", "rejected": f"{H} p{A} b"}, "implicit"),
        ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}, "ranked"),
    ],
)
def test_auto_detection(row, fmt):
    assert detect_preference_format(Rows("mem", [row], ["row 1"]), "auto") == fmt


def test_undetectable_columns_list_what_each_format_needs_and_suggest_a_mapping(tmp_path):
    with pytest.raises(DataError) as err:
        load(tmp_path, [{"question": "q", "preferred": "a", "dispreferred": "b"}], name="odd.jsonl")
    msg = str(err.value)
    assert str(tmp_path / "odd.jsonl") in msg and "(dispreferred, preferred, question)" in msg
    for fmt in ("explicit:", "conversational:", "implicit:", "ranked:"):
        assert fmt in msg
    assert "columns: {prompt: question, chosen: preferred, rejected: dispreferred}" in msg


def test_declared_format_checks_its_columns(tmp_path):
    with pytest.raises(DataError) as err:
        load(tmp_path, [{"prompt": "p", "chosen": "a", "worse": "b"}], format="explicit")
    msg = str(err.value)
    assert "format 'explicit' needs column(s) 'rejected'" in msg and "first row has: chosen, prompt, worse" in msg
    assert "columns: {rejected: worse}" in msg
    with pytest.raises(DataError, match="no 'prompt' column"):
        load(tmp_path, [{"responses": ["a", "b"], "scores": [1, 0]}])


def test_bad_options_are_recipe_errors_naming_the_key(tmp_path):
    """The recipe's Literal types refuse bad preference options before any data is read."""
    from pipeline.config import recipe_from_dict

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    for key, value in (("format", "pairs"), ("ranked_strategy", "best"), ("on_bad_row", "skip"), ("lint", "warn")):
        train = {"path": str(data), "format": value} if key == "format" else {"path": str(data)}
        options = {} if key == "format" else {key: value}
        raw = {"name": "t", "stages": {"reward": {"kind": "reward", "data": {"train": train, **options}}}}
        with pytest.raises(RecipeError) as err:
            recipe_from_dict(raw)
        where = "stages.reward.data.train.format" if key == "format" else f"stages.reward.data.{key}"
        assert where in str(err.value) and repr(value) in str(err.value)


def test_rows_built_directly_without_locations():
    pairs, _ = load_preference_pairs(Rows("mem.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}]), "auto")
    assert pairs[0].where == "mem.jsonl row 1"


# ----------------------------------------------------------------------------------------------
# bad preference files: every message names the file and the row
# ----------------------------------------------------------------------------------------------

GOOD_EXPLICIT = {"prompt": "p", "chosen": "a", "rejected": "b"}
GOOD_CONV = {"chosen": [user("p"), bot("a")], "rejected": [user("p"), bot("b")]}
GOOD_HH = {"chosen": f"{H} p{A} a", "rejected": f"{H} p{A} b"}
GOOD_RANKED = {"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}

BAD_FILES = {
    "missing_rejected": ([GOOD_EXPLICIT, {"prompt": "p", "chosen": "a"}], "'rejected' is missing"),
    "chosen_not_string": (
        [GOOD_EXPLICIT, {"prompt": "p", "chosen": 42, "rejected": "b"}],
        "'chosen' must be a string, got int",
    ),
    "chosen_list_in_explicit": (
        [GOOD_EXPLICIT, {"prompt": "p", "chosen": [bot("a")], "rejected": "b"}],
        "use format conversational",
    ),
    "empty_prompt": ([GOOD_EXPLICIT, {"prompt": "  ", "chosen": "a", "rejected": "b"}], "'prompt' is empty"),
    "empty_messages": (
        [GOOD_CONV, {"chosen": [], "rejected": [user("p"), bot("b")]}],
        "'chosen' is an empty message list",
    ),
    "bad_role": (
        [GOOD_CONV, {"chosen": [{"role": "human", "content": "p"}, bot("a")], "rejected": [user("p"), bot("b")]}],
        "chosen[0].role is 'human'; expected one of system, user, assistant",
    ),
    # ShareGPT {from, value} turns are read as roles: this chosen is a lone human turn
    "sharegpt_messages": (
        [GOOD_CONV, {"chosen": [{"from": "human", "value": "p"}], "rejected": [user("p"), bot("b")]}],
        "the last message of 'chosen' must be the assistant's (role is 'user')",
    ),
    "last_not_assistant": (
        [GOOD_CONV, {"chosen": [user("p"), bot("a"), user("more")], "rejected": [user("p"), bot("b")]}],
        "the last message of 'chosen' must be the assistant's",
    ),
    "chosen_string_in_conversational": (
        [GOOD_CONV, {"chosen": "a", "rejected": [user("p"), bot("b")]}],
        "'chosen' must be a list of {role, content} messages, got str",
    ),
    "only_assistant_no_prompt": (
        [GOOD_CONV, {"chosen": [bot("a")], "rejected": [bot("b")]}],
        "only assistant messages",
    ),
    "prompt_mismatch": (
        [GOOD_CONV, {"chosen": [user("p"), bot("a")], "rejected": [user("q"), bot("b")]}],
        "prompt mismatch",
    ),
    "unsplittable_hh": (
        [GOOD_HH, {"chosen": f"{H} p", "rejected": f"{H} p{A} b"}],
        "'chosen' has no '\\n\\nAssistant:' turn",
    ),
    "hh_chosen_not_string": ([GOOD_HH, {"chosen": None, "rejected": f"{H} p{A} b"}], "'chosen' is missing"),
    "ranked_length_mismatch": (
        [GOOD_RANKED, {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 0]}],
        "'responses' has 3 items but 'scores' has 2",
    ),
    "ranked_non_numeric_score": (
        [GOOD_RANKED, {"prompt": "p", "responses": ["a", "b"], "scores": [1, "high"]}],
        "scores[1] must be a finite number, got str",
    ),
    "ranked_nan_score": (
        [GOOD_RANKED, {"prompt": "p", "responses": ["a", "b"], "scores": [1, float("nan")]}],
        "scores[1] must be a finite number",
    ),
    "ranked_too_few": ([GOOD_RANKED, {"prompt": "p", "responses": ["a"], "scores": [1]}], "a ranking needs at least 2"),
    "ranked_responses_not_list": (
        [GOOD_RANKED, {"prompt": "p", "responses": "a|b", "scores": [1, 0]}],
        "'responses' must be a list of strings, got str",
    ),
    "mixed_shapes": (
        [GOOD_EXPLICIT, {"prompt": [user("p")], "chosen": "a", "rejected": "b"}],
        "this row is conversational but {file} row 1 (line 1) is text",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_preference_files_name_file_and_row(tmp_path, name):
    rows, expected = BAD_FILES[name]
    path = tmp_path / f"{name}.jsonl"
    with pytest.raises(DataError) as err:
        load(tmp_path, rows, name=path.name)
    msg = str(err.value)
    assert f"1 bad row(s) in {path}" in msg
    assert f"{path} row 2 (line 2): " in msg, msg
    assert expected.replace("{file}", str(path)) in msg, msg
    assert "row 1 (line 1): " not in msg  # the good row is not reported
    # the same file with on_bad_row=drop keeps the good row and counts the bad one
    pairs, stats = load(tmp_path, rows, name=path.name, on_bad_row="drop")
    assert len(pairs) == 1 and stats["bad_rows"] == 1 and sum(stats["dropped"].values()) == 1


def test_many_bad_rows_are_reported_up_to_the_limit(tmp_path):
    rows = [GOOD_EXPLICIT] + [{"prompt": "p", "chosen": i, "rejected": "b"} for i in range(MAX_REPORTED + 5)]
    with pytest.raises(DataError) as err:
        load(tmp_path, rows)
    msg = str(err.value)
    assert f"{MAX_REPORTED + 5} bad row(s)" in msg and "... and 5 more" in msg
    assert msg.count("must be a string") == MAX_REPORTED


# ----------------------------------------------------------------------------------------------
# linter
# ----------------------------------------------------------------------------------------------


def pair(prompt, chosen, rejected, n=1):
    return PreferencePair(prompt, chosen, rejected, f"f.jsonl row {n}", {})


def words(x):
    """A toy token counter: words in a string or in the messages' contents."""
    text = x if isinstance(x, str) else " ".join(m["content"] for m in x)
    return len(text.split())


def test_lint_drops_identical_empty_and_overlong_prompt_and_counts_them():
    pairs = [
        pair("q", "good answer", "bad", 1),
        pair("q", "same ", "same", 2),  # identical, ignoring surrounding whitespace
        pair("q", "   ", "bad", 3),  # empty chosen
        pair([user("q")], [bot("ok")], [bot("")], 4),  # empty content
        pair("one two three four five six", "a", "b", 5),  # prompt alone fills max_length
        pair("q", "", "", 6),  # identical and empty: dropped once, counted under both
    ]
    kept, report = lint_pairs(pairs, count_tokens=words, max_length=5)
    assert [p.where for p in kept] == ["f.jsonl row 1"]
    assert report["problems"] == {"identical": 2, "empty_side": 3, "prompt_too_long": 1}
    assert report["pairs"] == 6 and report["kept"] == 1 and report["dropped"] == 5
    assert report["examples"]["identical"] == ["f.jsonl row 2", "f.jsonl row 6"]
    assert report["length_unit"] == "tokens" and report["lengths"]["chosen"]["max"] == 2.0
    json.dumps(report)
    # without a token counter the prompt is not checked and lengths are characters
    kept, report = lint_pairs(pairs[:1] + pairs[4:5], max_length=5)
    assert len(kept) == 2 and report["prompt_length_checked"] is False and report["length_unit"] == "chars"
    assert report["problems"]["prompt_too_long"] == 0


def test_lint_length_stats_and_length_bias_warning():
    pairs = [pair(f"q{i}", "x" * (10 + i), "y" * 5, i) for i in range(1, 9)]
    pairs += [pair("q9", "short", "much longer", 9), pair("q10", "equal", "EQUAL", 10)]
    kept, report = lint_pairs(pairs)
    assert len(kept) == 10 and report["length_unit"] == "chars"
    assert report["chosen_longer_fraction"] == 0.8 and report["rejected_longer_fraction"] == 0.1
    assert report["lengths"]["rejected"] == {"min": 5.0, "p50": 5.0, "p90": 5.0, "p99": 11.0, "max": 11.0, "mean": 5.6}
    assert report["lengths"]["chosen"]["min"] == 5.0 and report["lengths"]["chosen"]["max"] == 18.0
    assert any("chosen is longer than the other response in 80% of pairs" in w for w in report["warnings"])
    # few pairs: no warning from noise
    _, small = lint_pairs(pairs[:3])
    assert small["chosen_longer_fraction"] == 1.0 and small["warnings"] == []


def test_lint_counts_duplicates_and_contradictions():
    pairs = [pair("q", "a", "b", 1), pair("q", "a", "b", 2), pair("q", "b", "a", 3), pair("r", "a", "b", 4)]
    _, report = lint_pairs(pairs)
    assert report["duplicates"] == 1 and report["contradictions"] == 3


def test_lint_error_action_names_rows_and_fix():
    pairs = [pair("q", "a", "b", 1), pair("q", "same", "same", 2), pair("q", "a", "", 3)]
    with pytest.raises(DataError) as err:
        lint_pairs(pairs, action="error")
    msg = str(err.value)
    assert "2 of 3 preference pair(s) fail the pair checks" in msg
    assert "f.jsonl row 2: chosen and rejected are identical" in msg
    assert "f.jsonl row 3: rejected is empty" in msg
    assert "set the lint action to drop" in msg and "f.jsonl row 1:" not in msg
    kept, _ = lint_pairs(pairs[:1], action="error")  # clean data passes
    assert len(kept) == 1


def test_lint_with_nothing_left_is_an_error():
    with pytest.raises(DataError, match="no preference pairs left"):
        lint_pairs([pair("q", "a", "a")])


def test_loaded_hh_pairs_lint_and_convert_end_to_end(tmp_path):
    pairs, _ = load(
        tmp_path,
        [
            {"chosen": f"{H} hi{A} hello", "rejected": f"{H} hi{A} hello"},
            {"chosen": f"{H} 2+2?{A} 4", "rejected": f"{H} 2+2?{A} 5"},
        ],
    )
    kept, report = lint_pairs(pairs)
    assert report["problems"]["identical"] == 1 and report["examples"]["identical"] == [
        f"{tmp_path / 'prefs.jsonl'} row 1 (line 1)"
    ]
    assert [pair_to_record(p) for p in kept] == [{"prompt": f"{H} 2+2?{A}", "chosen": " 4", "rejected": " 5"}]


def test_module_does_not_import_torch():
    code = "import sys, pipeline.data.preference.prepare; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__))
    )
    assert out.returncode == 0, out.stderr
