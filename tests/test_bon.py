"""Best-of-n: sampling, scoring, selection, resume, data-parallel launch, and RS-SFT on its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.builtin import tasks
from pipeline.config import DataSource, load_recipe
from pipeline.data.prompts import load_prompts
from pipeline.run import runner
from pipeline.util.errors import DataError, PipelineError

from conftest import REPO, SHARED_DATA


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------- prompts (fast)


def test_prompts_from_alpaca_rows_are_rendered_and_deduplicated(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"instruction": "Add.", "input": "1 and 2", "answer": "3"},
        {"instruction": "Say hi."},
        {"instruction": "Add.", "input": "1 and 2"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, stats = load_prompts(DataSource(path=str(path)), "alpaca")
    assert stats == {"rows": 3, "prompts": 2, "duplicates": 1}
    assert prompts[0].prompt.endswith("### Input:\n1 and 2\n\n### Response:") and prompts[0].row["answer"] == "3"
    assert len({p.prompt_id for p in prompts}) == 2
    again, _ = load_prompts(DataSource(path=str(path)), "alpaca")
    assert [p.prompt_id for p in again] == [p.prompt_id for p in prompts]  # stable ids
    chat, _ = load_prompts(DataSource(path=str(path)), "chat")
    assert chat[0].prompt == [{"role": "user", "content": "Add.\n\n1 and 2"}]


def test_bad_prompt_rows_name_file_and_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"instruction": "ok"}) + "\n" + json.dumps({"instruction": 7}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl row 2 \(line 2\): 'instruction' must be a non-empty string"):
        load_prompts(DataSource(path=str(path)), "alpaca")
    path.write_text(json.dumps({"query": "hello"}) + "\n")
    with pytest.raises(DataError, match=r"no prompt column.*columns: \{prompt: <your column>\}"):
        load_prompts(DataSource(path=str(path)), "alpaca")


@pytest.mark.skipif(not (SHARED_DATA / "vicuna_questions_80.jsonl").is_file(), reason="../shared/data not present")
def test_real_prompt_file_loads_as_instructions():
    prompts, stats = load_prompts(DataSource(path=str(SHARED_DATA / "vicuna_questions_80.jsonl")), "alpaca")
    assert stats["prompts"] == 80 and stats["duplicates"] == 0
    assert all(p.prompt.startswith("Below is an instruction") and p.prompt.endswith("### Response:") for p in prompts)
    assert prompts[0].row["category"] == "generic"


# ---------------------------------------------------------------- generation (fast-ish)


def test_greedy_sampler_equals_generate_with_padding_and_dropped_rows(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.rollout import generation
    from pipeline.rollout.engine import hf_engine, sample_prompts

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = read_jsonl(REPO / "data/tiny/prompts_bon.jsonl")[:12]
    from pipeline.builtin.prompt_templates import alpaca_prompt

    prompts = [alpaca_prompt(r["instruction"], r["input"]) for r in rows]
    # A random-weight model never emits EOS; make a token its greedy output does produce the stop token,
    # so some rows finish early and leave the batch while others go on.
    first = tok(prompts[0], return_tensors="pt")
    greedy = model.generate(**first, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    eos = int(greedy[0, first["input_ids"].shape[1] + 2])
    model.generation_config.eos_token_id = eos
    samples = sample_prompts(hf_engine(model, tok, 5), model, tok, prompts, n=2, max_new_tokens=12, temperature=0)
    assert len({len(generation.encode_prompts(tok, [p])[0]) for p in prompts}) > 1  # mixed lengths: padding used
    finished_early = 0
    for i, prompt in enumerate(prompts):
        enc = tok(prompt, return_tensors="pt")
        ref = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id, eos_token_id=eos)
        expected = ref[0, enc["input_ids"].shape[1] :].tolist()
        if eos in expected:
            expected = expected[: expected.index(eos) + 1]
            finished_early += 1
        assert samples[2 * i].token_ids == expected == samples[2 * i + 1].token_ids
    assert finished_early > 0


def test_sampling_is_seeded_and_top_p_restricts(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.rollout.engine import hf_engine, sample_prompts

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = ["Below is an instruction", "Hello"]
    a = sample_prompts(hf_engine(model, tok), model, tok, prompts, n=3, max_new_tokens=8, seed=5)
    b = sample_prompts(hf_engine(model, tok), model, tok, prompts, n=3, max_new_tokens=8, seed=5)
    c = sample_prompts(hf_engine(model, tok), model, tok, prompts, n=3, max_new_tokens=8, seed=6)
    assert [s.token_ids for s in a] == [s.token_ids for s in b] != [s.token_ids for s in c]
    tiny_p = sample_prompts(hf_engine(model, tok), model, tok, prompts, n=3, max_new_tokens=8, top_p=1e-6, seed=7)
    greedy = sample_prompts(hf_engine(model, tok), model, tok, prompts, n=3, max_new_tokens=8, temperature=0)
    assert [s.token_ids for s in tiny_p] == [s.token_ids for s in greedy]  # top_p -> 0 keeps only the top token


# ---------------------------------------------------------------- the stage (slow)


@pytest.mark.slow
def test_rubric_scored_best_of_8_plumbing(policy_copy):
    recipe_path, run_dir = policy_copy
    recipe = load_recipe(recipe_path)
    entry = runner.run_stage(recipe, "label", run_dir)
    assert entry["status"] == "done"
    m = entry["metrics"]
    pref = m["checks.preferred"]
    # With the rubric as the scorer, the selected best is preferred exactly when any of the 8 is.
    assert pref["best"] == pref["pass_at_n"]
    assert 0 < pref["first_sample"] < pref["best"]
    assert m["checks.correct"]["first_sample"] <= m["checks.correct"]["pass_at_n"]
    candidates = read_jsonl(entry["outputs"]["candidates"])
    assert len(candidates) == m["prompts"] * 8 == m["candidates"]
    assert {c["finish_reason"] for c in candidates} <= {"eos", "length"}
    pairs = read_jsonl(entry["outputs"]["pairs"])
    assert pairs and len(pairs) == m["pairs"]
    for pair in pairs:  # every pair is (preferred, not preferred)
        assert tasks.preferred(pair, pair["chosen"]) and not tasks.preferred(pair, pair["rejected"])
    best = read_jsonl(entry["outputs"]["best"])
    assert len(best) == m["prompts"] - m["select"]["best"]["prompts_without_valid"]
    assert all({"instruction", "input", "output", "prompt_id"} <= set(r) for r in best)  # Alpaca rows: SFT-ready
    assert sum(tasks.preferred(r, r["output"]) for r in best) == round(pref["best"] * m["prompts"])


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_interrupted_bon_resumes_finished_shards_and_matches_an_uninterrupted_run(policy_run, tmp_path, monkeypatch):
    import shutil

    from pipeline.rollout import sampling

    recipe_path, source = policy_run
    recipe = load_recipe(recipe_path)
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    shutil.copytree(source, clean)
    shutil.copytree(source, broken)
    runner.run_stage(recipe, "label", clean)

    real = sampling.sample_candidates  # the stage samples each shard through it
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 3:
            raise Interrupt("killed mid-generation")
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_candidates", crash_on_third)
    with pytest.raises(Interrupt):
        runner.run_stage(recipe, "label", broken)
    manifest = json.loads((broken / "manifest.json").read_text())["stages"]["label"]
    assert manifest["status"] == "failed" and "killed mid-generation" in manifest["error"]
    shard_dir = next((broken / "label").glob("shards-*"))
    finished = sorted(shard_dir.glob("shard-*.jsonl"))
    assert [p.name for p in finished] == ["shard-00000.jsonl", "shard-00001.jsonl"]
    assert not (broken / "label" / "candidates.jsonl").exists()  # nothing half-written marked complete
    stamps = {p.name: p.stat().st_mtime_ns for p in finished}

    calls.clear()
    monkeypatch.setattr(sampling, "sample_candidates", lambda *a, **k: (calls.append(k["seed"]), real(*a, **k))[1])
    entry = runner.run_stage(recipe, "label", broken)
    assert entry["status"] == "done" and entry["metrics"]["shards_resumed"] == 2
    assert len(calls) == entry["metrics"]["shards"] - 2  # finished shards were not regenerated
    assert {p.name: p.stat().st_mtime_ns for p in finished} == stamps
    assert read_jsonl(broken / "label" / "candidates.jsonl") == read_jsonl(clean / "label" / "candidates.jsonl")


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_process_bon_covers_the_same_prompts_once(policy_copy, tmp_path):
    import shutil

    recipe_path, run_dir = policy_copy
    single = tmp_path / "single"
    shutil.copytree(run_dir, single)
    runner.run_stage(load_recipe(recipe_path), "label", single)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "launch/cpu_2proc.yaml"),
        "--main_process_port",
        "0",
        "-m",
        "pipeline",
        "stage",
        "label",
        str(recipe_path),
        "--output-dir",
        str(run_dir),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["label"]
    assert entry["status"] == "done" and entry["world_size"] == 2 and entry["distributed_type"] == "MULTI_CPU"
    two = read_jsonl(run_dir / "label" / "candidates.jsonl")
    one = read_jsonl(single / "label" / "candidates.jsonl")
    keys = [(c["prompt_id"], c["sample_idx"]) for c in two]
    assert len(keys) == len(set(keys))  # each prompt sample once
    assert {c["prompt_id"] for c in two} == {c["prompt_id"] for c in one}
    assert [(c["prompt_id"], c["sample_idx"], c["response"]) for c in two] == [
        (c["prompt_id"], c["sample_idx"], c["response"]) for c in one
    ]


@pytest.mark.slow
def test_rejection_sampling_sft_trains_on_the_best(policy_copy):
    recipe_path, run_dir = policy_copy
    raw = __import__("yaml").safe_load(Path(recipe_path).read_text())
    raw["stages"]["label"]["select"] = {"min_score": 0.5}  # accepted responses only
    raw["stages"]["rs_sft"] = {
        "kind": "sft",
        "init_from": "sft",
        "data": {"train": {"from_stage": "label"}, "max_length": 128},
        "train": {"learning_rate": 1e-3, "max_steps": 5, "batch_size": 8, "save_steps": 5, "precision": "fp32"},
    }
    path = run_dir.parent / "rs.yaml"
    path.write_text(__import__("yaml").safe_dump(raw, sort_keys=False))
    recipe = load_recipe(path)
    bon_entry = runner.run_stage(recipe, "label", run_dir)
    entry = runner.run_stage(recipe, "rs_sft", run_dir)
    assert entry["status"] == "done" and entry["upstream"] == {
        "sft": json.loads((run_dir / "manifest.json").read_text())["stages"]["sft"]["config_hash"],
        "label": bon_entry["config_hash"],
    }
    summary = json.loads((run_dir / "rs_sft" / "data_summary.json").read_text())
    best = read_jsonl(bon_entry["outputs"]["best"])
    assert summary["train"]["rows"] == len(best) == bon_entry["metrics"]["best_rows"]
    assert all(tasks.preferred(r, r["output"]) for r in best)  # min_score kept accepted responses only


@pytest.mark.slow
def test_checker_that_cannot_be_imported_is_a_clear_error(policy_copy):
    recipe_path, run_dir = policy_copy
    recipe = load_recipe(recipe_path, ["stages.label.scorer.checker=no_such_module:check"])
    with pytest.raises(PipelineError, match=r"stages\.label\.scorer\.checker: cannot import module 'no_such_module'"):
        runner.run_stage(recipe, "label", run_dir)
    recipe = load_recipe(recipe_path, ["stages.label.scorer.checker=pipeline.builtin.tasks:nope"])
    with pytest.raises(PipelineError, match=r"has no function 'nope'; it has: .*answer_correct"):
        runner.run_stage(recipe, "label", run_dir)


def test_bon_needs_a_finished_policy(make_recipe, tmp_path):
    recipe = load_recipe(
        make_recipe(
            {
                "stages": {
                    "label": {
                        "kind": "bon",
                        "policy_from": "sft",
                        "prompts": {"path": str(REPO / "data/tiny/prompts_label.jsonl")},
                        "scorer": {"checker": "pipeline.builtin.tasks:preferred"},
                    }
                }
            }
        )
    )
    with pytest.raises(PipelineError, match=r"stage 'label' needs the output of stage 'sft', which is not run"):
        runner.run_stage(recipe, "label", tmp_path / "run")
