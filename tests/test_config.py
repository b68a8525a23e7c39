"""Recipes: every shipped recipe validates; bad recipes are refused with messages that say what to fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import iter_sources, load_recipe, recipe_from_dict
from pipeline.util.errors import RecipeError

from conftest import BASE_RECIPE, REPO, merge, run_cli

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_config_imports_without_torch():
    import subprocess

    # loading a recipe imports every stage kind's module (the registry): they must import torch lazily
    code = (
        "import pipeline.config, pipeline.data.sft, pipeline.run.manifest, pipeline.builtin.tasks, sys; "
        "pipeline.config.load_recipe('recipes/demo.yaml'); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO)) for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.stages
    # data paths are resolved to absolute paths relative to the recipe file
    for _, source in iter_sources(recipe.stages):
        if source.path:
            assert Path(source.path).is_absolute()


def test_at_least_two_real_model_recipes():
    real = [p for p in RECIPES if not load_recipe(p).model.name_or_path.startswith("builtin:")]
    assert len(real) >= 2, real


def test_cli_validate_demo_exits_zero_and_prints_resolved():
    out = run_cli("validate", "recipes/demo.yaml")
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["stages"]["sft"]["train"]["learning_rate"] > 0
    assert resolved["model"]["quantization"] == "none"


def test_cli_validate_typo_in_override_names_key_and_suggests():
    out = run_cli("validate", "recipes/demo.yaml", "--set", "stages.sft.train.learnig_rate=1e-4")
    assert out.returncode != 0
    assert "stages.sft.train.learnig_rate" in out.stderr
    assert "learning_rate" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_override_is_applied_and_type_checked(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE_RECIPE))
    recipe = load_recipe(path, ["stages.sft.train.learning_rate=1e-5", "model.quantization=4bit", "lora.r=4"])
    assert recipe.stages["sft"].train.learning_rate == 1e-5
    assert recipe.lora.r == 4 and recipe.model.quantization == "4bit"
    with pytest.raises(RecipeError, match=r"stages\.sft\.train\.batch_size: .*integer"):
        load_recipe(path, ["stages.sft.train.batch_size=many"])


def test_resolved_recipe_round_trips(tmp_path):
    recipe = recipe_from_dict(BASE_RECIPE)
    again = recipe_from_dict(yaml.safe_load(recipe.resolved_yaml()))
    assert again.resolved_dict() == recipe.resolved_dict()


BAD_RECIPES = [
    ({"model": {"dtyp": "float32"}}, [r"model\.dtyp: unknown key", "'dtype'"]),
    (
        {"stages": {"sft": {"train": {"learnig_rate": 1e-4}}}},
        [r"stages\.sft\.train\.learnig_rate: unknown key", "'learning_rate'"],
    ),
    ({"model": {"quantization": "3bit"}}, [r"model\.quantization:", "'none', '4bit' or '8bit'"]),
    ({"model": {"quantization": "4bit"}}, [r"model\.quantization: 4bit needs a 'lora:' block"]),
    ({"stages": {"sft": {"train": {"batch_size": 0}}}}, [r"stages\.sft\.train\.batch_size: .*greater than 0"]),
    ({"stages": {"sft": {"data": {"template": "vicuna"}}}}, [r"stages\.sft\.data\.template:", "'alpaca' or 'chat'"]),
    (
        {"stages": {"sft": {"data": {"overlength": "cut"}}}},
        [r"stages\.sft\.data\.overlength:", "'truncate', 'drop' or 'error'"],
    ),
    (
        {"stages": {"sft": {"data": {"train": {"hub": "tatsu-lab/alpaca"}}}}},
        [r"stages\.sft\.data\.train: .*exactly one of 'path'"],
    ),
    (
        {"stages": {"sft": {"data": {"train": {"path": "rows.txt"}}}}},
        [
            r"unsupported file type '\.txt'; use \.json, \.jsonl \(\.ndjson\), \.csv, \.tsv or \.parquet, each also compressed"
        ],
    ),
    (
        {"stages": {"polish": {"kind": "sfft", "data": {"train": {"path": "a.jsonl"}}}}},
        [r"stages\.polish\.kind: unknown stage kind 'sfft'", "'sft'"],
    ),
    (
        {"stages": {"again": {"kind": "sft", "init_from": "sfy", "data": {"train": {"path": "a.jsonl"}}}}},
        [r"stages\.again\.init_from: no stage named 'sfy'", "'sft'"],
    ),
    ({"tracking": {"report_to": ["none", "wandb"]}}, ["'none' cannot be combined"]),
    ({"name": "my run!"}, [r"name: String should match pattern"]),
    ({"lora": {"r": 0}}, [r"lora\.r: .*greater than 0"]),
    ({"stages": {"sft": {"data": {"eval_fraction": 1.5}}}}, [r"stages\.sft\.data\.eval_fraction: .*less than 1"]),
]


@pytest.mark.parametrize("extra,patterns", BAD_RECIPES, ids=[p[0] for _, p in BAD_RECIPES])
def test_bad_recipe_messages(extra, patterns):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(merge(BASE_RECIPE, extra))
    message = str(info.value)
    for pattern in patterns:
        assert __import__("re").search(pattern, message), f"{pattern!r} not in:\n{message}"


def test_init_from_must_name_an_earlier_stage():
    raw = merge(BASE_RECIPE, {})
    raw["stages"] = {
        "second": {"kind": "sft", "init_from": "sft", "data": raw["stages"]["sft"]["data"]},
        **raw["stages"],
    }
    with pytest.raises(RecipeError, match=r"stages\.second\.init_from: stage 'sft' must come before 'second'"):
        recipe_from_dict(raw)


def test_missing_stages_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="stages: required"):
        recipe_from_dict({"name": "x"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_duplicate_keys_are_refused_naming_the_key_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(
        "name: x\n"  # 1
        "stages:\n"  # 2
        "  sft:\n"  # 3
        "    kind: sft\n"  # 4
        "    data: {train: {path: a.jsonl}, max_length: 64, max_length: 32}\n"  # 5
        "  sft:\n"  # 6
        "    kind: sft\n"  # 7
        "    data:\n"  # 8
        "      train: [{path: a.jsonl, weight: 1, weight: 2}]\n"  # 9
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: duplicate key(s); YAML keeps only the last one")
    assert "stages.sft: line 6 repeats line 3" in message
    assert "stages.sft.data.max_length: given twice on line 5" in message
    assert "stages.sft.data.train[0].weight: given twice on line 9" in message
    # anchors and merge keys are not duplicates
    path.write_text(
        "name: x\nbase: &b {kind: sft, data: {train: {path: a.jsonl}}}\n"
        "stages:\n  sft: {<<: *b}\n  more: {<<: *b, init_from: sft}\n"
    )
    with pytest.raises(RecipeError) as info:  # 'base' is an unknown key, not a duplicate
        load_recipe(path)
    assert "duplicate key" not in str(info.value) and "base: unknown key" in str(info.value)
    with pytest.raises(RecipeError, match=r"--set 'lora=\{r: 8, r: 16\}': duplicate key.*\n  - r: given twice"):
        load_recipe(REPO / "recipes" / "demo.yaml", ["lora={r: 8, r: 16}"])


def test_a_recipe_path_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(RecipeError, match="is a directory; give the recipe's YAML file"):
        load_recipe(tmp_path)


def test_override_into_a_value_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE_RECIPE))
    with pytest.raises(RecipeError, match=r"model\.dtype is a value, not a section"):
        load_recipe(path, ["model.dtype.x=1"])
    with pytest.raises(RecipeError, match="expected key.path=value"):
        load_recipe(path, ["learning_rate"])


def test_missing_data_files_are_reported_before_anything_runs(tmp_path):
    raw = merge(BASE_RECIPE, {"stages": {"sft": {"data": {"train": {"path": str(tmp_path / "nope.jsonl")}}}}})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    for command in (["validate", str(path)], ["run", str(path), "--output-dir", str(tmp_path / "run")]):
        out = run_cli(*command)
        assert out.returncode == 2
        assert f"stages.sft.data.train.path: file not found: {tmp_path / 'nope.jsonl'}" in out.stderr
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "manifest.json").exists()  # nothing started


def _chain(**dpo_r2) -> dict:
    """sft -> bon -> dpo -> dpo_r2 (-> eval), on the demo's files."""
    demo = load_recipe(REPO / "recipes" / "demo.yaml").resolved_dict()
    stages = {k: demo["stages"][k] for k in ("sft", "label", "reward", "bon", "dpo")}
    stages["dpo_r2"] = {**demo["stages"]["dpo"], "policy_from": "dpo", **dpo_r2}
    stages["eval"] = {**demo["stages"]["eval"], "policies": ["sft", "dpo", "dpo_r2"]}
    return {**demo, "stages": stages}


def test_any_policy_stage_is_a_policy_source_for_bon_dpo_eval_and_sft():
    raw = _chain(reference_from="sft")
    raw["stages"]["bon_r2"] = {**raw["stages"]["bon"], "policy_from": "dpo_r2"}
    raw["stages"]["sft_r2"] = {**raw["stages"]["sft"], "init_from": "dpo_r2"}
    recipe = recipe_from_dict(raw)
    assert recipe.stages["dpo_r2"].upstream()["reference_from"] == "sft"
    # the template of a DPO policy is the one its chain started with
    assert recipe.policy_template("dpo_r2") == recipe.stages["sft"].data.template == "chat"


@pytest.mark.parametrize(
    ("field", "target", "message"),
    [
        ("reference_from", "bon", "stage 'bon' is a 'bon' stage; reference_from takes the output of a stage of kind"),
        ("reference_from", "eval", "stage 'eval' must come before 'dpo_r2'"),
        ("reference_from", "sfft", "no stage named 'sfft' (did you mean 'sft'?)"),
        ("policy_from", "reward", "stage 'reward' is a 'reward' stage; policy_from takes"),
    ],
)
def test_a_reference_or_policy_that_is_not_an_earlier_policy_stage_is_refused(field, target, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(_chain(**{field: target}))
    assert f"stages.dpo_r2.{field}: {message}" in str(err.value)
    if "kind" in message:
        assert all(f"'{kind}'" in str(err.value) for kind in ("sft", "dpo", "grpo"))
        assert "(any stage that trains a policy)" in str(err.value)
