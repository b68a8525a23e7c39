"""Stages say loudly when they keep little: best-of-n warnings with the cause and the fix, and training
stages that refuse an empty (or less than one batch) input before any model loads, naming the upstream stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_recipe
from pipeline.observe import report
from pipeline.run.context import StageContext
from pipeline.run.manifest import Manifest
from pipeline.stages import keep_checks
from pipeline.util.errors import DataError

from conftest import TINY, run_cli

PROMPTS = 160


def candidates(truncated: int, n: int = 1) -> list[dict]:
    """PROMPTS prompts x n samples; the first ``truncated`` samples hit the length limit."""
    out = []
    for p in range(PROMPTS):
        for i in range(n):
            k = p * n + i
            out.append(
                {
                    "prompt_id": f"p{p}",
                    "prompt": f"Q{p}",
                    "sample_idx": i,
                    "response": f"answer {k}",
                    "score": float(k % 3),
                    "finish_reason": "length" if k < truncated else "eos",
                    "row": {"instruction": f"Q{p}", "input": ""},
                }
            )
    return out


def bon_context(make_recipe, tmp_path, select: dict | None = None) -> StageContext:
    recipe = load_recipe(
        make_recipe(
            {
                "stages": {
                    "label": {
                        "kind": "bon",
                        "policy_from": "sft",
                        "prompts": {"path": str(TINY / "prompts_label.jsonl")},
                        "n": 1,
                        "max_new_tokens": 16,
                        "scorer": {"checker": "pipeline.builtin.tasks:preferred"},
                        "select": select or {},
                    }
                }
            }
        )
    )
    return StageContext(
        recipe=recipe,
        name="label",
        cfg=recipe.stages["label"],
        run_dir=tmp_path / "run",
        stage_dir=tmp_path / "run" / "label",
        seed=0,
    )


def test_bon_keeping_few_prompts_warns_with_the_cause_and_the_fix(make_recipe, tmp_path, capsys):
    from pipeline.stages.bon import finish

    ctx = bon_context(make_recipe, tmp_path)
    metrics = finish(ctx, candidates(truncated=159), {}, {"prompts": PROMPTS, "n": 1})
    warning = next(w for w in metrics["warnings"] if "best.jsonl" in w)
    assert warning == (
        "[label] best.jsonl: kept 1 of 160 (1%); 159 prompts had no usable sample: 159 of 160 samples hit "
        "max_new_tokens=16 and were dropped as truncated: raise max_new_tokens, or set select.keep_truncated: true"
    )
    assert "WARNING [label] best.jsonl: kept 1 of 160" in capsys.readouterr().out
    # the results table and report.md show it
    manifest = {"stages": {"label": {"kind": "bon", "status": "done", "duration_s": 1.0, "metrics": metrics}}}
    table = report.results_table(manifest, ["label"])
    assert "2 warning(s), below" in table and warning in table
    assert warning in report.markdown_table(report.stage_rows(manifest, ["label"]))


def test_keep_truncated_keeps_length_capped_samples_and_stays_quiet(make_recipe, tmp_path):
    from pipeline.stages.bon import finish

    ctx = bon_context(make_recipe, tmp_path, {"keep_truncated": True})
    metrics = finish(ctx, candidates(truncated=159, n=2), {}, {"prompts": PROMPTS, "n": 2})
    assert metrics["best_rows"] == PROMPTS
    assert "warnings" not in metrics


def test_equal_scores_are_named_as_the_cause_of_few_pairs(make_recipe, tmp_path):
    from pipeline.stages.bon import finish

    ctx = bon_context(make_recipe, tmp_path)
    flat = [dict(c, score=1.0) for c in candidates(truncated=0, n=2)]
    metrics = finish(ctx, flat, {}, {"prompts": PROMPTS, "n": 2})
    assert metrics["pairs"] == 0
    assert metrics["warnings"] == [
        "[label] pairs.jsonl: kept 0 of 160 (0%); 160 prompts had every usable sample scored the same (no preference "
        "between them): raise n or temperature, or use a scorer with finer scores"
    ]


def test_keep_warning_is_quiet_at_half_and_above():
    assert keep_checks.keep_warning("x", 5, 10, [(5, "cause")]) is None
    assert keep_checks.keep_warning("x", 4, 10, [(6, "cause"), (1, "other")]) == "x: kept 4 of 10 (40%); cause"


# -- training input checks -----------------------------------------------------------------------------------


def pairs_run(make_recipe, tmp_path, pair_rows: int, kind: str = "dpo"):
    """A run directory where sft and label are done and label's pairs.jsonl holds ``pair_rows`` pairs."""
    from pipeline.builtin.tiny_model import tiny_model_path

    link = {"policy_from": "sft"} if kind == "dpo" else {"base_from": "sft"}
    recipe_path = make_recipe(
        {
            "stages": {
                "label": {
                    "kind": "bon",
                    "policy_from": "sft",
                    "prompts": {"path": str(TINY / "prompts_label.jsonl")},
                    "scorer": {"checker": "pipeline.builtin.tasks:preferred"},
                },
                kind: {
                    "kind": kind,
                    **link,
                    "pairs_from": "label",
                    "data": {"eval_fraction": 0},
                    "train": {"batch_size": 8},
                },
            }
        }
    )
    recipe = load_recipe(recipe_path)
    run_dir = tmp_path / "run"
    pairs = run_dir / "label" / "pairs.jsonl"
    pairs.parent.mkdir(parents=True)
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"Q{i}", "chosen": "good answer", "rejected": f"bad {i}"}) + "\n"
            for i in range(pair_rows)
        )
    )
    manifest = Manifest(run_dir)
    manifest.update_stage(
        recipe,
        "sft",
        kind="sft",
        status="done",
        config_hash="s",
        outputs={"model": {"path": str(tiny_model_path()), "kind": "full"}},
        metrics={},
    )
    said = (
        ["[label] pairs.jsonl: kept 0 of 160 (0%); 160 prompts had every usable sample scored the same"]
        if not pair_rows
        else []
    )
    manifest.update_stage(
        recipe,
        "label",
        kind="bon",
        status="done",
        config_hash="l",
        outputs={"pairs": str(pairs)},
        metrics={"pairs": pair_rows, "select": {"pairs": {"selected": pair_rows}}, "warnings": said},
    )
    return recipe_path, recipe, run_dir


def no_model_loads(monkeypatch):
    from pipeline import modeling

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data check")

    for name in ("load_dpo_models", "load_reward_model", "load_policy", "load_base"):
        monkeypatch.setattr(modeling, name, refuse)


@pytest.mark.parametrize("kind", ["dpo", "reward"])
def test_zero_pairs_from_upstream_fail_naming_the_stage_before_any_model_loads(
    make_recipe, tmp_path, monkeypatch, kind
):
    from pipeline.run import runner
    from pipeline.stages import dpo, reward

    _, recipe, run_dir = pairs_run(make_recipe, tmp_path, 0, kind)
    no_model_loads(monkeypatch)
    ctx = runner.make_context(recipe, kind, run_dir)
    with pytest.raises(DataError) as err:
        (dpo if kind == "dpo" else reward).build_trainer(ctx)
    assert str(err.value).startswith(
        f"stage {kind!r} has 0 preference pairs to train on: its input is the 'pairs' output of stage 'label', "
        "which kept 0 pairs (see label/metrics.json select.pairs); label warned: [label] pairs.jsonl: kept 0 of 160"
    )


def test_fewer_pairs_than_one_batch_fail_before_any_model_loads(make_recipe, tmp_path, monkeypatch):
    from pipeline.run import runner
    from pipeline.stages import dpo

    _, recipe, run_dir = pairs_run(make_recipe, tmp_path, 3)
    no_model_loads(monkeypatch)
    with pytest.raises(
        DataError,
        match=r"stage 'dpo' has 3 preference pairs to train on, fewer than one batch "
        r"\(stages\.dpo\.train\.batch_size=8\): its input is the 'pairs' output of stage 'label', "
        r"which kept 3 pairs",
    ):
        dpo.build_trainer(runner.make_context(recipe, "dpo", run_dir))


def test_sft_on_an_empty_best_of_n_output_fails_naming_it(make_recipe, tmp_path, monkeypatch):
    from pipeline.run import runner
    from pipeline.stages import sft

    recipe_path = make_recipe(
        {
            "stages": {
                "label": {
                    "kind": "bon",
                    "policy_from": "sft",
                    "prompts": {"path": str(TINY / "prompts_label.jsonl")},
                    "scorer": {"checker": "pipeline.builtin.tasks:preferred"},
                },
                "rs_sft": {"kind": "sft", "data": {"train": {"from_stage": "label"}}},
            }
        }
    )
    recipe = load_recipe(recipe_path)
    run_dir = tmp_path / "run"
    best = run_dir / "label" / "best.jsonl"
    best.parent.mkdir(parents=True)
    best.write_text("")
    Manifest(run_dir).update_stage(
        recipe,
        "label",
        kind="bon",
        status="done",
        config_hash="l",
        outputs={"best": str(best)},
        metrics={"select": {"best": {"prompts": 4}, "pairs": {"prompts": 4}}},  # what a selecting stage records
    )
    no_model_loads(monkeypatch)
    with pytest.raises(
        DataError,
        match=r"stage 'rs_sft' has 0 training rows to train on: its input is the 'best' output "
        r"of stage 'label', which kept 0 rows \(see label/metrics.json select.best\)",
    ):
        sft.build_trainer(runner.make_context(recipe, "rs_sft", run_dir))


def test_cli_stage_on_zero_pairs_exits_2_without_traceback(make_recipe, tmp_path):
    recipe_path, _, run_dir = pairs_run(make_recipe, tmp_path, 0)
    out = run_cli("stage", "dpo", str(recipe_path), "--output-dir", str(run_dir))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "stage 'dpo' has 0 preference pairs to train on" in out.stderr
    entry = Manifest(run_dir).stage("dpo")
    assert entry["status"] == "failed" and "0 preference pairs" in entry["error"]
    assert not (run_dir / "dpo" / "model").exists()
    assert Path(Manifest(run_dir).stage("label")["outputs"]["pairs"]).is_file()  # upstream outputs kept
