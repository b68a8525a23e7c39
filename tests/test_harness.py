"""eval.harness: lm-evaluation-harness tasks on every evaluated policy, offline, on two local task definitions
over the tiny tasks (a multiple-choice one scored by log-likelihood, a generate_until one with a regex filter).

The Hub is never reached: the tasks read local JSON files (``dataset_path: json``) and HF_*_OFFLINE is set.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.builtin.prompt_templates import render_prompt
from pipeline.config import load_recipe
from pipeline.run.manifest import stage_hash
from pipeline.stages.harness import flat_scores
from pipeline.util.errors import RecipeError

from conftest import BASE_RECIPE, TINY, merge, run_cli

pytest.importorskip("lm_eval")  # the [eval] extra; CI installs it (make install)

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
MC, GEN = "tiny_capital_mc", "tiny_addition_gen"
LIMIT = 12


def write_tasks(folder: Path) -> Path:
    """Two lm-eval task YAMLs and their JSON data in ``folder``: prompts rendered as the policies were trained."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (TINY / "prompts_eval.jsonl").read_text().splitlines()]
    capitals = [r for r in rows if r["task"] == "capital"]
    names = sorted({r["answer"] for r in capitals})
    mc = []
    for i, row in enumerate(capitals[:40]):
        others = [n for n in names if n != row["answer"]]
        choices = sorted({row["answer"], *(others[(i * 7 + k * 13) % len(others)] for k in range(3))})
        mc.append(
            {
                "prompt": render_prompt(row, "alpaca"),
                "choices": [f"The answer is {c}." for c in choices],
                "label": choices.index(row["answer"]),
            }
        )
    sums = [{"prompt": render_prompt(r, "alpaca"), "answer": r["answer"]} for r in rows if r["task"] == "addition"]
    (folder / "capital.jsonl").write_text("".join(json.dumps(x) + "\n" for x in mc))
    (folder / "addition.jsonl").write_text("".join(json.dumps(x) + "\n" for x in sums[:40]))
    common = {"dataset_path": "json", "test_split": "test", "doc_to_text": "{{prompt}}"}
    mc_task = {
        "task": MC,
        **common,
        "dataset_kwargs": {"data_files": {"test": str(folder / "capital.jsonl")}},
        "output_type": "multiple_choice",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "target_delimiter": "",  # the policies were trained on "### Response:" + "The answer is ..."
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    gen_task = {
        "task": GEN,
        **common,
        "dataset_kwargs": {"data_files": {"test": str(folder / "addition.jsonl")}},
        "output_type": "generate_until",
        "doc_to_target": "answer",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
        "filter_list": [
            {
                "name": "get-answer",
                "filter": [
                    {"function": "regex", "regex_pattern": "The answer is (-?[0-9]+)"},
                    {"function": "take_first"},
                ],
            }
        ],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / "capital_mc.yaml").write_text(yaml.safe_dump(mc_task, sort_keys=False))
    (folder / "addition_gen.yaml").write_text(yaml.safe_dump(gen_task, sort_keys=False))
    return folder


def eval_stage(harness: dict | None = None, **extra) -> dict:
    stage = {
        "kind": "eval",
        "prompts": {"path": str(TINY / "prompts_eval.jsonl"), "limit": 12},
        "policies": ["sft"],
        "reference": "sft",
        "max_new_tokens": 12,
        "kl_samples": 1,
        "checkers": {"gold_accuracy": "pipeline.builtin.tasks:answer_correct"},
        **extra,
    }
    if harness is not None:
        stage["harness"] = harness
    return stage


def write_recipe(folder: Path, stages: dict, **top) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(merge(BASE_RECIPE, {"stages": stages, **top}), sort_keys=False))
    return path


def validate(recipe: Path, capsys) -> tuple[int, str]:
    code = cli.main(["validate", str(recipe)])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# lm_eval's results as metric names
# ------------------------------------------------------------------------------------------------


def test_results_become_task_metric_names_with_filters_and_standard_errors():
    results = {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6},
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A", "sample_len": 8},
    }
    scores, stderr = flat_scores(results)
    assert scores == {
        "harness/arc_easy/acc": 0.5,
        "harness/arc_easy/acc_norm": 0.6,
        "harness/gsm8k/exact_match,strict-match": 0.25,
    }
    assert stderr == {"arc_easy/acc": 0.1}  # "N/A" (no standard error computed) is left out


# ------------------------------------------------------------------------------------------------
# validate: one clear error naming the key
# ------------------------------------------------------------------------------------------------


def test_missing_extra_is_one_error_naming_the_key_and_the_install(tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path, {"eval": eval_stage({"tasks": ["hellaswag"]})})
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the [eval] extra were not installed
    code, err = validate(recipe, capsys)
    assert code == 2 and "Traceback" not in err
    assert "stages.eval.harness: needs lm-evaluation-harness (lm_eval), which is not installed" in err
    assert "pip install '.[eval]'" in err and err.count("error:") == 1


def test_unknown_task_is_named_with_the_closest_known_one(tmp_path, capsys):
    tasks = write_tasks(tmp_path / "tasks")
    recipe = write_recipe(tmp_path, {"eval": eval_stage({"tasks": [MC, "helaswag"], "include_path": "tasks"})})
    code, err = validate(recipe, capsys)
    assert code == 2 and "Traceback" not in err
    assert "stages.eval: harness.tasks[1]: unknown lm-eval task 'helaswag' (did you mean 'hellaswag'?)" in err
    assert str(tasks) in err  # where local tasks were looked for

    recipe = write_recipe(tmp_path, {"eval": eval_stage({"tasks": ["tiny_capital_mq"], "include_path": "tasks"})})
    code, err = validate(recipe, capsys)  # a local task's name is suggested too
    assert code == 2 and "unknown lm-eval task 'tiny_capital_mq' (did you mean 'tiny_capital_mc'?)" in err


def test_missing_include_folder_names_the_resolved_path(tmp_path, capsys):
    recipe = write_recipe(tmp_path, {"eval": eval_stage({"tasks": [MC], "include_path": "no_such_tasks"})})
    code, err = validate(recipe, capsys)
    assert code == 2 and "Traceback" not in err
    assert f"harness.include_path: folder not found: {tmp_path / 'no_such_tasks'}" in err
    assert "relative to the recipe file" in err


def test_local_tasks_validate_without_indexing_lm_evals_own(tmp_path, capsys):
    write_tasks(tmp_path / "tasks")
    recipe = write_recipe(tmp_path, {"eval": eval_stage({"tasks": [MC, GEN], "include_path": "tasks"})})
    code, err = validate(recipe, capsys)
    assert code == 0, err


def test_frontier_axis_may_name_a_harness_metric_of_a_listed_task(tmp_path):
    harness = {"tasks": [MC], "include_path": "tasks"}
    ok = write_recipe(tmp_path, {"eval": eval_stage(harness, capability_metric=f"harness/{MC}/acc")})
    assert load_recipe(ok).stages["eval"].frontier_axes() == ("gold_accuracy", f"harness/{MC}/acc")
    bad = [
        (eval_stage(harness, capability_metric="harness/tiny_capital/acc"), "did you mean 'tiny_capital_mc'?"),
        (eval_stage(harness, capability_metric=f"harness/{MC}"), "harness/<task>/<metric>"),
        (eval_stage(None, capability_metric=f"harness/{MC}/acc"), "with harness: set"),
    ]
    for stage, said in bad:
        with pytest.raises(RecipeError) as err:
            load_recipe(write_recipe(tmp_path, {"eval": stage}))
        assert "stages.eval: capability_metric: " in str(err.value) and said in str(err.value)


def test_harness_absent_leaves_the_eval_stage_hash_as_it_was(tmp_path):
    """Runs finished before the key existed stay cached: its default (absent) is not in the stage's dump."""
    plain = load_recipe(write_recipe(tmp_path, {"eval": eval_stage()}))
    assert "harness" not in plain.stages["eval"].model_dump(mode="json")
    assert "harness:" not in plain.resolved_yaml()
    tasks = {"tasks": [MC], "include_path": "tasks"}
    with_tasks = load_recipe(write_recipe(tmp_path, {"eval": eval_stage(tasks)}))
    upstream = {"sft": "0" * 16}
    assert stage_hash(with_tasks, "eval", upstream) != stage_hash(plain, "eval", upstream)


def test_include_path_is_saved_absolute_and_its_task_files_are_in_the_stage_hash(tmp_path):
    """A relative include_path is resolved against the recipe file, as data paths are; editing a local task
    definition reruns eval instead of leaving it cached."""
    folder = write_tasks(tmp_path / "tasks")
    recipe_path = write_recipe(tmp_path, {"eval": eval_stage({"tasks": [MC], "include_path": "tasks"})})
    recipe = load_recipe(recipe_path)
    assert recipe.stages["eval"].harness.include_path == str(folder.resolve())
    assert f"include_path: {folder.resolve()}" in recipe.resolved_yaml()
    upstream = {"sft": "0" * 16}
    before = stage_hash(recipe, "eval", upstream)
    task_file = folder / "capital_mc.yaml"
    task_file.write_text(task_file.read_text().replace("metric: acc", "metric: acc_norm"))
    assert stage_hash(load_recipe(recipe_path), "eval", upstream) != before


# ------------------------------------------------------------------------------------------------
# A real run: two policies, both tasks, scores in metrics.json, report, trackers and the frontier
# ------------------------------------------------------------------------------------------------


def choice_accuracy(model_dir: str, docs: list[dict]) -> float:
    """The multiple-choice accuracy computed here, without lm_eval: the choice with the highest summed
    log-probability after the prompt (tokenized as prompt + choice, the choice's tokens scored)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    right = 0
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            context = tok(doc["prompt"])["input_ids"]
            whole = tok(doc["prompt"] + choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1].float(), -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    return right / len(docs)


@pytest.mark.slow
def test_harness_scores_every_policy_into_metrics_report_trackers_and_frontier(tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    harness = {"tasks": [MC, GEN], "include_path": "tasks", "limit": LIMIT, "batch_size": 16}
    longer = {
        "kind": "sft",
        "init_from": "sft",
        "data": BASE_RECIPE["stages"]["sft"]["data"],
        "train": {**BASE_RECIPE["stages"]["sft"]["train"], "max_steps": 8},
    }
    stages = {
        "longer": longer,
        "eval": eval_stage(harness, policies=["sft", "longer"], kl_samples=0, capability_metric=f"harness/{MC}/acc"),
    }
    recipe = write_recipe(tmp_path, stages, tracking={"report_to": "tensorboard"})
    run_dir = tmp_path / "run"
    out = run_cli("run", str(recipe), "--output-dir", str(run_dir), env=OFFLINE)
    assert out.returncode == 0, out.stderr[-3000:]

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    names = [f"harness/{MC}/acc", f"harness/{GEN}/exact_match,get-answer"]
    for policy in ("sft", "longer"):
        scores = metrics["policies"][policy]
        assert all(0.0 <= scores[name] <= 1.0 for name in names), scores
        assert all(abs(scores[n] * LIMIT - round(scores[n] * LIMIT)) < 0.01 for n in names)  # k of LIMIT
        assert 0 < scores["harness_stderr"][f"{MC}/acc"] < 1  # lm_eval's standard error of the mean
    assert metrics["harness"]["samples"] == {MC: LIMIT, GEN: LIMIT}
    # the scores are the policies' own: recomputed here, without lm_eval, for each policy's saved model
    docs = [json.loads(line) for line in (tasks / "capital.jsonl").read_text().splitlines()[:LIMIT]]
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    for policy in ("sft", "longer"):
        expected = choice_accuracy(manifest[policy]["outputs"]["model"]["path"], docs)
        assert math.isclose(metrics["policies"][policy][names[0]], expected, abs_tol=1e-4), policy

    # the frontier's capability axis is the harness metric
    frontier = metrics["frontier"]
    assert frontier["capability"] == names[0]
    assert [p["capability"] for p in frontier["points"]] == [
        metrics["policies"][p][names[0]] for p in ("sft", "longer")
    ]
    # the report's table (and the console's results table), not mixed into the held-out one
    report = (run_dir / "report.md").read_text()
    assert "## Benchmark scores (lm-evaluation-harness" in report
    assert f"| policy | {MC}/acc | {GEN}/exact_match,get-answer |" in report
    held_out = report.split("## Held-out evaluation")[1].split("\n\n")[1]
    assert "harness" not in held_out
    assert "benchmark scores (lm-evaluation-harness" in out.stdout
    console = out.stdout + out.stderr  # lm_eval's per-task log lines and request bars are silenced
    assert "Running loglikelihood requests" not in console and "[Task: " not in console
    # the trackers get every score
    from test_tracking import tensorboard_tags

    board = tensorboard_tags(Path(manifest["eval"]["tracker"]["tensorboard"]["dir"]))
    assert {f"results/policies/{p}/{n}" for p in ("sft", "longer") for n in names} <= board["scalars"]
    assert "tables/harness/text_summary" in board["tensors"]
