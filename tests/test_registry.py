"""The stage-kind registry: a kind defined outside the package registers itself and runs inside a recipe
like a built-in one (validation, cross-stage references, manifest, report), with nothing else to edit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
from pydantic import Field

from pipeline.config import registry
from pipeline.config import DataSource, StageConfig, recipe_from_dict
from pipeline.data.sources import read_source
from pipeline.observe import report
from pipeline.run import runner
from pipeline.run.context import StageContext
from pipeline.util.errors import RecipeError
from pipeline.util.files import write_json_atomic

from conftest import BASE_RECIPE, REPO, merge


class WordCountStage(StageConfig):
    """Counts the words of a text column of an earlier stage's data or a file."""

    FROM_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {"after": ("sft",)}

    kind: Literal["wordcount"] = "wordcount"
    data: DataSource
    column: str = "output"
    after: str | None = Field(None, description="A stage that must have finished first.")


def run_wordcount(ctx: StageContext[WordCountStage]) -> dict[str, Any]:
    rows = read_source(ctx.cfg.data).rows
    words = sum(len(str(row[ctx.cfg.column]).split()) for row in rows)
    write_json_atomic(ctx.stage_dir / "counts.json", {"rows": len(rows), "words": words})
    ctx.outputs["counts"] = str(ctx.stage_dir / "counts.json")
    return {"rows": len(rows), "words": words, "after": ctx.cfg.after}


@pytest.fixture
def wordcount_kind():
    kind = registry.register(
        registry.StageKind(
            name="wordcount", config=WordCountStage, run=run_wordcount, outputs=("counts",), key_metrics=("words",)
        )
    )
    yield kind
    registry.unregister("wordcount")


def _recipe(tmp_path: Path, body: dict) -> dict:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "one two three"}) + "\n" for i in range(5)))
    return merge(BASE_RECIPE, {"stages": {"count": {"kind": "wordcount", "data": {"path": str(data)}, **body}}})


def test_a_kind_defined_in_a_test_runs_inside_a_recipe(wordcount_kind, tmp_path):
    recipe = recipe_from_dict(_recipe(tmp_path, {"column": "output"}))
    assert type(recipe.stages["count"]) is WordCountStage
    run_dir = tmp_path / "run"
    manifest = runner.run_pipeline(recipe, run_dir, ["count"], say=lambda _: None)
    entry = manifest["stages"]["count"]
    assert entry["status"] == "done" and entry["kind"] == "wordcount"
    assert entry["metrics"] == {"rows": 5, "words": 15}  # None-valued metrics are not recorded
    assert json.loads(Path(entry["outputs"]["counts"]).read_text()) == {"rows": 5, "words": 15}
    # the report shows the kind's key metric; a second run is cached like any stage
    assert "words=15" in report.results_table(manifest, ["count"])
    assert runner.is_cached(recipe, "count", run_dir)


def test_a_registered_kind_gets_the_same_recipe_checks(wordcount_kind, tmp_path):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(_recipe(tmp_path, {"colum": "output"}))
    assert "stages.count.colum: unknown key (did you mean 'column'?)" in str(err.value)
    with pytest.raises(RecipeError) as err:  # FROM_FIELDS: `after` must name an earlier sft stage
        recipe_from_dict(merge(_recipe(tmp_path, {"after": "count"}), {}))
    assert "stages.count.after: stage 'count' must come before 'count'" in str(err.value)
    recipe = recipe_from_dict(_recipe(tmp_path, {"after": "sft"}))
    assert recipe.stages["count"].upstream() == {"after": "sft"}


def test_unknown_kind_lists_the_registered_ones(wordcount_kind, tmp_path):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(merge(BASE_RECIPE, {"stages": {"x": {"kind": "wordcnt"}}}))
    message = str(err.value)
    assert "unknown stage kind 'wordcnt' (did you mean 'wordcount'?)" in message
    for builtin in ("sft", "bon", "reward", "dpo", "eval"):
        assert builtin in message


def test_registering_a_config_whose_kind_does_not_match_is_refused():
    with pytest.raises(ValueError, match="kind default 'wordcount'"):
        registry.register(registry.StageKind(name="other", config=WordCountStage, run=run_wordcount))


def test_builtin_kinds_come_from_their_modules_only():
    """No second table of kinds: every built-in kind is registered by the module named after it."""
    found = registry.kinds()
    for name in ("sft", "bon", "reward", "dpo", "eval"):
        assert found[name].config.__module__ == f"pipeline.stages.{name}"
        assert found[name].run.__module__ == f"pipeline.stages.{name}"
    out = subprocess.run(
        ["git", "grep", "-nE", r"\{\s*\"sft\"\s*:|\"sft\",\s*\"bon\",\s*\"reward\"", "--", "pipeline"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.stdout == "", f"a table of stage kinds outside the registry:\n{out.stdout}"
    assert sys.modules["pipeline.stages.sft"].KIND is found["sft"]
