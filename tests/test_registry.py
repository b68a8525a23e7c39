"""The stage-kind registry: a kind defined outside the package registers itself and runs inside a recipe
like a built-in one (validation, cross-stage references, manifest, report), with nothing else to edit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import yaml
from pydantic import Field

from pipeline.config import DataSource, StageConfig, recipe_from_dict, registry
from pipeline.data.sources import read_source
from pipeline.observe import report
from pipeline.run import runner
from pipeline.run.context import StageContext
from pipeline.util.errors import RecipeError
from pipeline.util.files import write_json_atomic

from conftest import BASE_RECIPE, REPO, merge, run_cli


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


# ------------------------------------------------------------------------------------------------------------
# A kind from a package outside pipeline/, through the real CLI
# ------------------------------------------------------------------------------------------------------------

PLUGIN = '''
"""A stage kind shipped by another package: counts the words of a column."""
import json
from typing import Any, Literal

from pipeline.config import DataSource, StageConfig
from pipeline.config.registry import StageKind, register
from pipeline.data.sources import read_source


class WordCountStage(StageConfig):
    kind: Literal["wordcount"] = "wordcount"
    data: DataSource
    column: str = "output"


def run(ctx) -> dict[str, Any]:
    rows = read_source(ctx.cfg.data).rows
    words = sum(len(str(row[ctx.cfg.column]).split()) for row in rows)
    (ctx.stage_dir / "counts.json").write_text(json.dumps({"rows": len(rows), "words": words}))
    ctx.outputs["counts"] = str(ctx.stage_dir / "counts.json")
    return {"rows": len(rows), "words": words}


def tables(metrics, detailed):
    return {"words": ("words counted", [["rows", "words"], [str(metrics["rows"]), str(metrics["words"])]])}


register(StageKind(name="wordcount", config=WordCountStage, run=run, outputs=("counts",),
                   key_metrics=("words",), tables=tables))
'''


def _plugin_package(tmp_path: Path, entry_point: bool) -> dict[str, str]:
    """``wordcount_kind`` in a folder outside the repository, optionally announced by an installed
    distribution's ``pipeline.stages`` entry point (a dist-info beside it is what ``pip install`` leaves)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "wordcount_kind.py").write_text(PLUGIN)
    if entry_point:
        info = site / "wordcount_kind-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: wordcount-kind\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text("[pipeline.stages]\nwordcount = wordcount_kind\n")
    return {"PYTHONPATH": str(site)}


def _plugin_recipe(tmp_path: Path, plugins: list[str] | None) -> Path:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "one two three"}) + "\n" for i in range(5)))
    raw = {
        "name": "plugin-test",
        "model": {"name_or_path": "builtin:tiny-llama"},
        "tracking": {"report_to": "none"},
        "stages": {"count": {"kind": "wordcount", "data": {"path": str(data)}}},
    }
    if plugins is not None:
        raw["plugins"] = plugins
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("how", ["plugins-key", "entry-point"])
def test_a_kind_from_an_outside_package_validates_plans_runs_caches_and_reports(tmp_path, how):
    env = _plugin_package(tmp_path, entry_point=how == "entry-point")
    recipe = _plugin_recipe(tmp_path, ["wordcount_kind"] if how == "plugins-key" else None)
    out = tmp_path / "run"

    checked = run_cli("validate", str(recipe), env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "count" in checked.stdout

    planned = run_cli("plan", str(recipe), env=env)  # says so, and plans the other stages
    assert planned.returncode == 0 and "Traceback" not in planned.stderr
    assert "stage 'count': kind 'wordcount' has no memory model for plan" in planned.stdout

    first = run_cli("run", str(recipe), "--output-dir", str(out), env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["count"]["status"] == "done"
    assert json.loads(Path(manifest["stages"]["count"]["outputs"]["counts"]).read_text()) == {"rows": 5, "words": 15}
    report_md = (out / "report.md").read_text()
    assert "words=15" in report_md and "## Words counted" in report_md
    assert "words counted:" in first.stdout  # the kind's table in the console results

    again = run_cli("run", str(recipe), "--output-dir", str(out), env=env)
    assert again.returncode == 0 and "[count] cached" in again.stdout, again.stdout + again.stderr


def test_a_plugin_that_cannot_be_imported_is_one_clear_error(tmp_path):
    recipe = _plugin_recipe(tmp_path, ["wordcount_knd"])
    result = run_cli("validate", str(recipe))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "plugins[0]: cannot import plugin module 'wordcount_knd'" in result.stdout + result.stderr
