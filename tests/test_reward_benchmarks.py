"""Preference benchmarks of the reward stage (``benchmarks:``, RewardBench's layout): the loader and its errors,
the per-subset accuracy, the gate on a benchmark, the config (hash kept when unset), the built-in tiny benchmark,
and one end-to-end CLI run on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from pipeline.builtin import reward_bench, tasks
from pipeline.config import DataSource, load_recipe
from pipeline.data.preference.benchmarks import accuracy_by_subset, load_benchmark
from pipeline.run.manifest import stage_hash
from pipeline.stages import reward
from pipeline.util.errors import DataError, GateFailed, RecipeError

from conftest import REPO, TINY, run_cli

DEMO = REPO / "recipes" / "demo.yaml"
TINY_BENCH = TINY / "reward_bench.jsonl"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def row(prompt="What is 2 plus 3?", chosen="The answer is 5.", rejected="5", **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def load(path: Path, template: str = "none", **source):
    return load_benchmark("bench", DataSource(path=str(path), **source), template, "benchmarks.bench")


# --------------------------------------------------------------------------------------------
# Loading and checking benchmark files
# --------------------------------------------------------------------------------------------


def test_rewardbench_rows_are_read_with_subsets_and_rendered_like_training_prompts(tmp_path):
    rows = [
        row(subset="easy", id=0, chosen_model="a", rejected_model="b"),  # RewardBench's extra columns are ignored
        row(
            prompt="Name the capital city of Peru.", chosen="The answer is Lima.", rejected="Lima", subset="hard", id=1
        ),
        row(prompt="Add 1 and 1.", chosen="The answer is 2.", rejected="2.", subset="easy", id=2),
    ]
    path = write_jsonl(tmp_path / "bench.jsonl", rows)
    as_written = load(path)
    assert as_written.subsets == ["easy", "hard", "easy"] and as_written.source == str(path)
    assert as_written.records[1] == {
        "prompt": "Name the capital city of Peru.",
        "chosen": "The answer is Lima.",
        "rejected": "Lima",
    }
    chat = load(path, "chat").records[0]  # one user turn, as a chat-template stage renders its training prompts
    assert chat["prompt"] == [{"role": "user", "content": "What is 2 plus 3?"}]
    assert chat["chosen"] == [{"role": "assistant", "content": "The answer is 5."}]
    alpaca = load(path, "alpaca").records[0]["prompt"]
    assert alpaca.startswith("Below is an instruction") and alpaca.endswith("What is 2 plus 3?\n\n### Response:")


def test_parquet_and_column_mapping_and_limit(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"q{i}", "chosen": "good", "rejected": "bad", "category": "c"} for i in range(5)]
    path = tmp_path / "bench.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    bench = load(path, columns={"prompt": "question", "subset": "category"}, limit=3)
    assert [r["prompt"] for r in bench.records] == ["q0", "q1", "q2"] and bench.subsets == ["c"] * 3


def test_a_file_without_a_subset_column_is_one_subset_named_all(tmp_path):
    bench = load(write_jsonl(tmp_path / "b.jsonl", [row(), row(prompt="Add 1 and 1.")]))
    assert bench.subsets == ["all", "all"]


def test_bad_rows_are_one_error_naming_the_file_each_row_and_key(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            row(subset="s", id=1),
            {"prompt": "p", "chosen": "c", "subset": "s"},  # no rejected
            row(rejected="The answer is 5.", subset="s"),  # chosen == rejected
            row(),  # no subset while the others have one
            row(chosen=["not", "text"], subset="s"),
            row(subset="s", id=1),  # the id of row 1 again
            row(subset=""),
        ],
    )
    with pytest.raises(DataError) as err:
        load(path)
    text = str(err.value)
    assert text.startswith(f"benchmarks.bench: 6 bad row(s) in {path}; fix or remove them")
    assert f"{path} row 2 (line 2): 'rejected' is missing" in text
    assert f"{path} row 3 (line 3): 'chosen' and 'rejected' are the same text" in text
    assert f"{path} row 4 (line 4): 'subset' is missing while other rows have one" in text
    assert f"{path} row 5 (line 5): 'chosen' must be a string, got list" in text
    assert f"{path} row 6 (line 6): 'id' 1 repeats the id of {path} row 1 (line 1)" in text
    assert f"{path} row 7 (line 7): 'subset' must be a non-empty name" in text
    assert f"\n  {path} row 1 (line 1):" not in text  # the good row is not listed


def test_an_empty_file_or_a_missing_column_is_one_error_with_the_fix(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"^benchmarks\.bench: .*empty\.jsonl: no rows; a benchmark needs at least"):
        load(empty)
    renamed = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}] * 3)
    with pytest.raises(DataError) as err:
        load(renamed)
    assert "q.jsonl has no 'prompt' column" in str(err.value) and "columns: {prompt: question}" in str(err.value)
    assert str(err.value).count("\n") == 0  # one line, not one complaint per row


# --------------------------------------------------------------------------------------------
# Accuracy per subset, scoring, the table
# --------------------------------------------------------------------------------------------


def test_accuracy_overall_and_per_subset_in_the_order_subsets_appear():
    got = accuracy_by_subset(["b", "a", "b", "b", "a"], [True, False, True, False, False])
    assert got == {
        "pairs": 5,
        "accuracy": 0.4,
        "subsets": {"b": {"pairs": 3, "accuracy": 0.6667}, "a": {"pairs": 2, "accuracy": 0.0}},
    }
    assert list(got["subsets"]) == ["b", "a"]
    with pytest.raises(ValueError):
        accuracy_by_subset(["a"], [True, False])


class LengthScorer:
    """A stand-in reward model: shorter responses score higher; tokens are characters."""

    def __init__(self, model=None, tokenizer=None, name="length", max_length=None):
        self.model, self.tokenizer, self.name, self.max_length = model, tokenizer, name, max_length

    def encode(self, prompt, response):
        text = (prompt if isinstance(prompt, str) else prompt[0]["content"]) + response
        return list(text)[: self.max_length] if self.max_length else list(text)

    def score(self, items):
        return [-float(len(item["response"])) for item in items]


def test_the_tiny_benchmark_scored_through_the_stage_scorer_gives_each_subsets_accuracy():
    rows = [json.loads(line) for line in TINY_BENCH.read_text().splitlines()]
    bench = load_benchmark("tiny", DataSource(path=str(TINY_BENCH)), "chat", "benchmarks.tiny")
    result = reward.score_benchmark(LengthScorer(max_length=40), bench)
    expected: dict[str, list[bool]] = {}
    for r in rows:  # ties (same length) count as wrong
        expected.setdefault(r["subset"], []).append(len(r["chosen"]) < len(r["rejected"]))
    assert list(result["subsets"]) == ["chatter", "rude", "format", "correctness"]
    for subset, wins in expected.items():
        assert result["subsets"][subset] == {"pairs": 50, "accuracy": round(sum(wins) / 50, 4)}, subset
    assert result["subsets"]["chatter"]["accuracy"] == 1.0 and result["subsets"]["correctness"]["accuracy"] < 0.5
    assert result["pairs"] == 200 and result["accuracy"] == round(sum(sum(w) for w in expected.values()) / 200, 4)
    cut = sum(max(len(r["prompt"] + r["chosen"]), len(r["prompt"] + r["rejected"])) > 40 for r in rows)
    assert 0 < cut < 200 and result["truncated"] == cut
    assert reward.truncation_warnings("reward", {"tiny": result}, 40)[0].startswith(
        f"[reward] benchmark 'tiny': {cut} of 200 pairs are longer than data.max_length=40 tokens"
    )


def test_the_report_table_lists_held_out_then_each_benchmark_overall_and_per_subset():
    metrics = {
        "heldout_pairs": 40,
        "heldout_accuracy": 0.925,
        "benchmarks": {
            "tiny": accuracy_by_subset(["x", "y", "y"], [True, True, False]),
            "flat": accuracy_by_subset(["all", "all"], [True, False]),
        },
    }
    title, rows = reward.tables(metrics, True)["benchmarks"]
    assert "preference benchmarks" in title
    assert rows == [
        ["benchmark", "subset", "pairs", "accuracy"],
        ["held_out", "all", "40", "0.925"],
        ["tiny", "all", "3", "0.667"],
        ["tiny", "x", "1", "1.000"],
        ["tiny", "y", "2", "0.500"],
        ["flat", "all", "2", "0.500"],
    ]
    assert reward.tables({"heldout_accuracy": 0.9}, True) == {}  # no benchmarks: the report is as before


# --------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------

SCORED = {
    "heldout_pairs": 40,
    "heldout_accuracy": 0.95,
    "benchmarks": {"tiny": accuracy_by_subset(["style"] * 3 + ["correct"] * 2, [True] * 3 + [False, True])},
}


def test_a_benchmark_gate_passes_at_or_above_its_threshold():
    reward.check_gate({"held_out": 0.9, "tiny": 0.8}, SCORED)  # tiny: 0.8 exactly
    reward.check_gate({"tiny": 0.5}, SCORED)
    reward.check_gate(0.9, SCORED)  # a number gates the held-out pairs only


def test_a_benchmark_gate_below_its_threshold_fails_with_the_subsets():
    with pytest.raises(GateFailed) as err:
        reward.check_gate({"held_out": 0.9, "tiny": 0.81}, SCORED)
    text = str(err.value)
    assert "quality gate: benchmark 'tiny' accuracy 0.800 is below min_accuracy.tiny 0.81" in text
    assert "(5 pairs; by subset: style 1.000, correct 0.500)" in text and "held-out" not in text
    assert err.value.metrics is SCORED  # what was measured goes to the manifest
    with pytest.raises(GateFailed) as both:
        reward.check_gate({"held_out": 0.99, "tiny": 0.9}, SCORED)
    assert "held-out pairwise accuracy 0.950 is below min_accuracy.held_out 0.99" in str(both.value)
    assert "benchmark 'tiny' accuracy 0.800 is below min_accuracy.tiny 0.9" in str(both.value)
    with pytest.raises(GateFailed, match="below min_accuracy 0.99 \\(40 pairs\\)"):  # the number form, as before
        reward.check_gate(0.99, SCORED)


# --------------------------------------------------------------------------------------------
# The recipe: fields, errors, hashes, templates
# --------------------------------------------------------------------------------------------


def demo_with(tmp_path: Path, reward_stage: dict) -> Path:
    """The demo recipe, copied beside its data paths' new base, with the reward stage's settings updated."""
    raw = yaml.safe_load(DEMO.read_text())
    for stage in raw["stages"].values():  # keep the data paths pointing at the repository's files
        for key in ("data", "prompts"):
            block = stage.get(key)
            for source in [block, *(block or {}).values()] if isinstance(block, dict) else []:
                if isinstance(source, dict) and str(source.get("path", "")).startswith("../"):
                    source["path"] = str((DEMO.parent / source["path"]).resolve())
    raw["stages"]["reward"].pop("benchmarks", None)  # the demo's own; a test names the ones it wants
    raw["stages"]["reward"].update(reward_stage)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_unset_benchmarks_leave_the_demo_reward_stage_dump_and_hash_as_before(tmp_path):
    recipe = load_recipe(demo_with(tmp_path, {}))  # the demo's reward stage without its benchmark
    dumped = recipe.stages["reward"].model_dump(mode="json")
    assert "benchmarks" not in dumped and dumped["min_accuracy"] == 0.9
    assert "benchmarks" not in recipe.resolved_dict()["stages"]["reward"]
    assert "benchmarks" in load_recipe(DEMO).stages["reward"].model_dump(mode="json")  # the demo scores one


def test_benchmark_paths_are_relative_to_the_recipe_and_their_content_is_in_the_stage_hash(tmp_path):
    bench = write_jsonl(tmp_path / "bench.jsonl", [row(subset="s")])
    recipe = load_recipe(demo_with(tmp_path, {"benchmarks": {"mine": "bench.jsonl"}}))
    assert recipe.stages["reward"].benchmarks["mine"].path == str(bench)
    before = stage_hash(recipe, "reward", {})
    write_jsonl(bench, [row(subset="s", rejected="No.")])
    assert stage_hash(recipe, "reward", {}) != before  # a changed benchmark file reruns the stage


def test_template_of_benchmark_prompts_follows_the_stage_training_prompts(tmp_path):
    demo = load_recipe(DEMO)
    assert reward.benchmark_template(demo, demo.stages["reward"]) == "chat"  # pairs_from label <- sft's chat
    local = load_recipe(demo_with(tmp_path, {"pairs_from": None, "data": {"train": {"path": str(TINY_BENCH)}}}))
    assert reward.benchmark_template(local, local.stages["reward"]) == "none"
    alpaca = load_recipe(
        demo_with(tmp_path, {"pairs_from": None, "data": {"train": {"path": str(TINY_BENCH)}, "template": "alpaca"}})
    )
    assert reward.benchmark_template(alpaca, alpaca.stages["reward"]) == "alpaca"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"benchmarks": {"tiny": str(TINY_BENCH)}, "min_accuracy": {"held_out": 0.9, "tiyn": 0.7}},
            "stages.reward.min_accuracy: key 'tiyn' names no benchmark (did you mean 'tiny'?)",
        ),
        ({"min_accuracy": {"heldout": 0.9}}, "key 'heldout' names no benchmark (did you mean 'held_out'?)"),
        ({"min_accuracy": {"held_out": 1.5}}, "stages.reward.min_accuracy: 1.5 (key 'held_out') is not an accuracy"),
        ({"min_accuracy": "high"}, "stages.reward.min_accuracy: give a number (gates the held-out pairs) or a mapping"),
        ({"benchmarks": {"held_out": str(TINY_BENCH)}}, "stages.reward.benchmarks.held_out: 'held_out' is the"),
        ({"benchmarks": {"my.bench": str(TINY_BENCH)}}, "stages.reward.benchmarks.my.bench: a benchmark name is"),
        ({"benchmarks": {"b": {"from_stage": "label"}}}, "stages.reward.benchmarks.b: a benchmark is a file"),
        ({"benchmarks": {"b": {"path": str(TINY_BENCH), "weight": 1}}}, "a benchmark is scored whole"),
    ],
)
def test_recipe_mistakes_in_benchmarks_and_gates_name_the_key(tmp_path, settings, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(demo_with(tmp_path, settings))
    assert message in str(err.value)


def test_validate_reports_a_bad_benchmark_file_once_with_file_row_and_key(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [row(subset="s"), {"prompt": "p", "chosen": "c", "subset": "s"}])
    out = run_cli("validate", str(DEMO), "--set", f"stages.reward.benchmarks.mine={bad}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "stages.reward: benchmarks.mine: 1 bad row(s) in" in out.stderr
    assert f"{bad} row 2 (line 2): 'rejected' is missing" in out.stderr
    good = run_cli("validate", str(DEMO), "--set", f"stages.reward.benchmarks.tiny={TINY_BENCH}")
    assert good.returncode == 0, good.stderr


# --------------------------------------------------------------------------------------------
# The built-in benchmark
# --------------------------------------------------------------------------------------------


def test_shipped_tiny_benchmark_matches_a_fresh_generation_and_is_what_it_says(tmp_path):
    path, n = reward_bench.write_benchmark(tmp_path)
    assert path.read_bytes() == TINY_BENCH.read_bytes() and n == 200
    rows = [json.loads(line) for line in TINY_BENCH.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(200))
    assert {s: sum(r["subset"] == s for r in rows) for s in reward_bench.SUBSETS} == dict.fromkeys(
        reward_bench.SUBSETS, 50
    )
    trained = {
        reward_bench.prompt_text(r) for r in tasks.generate_rows(*tasks.SPLITS["prompts_label.jsonl"][:2], styled=False)
    }
    assert not trained & {r["prompt"] for r in rows}  # no prompt the demo's reward model trains on
    for r in rows:
        gold = {"answer": tasks.extract_answer(r["chosen"])}
        assert tasks.preferred(gold, r["chosen"]) and not tasks.preferred(gold, r["rejected"])
        assert tasks.answer_correct(gold, r["rejected"]) == (r["subset"] != "correctness")


# --------------------------------------------------------------------------------------------
# End to end: the real CLI on the tiny model
# --------------------------------------------------------------------------------------------


def style_pairs(path: Path, n: int) -> Path:
    """Plain-text prompts from the label split: the preferred style against the flaws in turn."""
    rows = [json.loads(line) for line in (TINY / "prompts_label.jsonl").read_text().splitlines()][:n]
    flaws = ("chatter", "rude", "bare", "repeat", "no_period", "lowercase")
    pairs = [
        row(
            reward_bench.prompt_text(r), tasks.render("preferred", r["answer"]), tasks.render(flaws[i % 6], r["answer"])
        )
        for i, r in enumerate(rows)
    ]
    return write_jsonl(path, pairs)


@pytest.mark.slow
def test_cli_run_scores_the_benchmark_gates_on_it_and_reports_each_subset(make_recipe, tmp_path):
    stage = {
        "kind": "reward",
        "data": {"train": {"path": str(style_pairs(tmp_path / "pairs.jsonl", 160))}, "template": "chat"},
        "benchmarks": {"tiny": str(TINY_BENCH)},
        "min_accuracy": {"held_out": 0.5, "tiny": 0.99},  # no 1M model verifies answers: correctness fails it
        "train": {"learning_rate": 1e-3, "max_steps": 30, "batch_size": 8, "save_steps": 30, "precision": "fp32"},
    }
    data = yaml.safe_load(make_recipe().read_text())
    data["stages"] = {"reward": stage, "after": data["stages"]["sft"]}  # a later stage: must not start
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    run_dir = tmp_path / "run"

    failed = run_cli("run", str(recipe), "--output-dir", str(run_dir))
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert (
        "quality gate: benchmark 'tiny' accuracy" in failed.stderr and "below min_accuracy.tiny 0.99" in failed.stderr
    )
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["reward"]
    assert entry["status"] == "failed" and "after" not in json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert (Path(entry["outputs"]["model"]["path"]) / "config.json").is_file()  # the trained model is kept
    kept = json.loads((run_dir / "reward" / "metrics.json").read_text())["benchmarks"]["tiny"]
    assert kept["pairs"] == 200 and kept["accuracy"] < 0.99

    passed = run_cli(
        "run",
        str(recipe),
        "--output-dir",
        str(run_dir),
        "--stages",
        "reward",
        "--set",
        "stages.reward.min_accuracy.tiny=0.6",
    )
    assert passed.returncode == 0, passed.stderr[-3000:]
    tiny = json.loads((run_dir / "reward" / "metrics.json").read_text())["benchmarks"]["tiny"]
    subsets = tiny["subsets"]
    assert list(subsets) == ["chatter", "rude", "format", "correctness"] and tiny["truncated"] == 0
    assert all(s["pairs"] == 50 for s in subsets.values())
    assert subsets["chatter"]["accuracy"] >= 0.9 and subsets["rude"]["accuracy"] >= 0.9  # the styles it trained on
    assert tiny["accuracy"] == round(sum(s["accuracy"] for s in subsets.values()) / 4, 4)  # equal-size subsets
    report = (run_dir / "report.md").read_text()
    assert "## Reward model on preference benchmarks" in report
    for name, s in subsets.items():
        assert f"| tiny | {name} | 50 | {s['accuracy']:.3f} |" in report
    assert re.search(rf"^tiny\s+all\s+200\s+{tiny['accuracy']:.3f}$", passed.stdout, re.M)  # the console's table
