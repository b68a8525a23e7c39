"""Best-of-n selection: pure functions over hand-made candidates (no torch)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from pipeline.rollout.selection import (
    checker_rates,
    degenerate_reason,
    group_candidates,
    pair_row,
    select_best_candidates,
    select_pair_candidates,
    select_top_k_candidates,
    sft_row,
)

from conftest import REPO


def cand(pid, idx, score, response=None, finish="eos", row=None, prompt=None):
    return {
        "prompt_id": pid,
        "prompt": prompt if prompt is not None else f"prompt {pid}",
        "sample_idx": idx,
        "response": f"resp {pid}/{idx}" if response is None else response,
        "score": score,
        "finish_reason": finish,
        "row": {} if row is None else row,
    }


def picks(selected):
    return [(c["prompt_id"], c["sample_idx"]) for c in selected]


def pair_picks(pairs):
    return [(c["prompt_id"], c["sample_idx"], r["sample_idx"]) for c, r in pairs]


def sft_rows(selected):
    """What the bon stage writes to best.jsonl."""
    return [sft_row(c) for c in selected]


def pair_rows(pairs):
    """What the bon stage writes to pairs.jsonl."""
    return [pair_row(c, r) for c, r in pairs]


def test_imports_without_torch():
    code = "import pipeline.rollout.selection, sys; print('torch' in sys.modules or 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


def test_group_preserves_first_appearance_and_sorts_by_sample_idx():
    cs = [cand("b", 1, 0), cand("a", 2, 0), cand("b", 0, 0), cand("a", 0, 0), cand("a", 1, 0)]
    groups = group_candidates(cs)
    assert list(groups) == ["b", "a"]
    assert [c["sample_idx"] for c in groups["a"]] == [0, 1, 2]
    assert [c["sample_idx"] for c in groups["b"]] == [0, 1]


def test_duplicate_prompt_sample_raises():
    with pytest.raises(ValueError, match=r"'p'.*sample_idx=1"):
        group_candidates([cand("p", 1, 0.1), cand("q", 1, 0.1), cand("p", 1, 0.2)])
    with pytest.raises(ValueError, match="duplicate"):
        select_best_candidates([cand("p", 0, 0.1), cand("p", 0, 0.2)])


def test_nan_score_raises_naming_candidate():
    cs = [cand("p", 0, 1.0), cand("q", 3, float("nan"))]
    for fn in (select_best_candidates, select_pair_candidates, lambda c: select_top_k_candidates(c, 2)):
        with pytest.raises(ValueError, match=r"NaN.*'q'.*sample_idx=3"):
            fn(cs)


def test_nan_on_degenerate_candidate_still_raises():
    with pytest.raises(ValueError, match="NaN"):
        select_best_candidates([cand("p", 0, 1.0), cand("p", 1, float("nan"), response="")])


def test_non_numeric_score_raises():
    with pytest.raises(ValueError, match="score"):
        select_best_candidates([cand("p", 0, None)])


def test_degenerate_reason():
    assert degenerate_reason(cand("p", 0, 1, response="")) == "empty"
    assert degenerate_reason(cand("p", 0, 1, response=" \n\t")) == "empty"
    assert degenerate_reason(cand("p", 0, 1, response="ok", finish="length")) == "truncated"
    assert degenerate_reason(cand("p", 0, 1, response="ok")) is None


def test_best_ties_pick_lowest_sample_idx():
    cs = [cand("p", 0, 0.2), cand("p", 1, 0.9), cand("p", 2, 0.9), cand("p", 3, 0.5)]
    sel, stats = select_best_candidates(cs)
    assert picks(sel) == [("p", 1)]
    # Order of input must not matter for the tie-break.
    sel, _ = select_best_candidates(list(reversed(cs)))
    assert picks(sel) == [("p", 1)]
    assert stats["selected"] == 1 and stats["prompts"] == 1 and stats["candidates"] == 4


def test_best_min_score_strict_and_counted():
    cs = [cand("a", 0, 0.5), cand("a", 1, 0.4), cand("b", 0, 0.49), cand("c", 0, 0.7)]
    sel, stats = select_best_candidates(cs, min_score=0.5)
    assert picks(sel) == [("a", 0), ("c", 0)]  # 0.5 is not strictly below 0.5
    assert stats["below_min_score"] == 1
    # Every prompt is accounted for exactly once.
    assert stats["prompts"] == stats["selected"] + stats["below_min_score"] + stats["prompts_without_valid"]


def test_n_equals_one():
    cs = [cand("a", 0, 0.3), cand("b", 0, 0.1)]
    sel, stats = select_best_candidates(cs)
    assert picks(sel) == [("a", 0), ("b", 0)]
    assert stats["incomplete_prompts"] == 0
    pairs, pstats = select_pair_candidates(cs)
    assert pairs == []
    assert pstats["too_few_valid"] == 2 and pstats["selected"] == 0
    assert pstats["mean_margin"] is None


def test_all_equal_scores_no_pair_counted():
    cs = [cand("p", i, 0.5) for i in range(4)] + [cand("q", 0, 1.0), cand("q", 1, 0.0)]
    pairs, stats = select_pair_candidates(cs)
    assert pair_picks(pairs) == [("q", 0, 1)]
    assert stats["equal_scores"] == 1
    assert stats["below_min_margin"] == 0 and stats["too_few_valid"] == 0
    assert stats["mean_margin"] == pytest.approx(1.0)


def test_pair_chosen_best_rejected_worst_with_ties():
    cs = [
        cand("p", 0, 0.1),
        cand("p", 1, 0.9),
        cand("p", 2, 0.1),
        cand("p", 3, 0.9),
        cand("p", 4, 0.5),
    ]
    pairs, _ = select_pair_candidates(list(reversed(cs)))
    # chosen: lowest idx among the max; rejected: lowest idx among the min.
    assert pair_picks(pairs) == [("p", 1, 0)]


def test_margin_filter_drops_and_counts():
    cs = [
        cand("a", 0, 1.0),
        cand("a", 1, 0.0),  # margin 1.0
        cand("b", 0, 0.6),
        cand("b", 1, 0.5),  # margin ~0.1
        cand("c", 0, 0.75),
        cand("c", 1, 0.25),  # margin exactly 0.5 (0.7 - 0.2 is not)
        cand("d", 0, 0.3),
        cand("d", 1, 0.3),  # equal
    ]
    pairs, stats = select_pair_candidates(cs, min_margin=0.5)
    pairs = pair_rows(pairs)
    assert [p["prompt_id"] for p in pairs] == ["a", "c"]
    assert stats["below_min_margin"] == 1
    assert stats["equal_scores"] == 1
    assert stats["mean_margin"] == pytest.approx(0.75)
    assert all(p["margin"] >= 0.5 for p in pairs)
    assert stats["prompts"] == (
        stats["selected"] + stats["too_few_valid"] + stats["equal_scores"] + stats["below_min_margin"]
    )
    # Default min_margin=0 keeps every positive margin, never an equal pair.
    pairs, stats = select_pair_candidates(cs)
    pairs = pair_rows(pairs)
    assert [p["prompt_id"] for p in pairs] == ["a", "b", "c"]
    assert stats["below_min_margin"] == 0 and stats["equal_scores"] == 1


def test_missing_samples_counted_but_used():
    cs = [
        cand("full", 0, 0.1),
        cand("full", 1, 0.2),
        cand("full", 2, 0.3),
        cand("gap", 0, 0.5),
        cand("gap", 2, 0.1),  # sample 1 missing
        cand("short", 0, 0.4),
        cand("short", 1, 0.8),  # sample 2 missing
        cand("noz", 1, 0.3),
        cand("noz", 2, 0.6),  # sample 0 missing
    ]
    sel, stats = select_best_candidates(cs)
    assert stats["incomplete_prompts"] == 3
    assert picks(sel) == [("full", 2), ("gap", 0), ("short", 1), ("noz", 2)]
    pairs, pstats = select_pair_candidates(cs)
    assert pstats["incomplete_prompts"] == 3
    assert pair_picks(pairs) == [("full", 2, 0), ("gap", 0, 2), ("short", 1, 0), ("noz", 2, 1)]


def test_degenerate_never_selected_and_counted_by_reason():
    cs = [
        cand("p", 0, 99.0, response=""),  # best score, but empty
        cand("p", 1, 50.0, response="cut", finish="length"),
        cand("p", 2, 0.3),
        cand("p", 3, 0.2),
        cand("p", 4, -99.0, response="   "),  # worst score, but empty
        cand("p", 5, 0.1),
    ]
    sel, stats = select_best_candidates(cs)
    assert picks(sel) == [("p", 2)]
    assert stats["degenerate"] == {"empty": 2, "truncated": 1}
    top, _ = select_top_k_candidates(cs, k=10)
    assert picks(top) == [("p", 2), ("p", 3), ("p", 5)]
    pairs, pstats = select_pair_candidates(cs)
    assert pair_picks(pairs) == [("p", 2, 5)]
    assert pstats["degenerate"] == {"empty": 2, "truncated": 1}


def test_prompt_with_only_degenerate_candidates():
    cs = [
        cand("bad", 0, 1.0, response=""),
        cand("bad", 1, 0.5, response="x", finish="length"),
        cand("good", 0, 0.2),
        cand("good", 1, 0.1),
    ]
    sel, stats = select_best_candidates(cs)
    assert picks(sel) == [("good", 0)]
    assert stats["prompts_without_valid"] == 1
    assert stats["degenerate"] == {"empty": 1, "truncated": 1}
    pairs, pstats = select_pair_candidates(cs)
    assert pair_picks(pairs) == [("good", 0, 1)]
    assert pstats["prompts_without_valid"] == 1
    assert pstats["too_few_valid"] == 1


def test_shuffled_input_same_selection_order_by_first_appearance():
    rng = random.Random(0)
    cs = [cand(f"p{p}", i, rng.random()) for p in range(6) for i in range(4)]
    best_ref, stats_ref = select_best_candidates(cs)
    top_ref, _ = select_top_k_candidates(cs, k=2)
    pairs_ref, pstats_ref = select_pair_candidates(cs)
    for seed in range(5):
        shuffled = cs[:]
        random.Random(seed).shuffle(shuffled)
        order = list(dict.fromkeys(c["prompt_id"] for c in shuffled))
        best, stats = select_best_candidates(shuffled)
        assert [c["prompt_id"] for c in best] == order
        assert sorted(picks(best)) == sorted(picks(best_ref))
        assert stats == stats_ref
        top, _ = select_top_k_candidates(shuffled, k=2)
        # grouped by prompt (first appearance), then rank
        assert picks(top) == [pc for pid in order for pc in picks(top_ref) if pc[0] == pid]
        pairs, pstats = select_pair_candidates(shuffled)
        assert sorted(pair_picks(pairs)) == sorted(pair_picks(pairs_ref))
        assert [c["prompt_id"] for c, _ in pairs] == order
        assert pstats == pstats_ref


def test_bool_scores():
    cs = [cand("p", 0, False), cand("p", 1, True), cand("p", 2, True)]
    sel = sft_rows(select_best_candidates(cs)[0])
    assert sel[0]["score"] == 1.0 and isinstance(sel[0]["score"], float)
    assert sel[0]["completion"] == "resp p/1"
    pairs, stats = select_pair_candidates(cs)
    pairs = pair_rows(pairs)
    assert len(pairs) == 1
    p = pairs[0]
    assert (p["chosen"], p["rejected"]) == ("resp p/1", "resp p/0")
    assert (p["chosen_score"], p["rejected_score"], p["margin"]) == (1.0, 0.0, 1.0)
    _, stats = select_pair_candidates([cand("q", 0, True), cand("q", 1, True)])
    assert stats["equal_scores"] == 1


def test_top_k_with_min_score():
    cs = [
        cand("a", 0, 0.9),
        cand("a", 1, 0.2),
        cand("a", 2, 0.7),
        cand("a", 3, 0.7),
        cand("b", 0, 0.6),
        cand("b", 1, 0.1),
        cand("b", 2, 0.3),
        cand("c", 0, 0.1),
        cand("c", 1, 0.2),
    ]
    sel, stats = select_top_k_candidates(cs, k=2, min_score=0.5)
    # a: 0.9 then the 0.7 tie -> lowest idx; b: only 0.6 qualifies; c: none
    assert picks(sel) == [("a", 0), ("a", 2), ("b", 0)]
    assert stats["selected"] == 3
    assert stats["below_min_score"] == 3  # b's 2nd slot, both of c's slots
    rows = sft_rows(select_top_k_candidates(cs, k=2)[0])
    assert [r["score"] for r in rows] == [0.9, 0.7, 0.6, 0.3, 0.2, 0.1]


def test_top_k_one_equals_best():
    rng = random.Random(1)
    cs = [cand(f"p{p}", i, round(rng.random(), 1)) for p in range(8) for i in range(3)]
    cs.append(cand("p0", 3, 5.0, response=""))
    for ms in (None, 0.5):
        best, bstats = select_best_candidates(cs, min_score=ms)
        top, tstats = select_top_k_candidates(cs, k=1, min_score=ms)
        assert best == top
        tstats.pop("k")
        assert bstats == tstats


def test_top_k_rejects_bad_k():
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k"):
            select_top_k_candidates([cand("p", 0, 1.0)], k=k)


def test_sft_row_alpaca_shape():
    row = {"instruction": "Add 2 and 3.", "input": "", "output": "reference", "answer": "5", "task": "addition"}
    r = sft_row(cand("p7", 1, 0.8, response="The answer is 5.", row=row))
    assert r == {
        "instruction": "Add 2 and 3.",
        "input": "",
        "output": "The answer is 5.",  # the response, not the row's reference output
        "answer": "5",
        "task": "addition",
        "prompt_id": "p7",
        "score": 0.8,
    }
    assert list(r)[:3] == ["instruction", "input", "output"]
    # input defaults to "" when the row has none
    assert sft_row(cand("q", 0, 1, row={"instruction": "Hi"}))["input"] == ""


def test_sft_row_prompt_completion_shape():
    chat = [{"role": "user", "content": "hello"}]
    r = sft_row(cand("p", 0, True, response="hi!", row={"text": "hello"}, prompt=chat))
    assert r == {"prompt": chat, "completion": "hi!", "prompt_id": "p", "score": 1.0}
    r = sft_row(cand("q", 0, 0.5, response="b", prompt="a"))
    assert r == {"prompt": "a", "completion": "b", "prompt_id": "q", "score": 0.5}


def test_pair_row_fields():
    row = {"instruction": "Opposite of hot?", "input": "x", "output": "ref", "answer": "cold", "task": "opposite"}
    c = cand("p", 2, 0.9, response="The answer is cold.", row=row, prompt="RENDERED")
    r = cand("p", 0, 0.25, response="Ugh. hot", row=row, prompt="RENDERED")
    out = pair_row(c, r)
    assert out == {
        "prompt_id": "p",
        "prompt": "RENDERED",
        "chosen": "The answer is cold.",
        "rejected": "Ugh. hot",
        "chosen_score": 0.9,
        "rejected_score": 0.25,
        "margin": pytest.approx(0.65),
        "instruction": "Opposite of hot?",
        "input": "x",
        "answer": "cold",
        "task": "opposite",
    }
    plain = pair_row(cand("q", 0, 1.0, row={"text": "t"}), cand("q", 1, 0.0, row={"text": "t"}))
    assert set(plain) == {"prompt_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "margin"}
    with pytest.raises(ValueError, match="mixes prompts"):
        pair_row(cand("a", 0, 1.0), cand("b", 0, 0.0))


def test_pair_row_metadata_cannot_override_pair_fields():
    row = {"instruction": "i", "chosen": "evil", "margin": 100}
    out = pair_row(cand("p", 0, 1.0, response="good", row=row), cand("p", 1, 0.0, response="bad", row=row))
    assert out["chosen"] == "good" and out["margin"] == 1.0


def test_selected_candidates_map_to_rows():
    row = {"instruction": "i", "answer": "a"}
    cs = [cand("p", 0, 0.1, row=row), cand("p", 1, 0.9, row=row), cand("q", 0, 0.5)]
    sel, stats = select_best_candidates(cs)
    assert sft_rows(sel) == [
        {"instruction": "i", "input": "", "output": "resp p/1", "answer": "a", "prompt_id": "p", "score": 0.9},
        {"prompt": "prompt q", "completion": "resp q/0", "prompt_id": "q", "score": 0.5},
    ]
    assert stats["selected"] == 2 and "k" not in stats
    cps, _ = select_pair_candidates(cs)
    assert pair_rows(cps) == [
        {
            "prompt_id": "p",
            "prompt": "prompt p",
            "chosen": "resp p/1",
            "rejected": "resp p/0",
            "chosen_score": 0.9,
            "rejected_score": 0.1,
            "margin": 0.9 - 0.1,
            "instruction": "i",
            "input": "",
            "answer": "a",
        }
    ]


def _gold_check(row, response):
    return response == f"The answer is {row['answer']}."


def test_checker_rates_known_numbers():
    rows = {pid: {"instruction": f"q {pid}", "answer": pid.upper()} for pid in "abc"}

    def c(pid, idx, good, **kw):
        resp = f"The answer is {pid.upper()}." if good else "nope"
        return cand(pid, idx, float(good), response=resp, row=rows[pid], **kw)

    cs = [
        c("a", 0, True),
        c("a", 1, False),  # first passes, best passes
        c("b", 0, False),
        c("b", 1, True),  # first fails, best passes
        c("c", 0, False),
        c("c", 1, False),  # nothing passes
    ]
    best, _ = select_best_candidates(cs)
    rates = checker_rates(cs, best, _gold_check)
    assert rates == {"first_sample": 0.3333, "best": 0.6667, "pass_at_n": 0.6667}

    # A prompt without a selected best counts as failing for "best".
    best_hi, _ = select_best_candidates(cs, min_score=2.0)
    assert best_hi == []
    assert checker_rates(cs, best_hi, _gold_check)["best"] == 0.0

    # A degenerate first sample fails even if its text would pass; a
    # degenerate sample never counts toward pass@n.
    cs2 = [c("a", 0, True, finish="length"), c("a", 1, False)]
    best2, _ = select_best_candidates(cs2)
    assert checker_rates(cs2, best2, _gold_check) == {"first_sample": 0.0, "best": 0.0, "pass_at_n": 0.0}


def test_checker_rates_rejects_sft_rows_and_foreign_prompts():
    row = {"instruction": "i", "answer": "A"}
    cs = [cand("a", 0, 1.0, row=row)]
    rows = sft_rows(select_best_candidates(cs)[0])
    with pytest.raises(ValueError, match="not sft rows"):
        checker_rates(cs, rows, _gold_check)
    with pytest.raises(ValueError, match="'zz'"):
        checker_rates(cs, [cand("zz", 0, 1.0)], _gold_check)


def test_check_as_score_is_consistent():
    """With the checker as the score, best-of-n reaches pass@n and every pair
    is (passing, failing)."""
    rng = random.Random(7)
    cs = []
    for p in range(40):
        row = {"instruction": f"q{p}", "input": "", "answer": str(p), "task": "t"}
        n = rng.choice([1, 2, 4])
        for i in range(n):
            roll = rng.random()
            if roll < 0.1:
                resp, finish = "", "eos"
            elif roll < 0.2:
                resp, finish = f"The answer is {p}.", "length"  # passes, but truncated
            elif roll < 0.55:
                resp, finish = f"The answer is {p}.", "eos"
            else:
                resp, finish = "wrong", "eos"
            cand_ = cand(f"p{p}", i, None, response=resp, finish=finish, row=row)
            cand_["score"] = _gold_check(row, resp)  # bool score
            cs.append(cand_)
    rng.shuffle(cs)
    best, _ = select_best_candidates(cs)
    rates = checker_rates(cs, best, _gold_check)
    assert rates["best"] == rates["pass_at_n"]
    assert rates["first_sample"] <= rates["best"]
    pairs, stats = select_pair_candidates(cs)
    assert pairs, "fixture should produce some pairs"
    for chosen, rejected in pairs:
        assert _gold_check(chosen["row"], chosen["response"]) is True
        assert _gold_check(rejected["row"], rejected["response"]) is False
        assert degenerate_reason(chosen) is None and degenerate_reason(rejected) is None
    assert stats["mean_margin"] == 1.0
