"""Rounds: a group of stages repeated N times, each round starting from the previous round's policy."""

from __future__ import annotations

import pytest

from pipeline.config import load_recipe, recipe_from_dict
from pipeline.util.errors import RecipeError

from conftest import REPO


def demo_stages() -> dict:
    return load_recipe(REPO / "recipes" / "demo.yaml").resolved_dict()


def group(**extra) -> dict:
    demo = demo_stages()["stages"]
    body = {
        "rounds": 3,
        "start": "sft",
        "stages": {
            "bon": {**{k: v for k, v in demo["bon"].items() if k != "kind"}, "policy_from": "$policy"},
            "dpo": {
                **{k: v for k, v in demo["dpo"].items() if k not in ("kind", "data")},
                "policy_from": "$policy",
                "pairs_from": "bon",
                "reference_from": "sft",
            },
        },
    }
    body.update(extra)
    return body


def recipe_with(group_body: dict, eval_policies=("sft", "dpo_r*")) -> dict:
    raw = demo_stages()
    stages = {k: raw["stages"][k] for k in ("sft", "label", "reward")}
    stages["iterate"] = group_body
    stages["eval"] = {**raw["stages"]["eval"], "policies": list(eval_policies), "bon_from": None}
    return {**raw, "stages": stages}


def test_rounds_expand_in_place_with_each_round_starting_from_the_previous_policy():
    recipe = recipe_from_dict(recipe_with(group()))
    assert list(recipe.stages) == [
        "sft", "label", "reward", "bon_r1", "dpo_r1", "bon_r2", "dpo_r2", "bon_r3", "dpo_r3", "eval",
    ]  # fmt: skip
    assert [recipe.stages[f"bon_r{r}"].policy_from for r in (1, 2, 3)] == ["sft", "dpo_r1", "dpo_r2"]
    assert [recipe.stages[f"dpo_r{r}"].policy_from for r in (1, 2, 3)] == ["sft", "dpo_r1", "dpo_r2"]
    # a group member's name means that member in the same round; other names are left alone
    assert [recipe.stages[f"dpo_r{r}"].pairs_from for r in (1, 2, 3)] == ["bon_r1", "bon_r2", "bon_r3"]
    assert {recipe.stages[f"dpo_r{r}"].reference_from for r in (1, 2, 3)} == {"sft"}
    assert {recipe.stages[f"bon_r{r}"].scorer.reward_from for r in (1, 2, 3)} == {"reward"}
    assert recipe.stages["bon_r1"].kind == "bon" and recipe.stages["dpo_r3"].kind == "dpo"
    assert recipe.stages["eval"].policies == ["sft", "dpo_r1", "dpo_r2", "dpo_r3"]
    # the resolved recipe (saved beside every output) lists the expanded stages
    assert "dpo_r3:" in recipe.resolved_yaml() and "$policy" not in recipe.resolved_yaml()


def test_round_number_in_strings_and_an_explicit_next_round_policy():
    body = group(rounds=2, policy="dpo")
    body["stages"]["bon"]["prompts"] = {"path": str(REPO / "data" / "tiny" / "prompts_r{round}.jsonl")}
    recipe = recipe_from_dict(recipe_with(body))
    assert [recipe.stages[f"bon_r{r}"].prompts.path for r in (1, 2)] == [
        str(REPO / "data" / "tiny" / f"prompts_r{r}.jsonl") for r in (1, 2)
    ]
    assert recipe.stages["bon_r2"].policy_from == "dpo_r1"


def test_the_shipped_iterative_recipe_chains_three_rounds_on_the_sft_reference():
    recipe = load_recipe(REPO / "recipes" / "iterative.yaml")
    assert recipe.stages["eval"].policies == ["sft", "dpo_r1", "dpo_r2", "dpo_r3"]
    assert recipe.stages["dpo_r3"].upstream() == {
        "policy_from": "dpo_r2",
        "reference_from": "sft",
        "data.train.from_stage[0]": "bon_r3",  # the reward model's pairs, mixed with
        "data.train.from_stage[1]": "label_r3",  # the round's checker-labelled pairs
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rounds": 0}, "stages.iterate.rounds: a whole number of rounds >= 1, got 0"),
        ({"start": None}, "stages.iterate.start: the stage whose policy round 1 starts from"),
        ({"policy": "label"}, "stages.iterate.policy: 'label' is not a stage of the group"),
        ({"stages": {}}, "stages.iterate.stages: a mapping of stage name -> settings"),
        ({"repeat": 2}, "stages.iterate: unknown key(s) repeat"),
        ({"start": "sfft"}, "stages.bon_r1.policy_from: no stage named 'sfft' (did you mean 'sft'?)"),
    ],
)
def test_bad_round_groups_are_refused_with_the_key_to_fix(change, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(recipe_with(group(**change)))
    assert message in str(err.value)


def test_a_round_stage_that_clashes_with_an_existing_stage_is_refused():
    raw = recipe_with(group())
    raw["stages"] = {"bon_r2": {**raw["stages"]["label"]}, **raw["stages"]}
    with pytest.raises(RecipeError, match="round stage 'bon_r2' clashes with a stage of the same name"):
        recipe_from_dict(raw)
