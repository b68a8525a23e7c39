"""Weighted dataset mixtures: shares under the seed, repeats, per-source counts, config errors, and the cache
rerunning only the stage whose mixture changed (and what depends on it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import DataSource, Mixture, PreferenceDataConfig, load_recipe
from pipeline.data.mixture import Part, mix
from pipeline.data.preference.prepare import prepare_pairs
from pipeline.data.prompts import load_prompts
from pipeline.util.errors import RecipeError

from conftest import BASE_RECIPE, TINY, merge, run_cli


def parts(*sizes: int) -> list[Part]:
    return [Part(f"s{i}", [f"s{i}-{j}" for j in range(n)], {"read": n, "kept": n}) for i, n in enumerate(sizes)]


def sources(**amounts) -> list[DataSource]:
    return [DataSource(path=f"s{i}.jsonl", **{key: value}) for i, (key, value) in enumerate(amounts.items())]


def weighted(*weights: float, rows: int | None = None) -> Mixture:
    return Mixture(sources=[DataSource(path=f"s{i}.jsonl", weight=w) for i, w in enumerate(weights)], rows=rows)


def test_weights_give_their_shares_of_the_rows_the_same_under_the_seed_and_different_under_another():
    mixture = weighted(0.5, 0.3, 0.2, rows=601)
    rows, summary = mix(parts(1000, 500, 300), mixture, seed=0)
    taken = [s["taken"] for s in summary]
    assert sum(taken) == len(rows) == 601
    assert all(abs(t - 601 * w) <= 1 for t, w in zip(taken, (0.5, 0.3, 0.2))), taken
    assert [sum(r.startswith(f"s{i}-") for r in rows) for i in range(3)] == taken
    assert [s["share"] for s in summary] == [round(t / 601, 4) for t in taken]
    assert len(set(rows)) == 601  # no source ran out: no repeats
    again, _ = mix(parts(1000, 500, 300), mixture, seed=0)
    other, _ = mix(parts(1000, 500, 300), mixture, seed=1)
    assert again == rows and other != rows


def test_without_a_size_the_weights_take_the_largest_mix_that_repeats_nothing():
    rows, summary = mix(parts(1000, 500, 300), weighted(0.5, 0.3, 0.2), seed=0)
    assert len(rows) == 1500  # the 300-row source is 20%: it limits the mix to 1500
    assert [s["taken"] for s in summary] == [750, 450, 300]
    assert all(s["repeated"] == 0 for s in summary)


def test_a_share_larger_than_its_source_repeats_its_rows_and_counts_them():
    rows, summary = mix(parts(100, 40), weighted(0.5, 0.5, rows=200), seed=0)
    assert [s["taken"] for s in summary] == [100, 100]
    assert [s["repeated"] for s in summary] == [0, 60]
    small = [r for r in rows if r.startswith("s1-")]
    assert len(small) == 100 and len(set(small)) == 40
    assert all(2 <= small.count(r) <= 3 for r in set(small))  # two whole passes, then 20 drawn once more


def test_fixed_amounts_rows_fraction_and_all():
    mixture = Mixture(
        sources=[
            DataSource(path="a.jsonl", rows=30),
            DataSource(path="b.jsonl", fraction=0.25),
            DataSource(path="c.jsonl"),
        ]
    )
    rows, summary = mix(parts(100, 80, 7), mixture, seed=3)
    assert [s["taken"] for s in summary] == [30, 20, 7]
    assert summary[0]["rows"] == 30 and summary[1]["fraction"] == 0.25
    assert [r for r in rows if r.startswith("s2-")] == [f"s2-{j}" for j in range(7)]


@pytest.mark.parametrize(
    "train, message",
    [
        ([{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl"}], r"sources\[1\] has no weight while others do"),
        ({"rows": 10, "sources": [{"path": "a.jsonl", "rows": 5}]}, "'rows' is the size of a weighted mix"),
        ([{"path": "a.jsonl", "weight": 1, "rows": 5}], "give one of weight / rows"),
        ([{"path": "a.jsonl", "weight": 0}], r"stages\.sft\.data\.train\.sources\.0\.weight: .*greater than 0"),
        ([], r"stages\.sft\.data\.train\.sources: .*at least 1"),
    ],
)
def test_bad_mixtures_name_the_key_and_the_fix(tmp_path, train, message):
    import re

    recipe = merge(BASE_RECIPE, {"stages": {"sft": {"data": {"train": train}}}})
    recipe["stages"]["sft"]["data"]["train"] = train
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert re.search(message, str(err.value)), str(err.value)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_preference_mixture_counts_what_each_source_read_kept_and_dropped(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(50)])
    b = write_rows(
        tmp_path / "b.jsonl",
        [{"prompt": f"r{i}", "chosen": "yes", "rejected": "no"} for i in range(20)]
        + [{"prompt": "broken", "chosen": "no rejected answer"}],
    )
    cfg = PreferenceDataConfig(
        train=[{"path": str(a), "rows": 10}, {"path": str(b), "fraction": 1.0}], eval_fraction=0, on_bad_row="drop"
    )
    train, held, summary = prepare_pairs(cfg.train, None, cfg, seed=0)
    assert held == [] and len(train) == 30
    by_source = {Path(s["source"]).name: s for s in summary["mixture"]}
    assert by_source["a.jsonl"]["taken"] == 10 and by_source["a.jsonl"]["read"] == 50
    assert by_source["b.jsonl"]["read"] == 21 and by_source["b.jsonl"]["kept"] == 20
    assert sum(by_source["b.jsonl"]["dropped"].values()) == 1


def test_prompt_mixture_samples_each_prompt_once(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", [{"instruction": f"Task {i}."} for i in range(30)])
    b = write_rows(tmp_path / "b.jsonl", [{"instruction": f"Task {i}."} for i in range(20, 40)])
    mixture = Mixture(sources=[DataSource(path=str(a)), DataSource(path=str(b))])
    prompts, stats = load_prompts(mixture, "alpaca", seed=0)
    assert len(prompts) == 40 and stats["duplicates"] == 10  # Task 20..29 are in both
    assert [s["taken"] for s in stats["mixture"]] == [30, 20]
    assert len({p.prompt_id for p in prompts}) == 40


def split_tiny_sft(tmp_path: Path) -> list[Path]:
    rows = [json.loads(line) for line in (TINY / "sft_train.jsonl").read_text().splitlines()]
    bounds = [(0, 1000), (1000, 1600), (1600, 1900)]
    return [write_rows(tmp_path / f"part{i}.jsonl", rows[lo:hi]) for i, (lo, hi) in enumerate(bounds)]


@pytest.mark.slow
def test_sft_mixture_shares_and_a_changed_weight_reruns_only_that_stage_and_its_dependents(tmp_path):
    files = split_tiny_sft(tmp_path)
    weights = [0.5, 0.3, 0.2]
    short = {"max_steps": 4, "batch_size": 8, "logging_steps": 2, "save_steps": 4, "precision": "fp32"}

    def recipe(weights) -> Path:
        mixed = {"rows": 400, "sources": [{"path": str(f), "weight": w} for f, w in zip(files, weights)]}
        body = merge(BASE_RECIPE, {"stages": {"sft": {"train": short}}})
        body["stages"]["sft"]["data"]["train"] = mixed
        body["stages"]["other"] = merge(body["stages"]["sft"], {})
        body["stages"]["other"]["data"]["train"] = {"path": str(files[2]), "limit": 40}
        body["stages"]["next"] = {**merge(body["stages"]["other"], {}), "init_from": "sft"}
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        return path

    run_dir = tmp_path / "run"
    first = run_cli("run", str(recipe(weights)), "--output-dir", str(run_dir))
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((run_dir / "sft" / "data_summary.json").read_text())
    taken = [s["taken"] for s in summary["mixture"]]
    assert all(abs(t - 400 * w) <= 2 for t, w in zip(taken, weights)), taken
    assert summary["train_rows"] == 400 and summary["train"]["rows"] == 1900
    assert [s["read"] for s in summary["mixture"]] == [1000, 600, 300]
    assert "mixture: 400 rows from 3 source(s)" in first.stdout
    assert "part2.jsonl: read 300, kept 300, took 80 = 20.0% of the mix" in first.stdout

    manifest = json.loads((run_dir / "manifest.json").read_text())
    ended = {name: manifest["stages"][name]["ended_at"] for name in ("sft", "other", "next")}
    again = run_cli("run", str(recipe([0.5, 0.2, 0.3])), "--output-dir", str(run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rerun = {name for name in ended if manifest["stages"][name]["ended_at"] != ended[name]}
    assert rerun == {"sft", "next"}
    summary = json.loads((run_dir / "sft" / "data_summary.json").read_text())
    assert [s["taken"] for s in summary["mixture"]] == [200, 80, 120]


def test_a_mixture_source_from_a_stage_is_wired_and_checked_like_a_single_one(tmp_path):
    from conftest import POLICY_RECIPE

    body = merge(POLICY_RECIPE, {})
    body["stages"]["more"] = merge(body["stages"]["sft"], {})
    body["stages"]["more"]["data"]["train"] = [
        {"path": str(TINY / "sft_train.jsonl"), "weight": 3},
        {"from_stage": "label", "output": "best", "weight": 1},
    ]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    assert load_recipe(path).stages["more"].upstream() == {"data.train.from_stage": "label"}
    body["stages"]["more"]["data"]["train"][1]["from_stage"] = "sft"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    with pytest.raises(RecipeError, match=r"stages\.more\.data\.train\.from_stage: stage 'sft' is a 'sft' stage"):
        load_recipe(path)
