"""eval.examples: a few held-out prompts with every policy's response, checker results and reward side by side in
report.md -- the prompts where the policies disagree most first, then a seeded random choice -- with prompts and
responses shown verbatim whatever they contain (newlines, pipes, backticks, HTML, markdown)."""

from __future__ import annotations

import html
import json
import re

import pytest
import yaml

from pipeline.config import load_recipe
from pipeline.data.prompts import PromptRecord
from pipeline.observe import report
from pipeline.run.manifest import stage_hash
from pipeline.stages import eval_examples

from conftest import BASE_RECIPE, TINY, merge, run_cli

TRICKY = (
    "line one | with a pipe\n`code | span` and ```fence```\n<think>*not bold*</think> _x_ snake_case_ [link](u) "
    "$5 #3 \\ end"
)


def record(i: int, instruction: str | None = None) -> PromptRecord:
    row = {"instruction": instruction or f"Question {i}?", "input": ""}
    return PromptRecord(f"p{i}", f"### Instruction:\n{row['instruction']}\n\n### Response:", row)


def rows_for(prompts, policies: dict[str, callable]) -> list[dict]:
    """responses.jsonl rows: ``policies`` maps a policy to fn(i) -> (response, checks, reward)."""
    rows = []
    for name, make in policies.items():
        for i, p in enumerate(prompts):
            response, checks, reward = make(i)
            rows.append({"policy": name, "prompt_id": p.prompt_id, "response": response, "checks": checks} | reward)
    return rows


# ------------------------------------------------------------------------------------------------
# Which prompts are shown
# ------------------------------------------------------------------------------------------------


def test_disagreements_come_first_then_a_seeded_random_choice():
    prompts = [record(i) for i in range(20)]
    same = lambda i: ("The answer is 4.", {"correct": True}, {"reward": 0.0})  # noqa: E731
    # p7: the checkers disagree; p3: same verdicts but the largest reward spread; p11: a smaller spread
    differs = {
        7: ("The answer is 5.", {"correct": False}, {"reward": 0.0}),
        3: ("The answer is 4!", {"correct": True}, {"reward": 3.0}),
        11: ("The answer is 4?", {"correct": True}, {"reward": 1.0}),
    }
    rows = rows_for(prompts, {"sft": same, "dpo": lambda i: differs.get(i, same(i))})
    picked = eval_examples.pick(prompts, rows, 4, seed=0)
    assert [e["prompt_id"] for e in picked[:2]] == ["p7", "p3"]
    assert picked[0]["why"] == "checkers differ: correct" and picked[1]["why"] == "reward spread 3.00"
    assert all(e["why"] == "random pick (seed 0)" for e in picked[2:])
    assert len({e["prompt_id"] for e in picked}) == 4
    # the random part is fixed by the seed, and moves with it
    assert eval_examples.pick(prompts, rows, 4, seed=0) == picked
    others = {tuple(e["prompt_id"] for e in eval_examples.pick(prompts, rows, 4, seed=s)[2:]) for s in range(6)}
    assert len(others) > 1
    # every policy's response, verdicts and reward, in the order evaluated
    assert picked[0]["responses"] == [
        {"policy": "sft", "response": "The answer is 4.", "checks": {"correct": True}, "reward": 0.0},
        {"policy": "dpo", "response": "The answer is 5.", "checks": {"correct": False}, "reward": 0.0},
    ]
    assert picked[0]["prompt"] == "Question 7?"  # as written, not the template's preamble


def test_no_examples_when_off_and_random_only_when_nothing_differs():
    prompts = [record(i) for i in range(6)]
    rows = rows_for(prompts, {"sft": lambda i: (f"r{i}", {}, {})})
    assert eval_examples.pick(prompts, rows, 0, seed=0) == []
    picked = eval_examples.pick(prompts, rows, 3, seed=1)
    assert len(picked) == 3 and all(e["why"] == "random pick (seed 1)" for e in picked)
    assert all("reward" not in r for e in picked for r in e["responses"])  # no reward model: no reward


def test_examples_default_stays_out_of_the_stage_hash(tmp_path):
    stage = {
        "kind": "eval",
        "prompts": {"path": str(TINY / "prompts_eval.jsonl")},
        "policies": ["sft"],
        "reference": "sft",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(merge(BASE_RECIPE, {"stages": {"eval": stage}}), sort_keys=False))
    plain = load_recipe(path)
    assert plain.stages["eval"].examples == 4
    assert "examples" not in plain.stages["eval"].model_dump(mode="json")
    for count in (0, 8):
        changed = load_recipe(path, [f"stages.eval.examples={count}"])
        assert changed.stages["eval"].model_dump(mode="json")["examples"] == count
        assert stage_hash(changed, "eval", {"sft": "x"}) != stage_hash(plain, "eval", {"sft": "x"})


# ------------------------------------------------------------------------------------------------
# How they read in report.md
# ------------------------------------------------------------------------------------------------


def rendered_cells(markdown: str) -> list[list[str]]:
    """The table cells a GitHub-flavoured markdown renderer shows, as text (markdown-it with tables)."""
    from markdown_it import MarkdownIt

    page = MarkdownIt("commonmark").enable("table").render(markdown)
    rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)
    cells = [re.findall(r"<t[dh]>(.*?)</t[dh]>", r, re.S) for r in rows]
    return [[html.unescape(c.replace("<br>", "\n")) for c in row] for row in cells]


def test_prompts_and_responses_show_verbatim_whatever_they_contain():
    example = {
        "prompt_id": "abc",
        "prompt": TRICKY + "\n````four````",
        "why": "checkers differ: correct",
        "responses": [
            {"policy": "sft", "response": TRICKY, "checks": {"correct": False, "style": True}, "reward": -1.5},
            {"policy": "dpo", "response": "  ", "checks": {"correct": True, "style": True}, "reward": 2.25},
        ],
    }
    lines = report.example_markdown(1, example)
    text = "\n".join(lines)
    cells = rendered_cells(text)
    assert cells[0] == ["policy", "response", "correct", "style", "reward"]
    assert cells[1] == ["sft", TRICKY, "✗", "✓", "-1.50"]  # one row, every character as written
    assert cells[2] == ["dpo", "(empty)", "✓", "✓", "2.25"]
    assert lines[0] == "### 1. prompt `abc`: checkers differ: correct"
    from markdown_it import MarkdownIt

    blocks = [t for t in MarkdownIt("commonmark").parse(text) if t.type == "fence"]
    assert len(blocks) == 1 and blocks[0].content == example["prompt"] + "\n"  # the prompt in one code block


def test_the_report_has_a_section_per_stage_with_examples(tmp_path):
    metrics = {
        "prompts": 2,
        "reference": "sft",
        "policies": {"sft": {"correct": 0.5}},
        "examples": [
            {"prompt_id": f"p{i}", "prompt": f"Q{i}", "why": "random pick (seed 0)", "responses": []} for i in (1, 2)
        ],
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    manifest = {
        "recipe": "r",
        "stages": {"eval": {"kind": "eval", "status": "done", "outputs": {"metrics": str(tmp_path / "metrics.json")}}},
    }
    text = report.write_report(tmp_path, manifest, ["eval"]).read_text()
    assert text.index("## Held-out evaluation") < text.index("## Example responses: `eval`")
    assert "### 1. prompt `p1`: random pick (seed 0)" in text and "### 2. prompt `p2`" in text
    # a run finished before examples existed: no section, no error
    del metrics["examples"]
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert "Example responses" not in report.write_report(tmp_path, manifest, ["eval"]).read_text()


# ------------------------------------------------------------------------------------------------
# A real run
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_writes_checker_results_per_response_and_the_examples_section(tmp_path):
    eval_stage = {
        "kind": "eval",
        "prompts": {"path": str(TINY / "prompts_eval.jsonl"), "limit": 12},
        "policies": ["sft", "longer"],
        "reference": "sft",
        "max_new_tokens": 12,
        "kl_samples": 0,
        "examples": 3,
        "checkers": {
            "preference_pass": "pipeline.builtin.tasks:preferred",
            "gold_accuracy": "pipeline.builtin.tasks:answer_correct",
        },
    }
    longer = {**BASE_RECIPE["stages"]["sft"], "init_from": "sft"}
    longer["train"] = {**longer["train"], "max_steps": 8}
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(merge(BASE_RECIPE, {"stages": {"longer": longer, "eval": eval_stage}}), sort_keys=False)
    )
    run_dir = tmp_path / "run"
    out = run_cli("run", str(path), "--output-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]

    rows = [json.loads(line) for line in (run_dir / "eval" / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {r["policy"] for r in rows} == {"sft", "longer"}
    assert all(set(r["checks"]) == {"preference_pass", "gold_accuracy"} for r in rows)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for policy in ("sft", "longer"):  # the per-response verdicts are the ones the rates were computed from
        mine = [r for r in rows if r["policy"] == policy]
        rate = sum(r["checks"]["gold_accuracy"] for r in mine) / len(mine)
        assert metrics["policies"][policy]["gold_accuracy"] == pytest.approx(rate, abs=1e-4)

    examples = metrics["examples"]
    assert len(examples) == 3 and all([r["policy"] for r in e["responses"]] == ["sft", "longer"] for e in examples)
    by_key = {(r["policy"], r["prompt_id"]): r for r in rows}
    for e in examples:
        for shown in e["responses"]:
            row = by_key[(shown["policy"], e["prompt_id"])]
            assert shown["response"] == row["response"] and shown["checks"] == row["checks"]
    text = (run_dir / "report.md").read_text()
    section = text.split("## Example responses: `eval`")[1]
    assert len(re.findall(r"^### \d\. prompt `", section, re.M)) == 3
    for e in examples:  # each prompt's table: a row per policy, rendered back to its response
        table = section.split(f"prompt `{e['prompt_id']}`")[1].split("\n### ")[0]
        cells = rendered_cells(table)
        assert [c[:2] for c in cells[1:]] == [[r["policy"], r["response"].strip() or "(empty)"] for r in e["responses"]]
