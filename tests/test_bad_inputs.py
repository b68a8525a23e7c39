"""A corpus of bad inputs, each through the real CLI: exit code 2, no traceback, and a message naming the file,
row or key at fault. Only failures that happen before any model loads: recipes and data through `validate`
(no torch), operations through `run` / `stage` / `export` where they refuse before training.

Cases here complement tests/test_config.py, test_data.py and test_preference_data.py (which call the loaders
in-process); the point of this module is the whole path a user sees, for many inputs at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipeline.run.lock import TOKEN_ENV

from conftest import BASE_RECIPE, REPO, TINY, merge, run_cli

SFT = TINY / "sft_train.jsonl"
PROMPTS = TINY / "prompts_label.jsonl"
GOOD_PAIR = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."}


@dataclass
class Case:
    """``build(tmp) -> CLI args``; each of ``expect`` must appear in stderr."""

    id: str
    build: Callable[[Path], list[str]]
    expect: tuple[str, ...]
    env: dict = field(default_factory=dict)


def recipe(tmp: Path, extra: dict | None = None, drop: tuple[str, ...] = (), text: str | None = None) -> str:
    """A recipe file in tmp: BASE_RECIPE merged with ``extra`` (minus top-level keys in ``drop``), or raw ``text``."""
    path = tmp / "recipe.yaml"
    if text is not None:
        path.write_text(text)
    else:
        data = {k: v for k, v in merge(BASE_RECIPE, extra or {}).items() if k not in drop}
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def validate(extra: dict | None = None, *sets: str, drop: tuple[str, ...] = ()) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        args = ["validate", recipe(tmp, extra, drop)]
        for item in sets:
            args += ["--set", item]
        return args

    return build


def raw(text: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["validate", recipe(tmp, text=text)]


def write(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def sft_file(name: str, content: str | bytes, template: str = "alpaca", **source) -> Callable[[Path], list[str]]:
    """validate a recipe whose sft stage trains on a file with ``content``."""

    def build(tmp: Path) -> list[str]:
        path = write(tmp, name, content)
        data = {
            "train": {"path": path, "limit": None, **source},
            "eval": None,
            "eval_fraction": 0.1,
            "template": template,
        }
        return ["validate", recipe(tmp, {"stages": {"sft": {"data": data}}})]

    return build


def pairs_file(name: str, content: str, **data) -> Callable[[Path], list[str]]:
    """validate a recipe with a dpo stage on a pairs file with ``content``."""

    def build(tmp: Path) -> list[str]:
        path = write(tmp, name, content)
        stage = {"kind": "dpo", "policy_from": "sft", "data": {"train": {"path": path}, **data}}
        return ["validate", recipe(tmp, {"stages": {"dpo": stage}})]

    return build


def prompts_file(name: str, content: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        path = write(tmp, name, content)
        stage = {
            "kind": "bon",
            "policy_from": "sft",
            "prompts": {"path": path},
            "scorer": {"checker": "pipeline.builtin.tasks:preferred"},
        }
        return ["validate", recipe(tmp, {"stages": {"label": stage}})]

    return build


def stage(extra_stage: dict, name: str = "x") -> Callable[[Path], list[str]]:
    return validate({"stages": {name: extra_stage}})


BON = {
    "kind": "bon",
    "policy_from": "sft",
    "prompts": {"path": str(PROMPTS)},
    "scorer": {"checker": "pipeline.builtin.tasks:preferred"},
}
DPO = {"kind": "dpo", "policy_from": "sft", "data": {"train": {"path": str(SFT)}}}

RECIPE_CASES = [
    Case("unknown-top-level-key", validate({"modle": {}}), ("modle", "model")),
    Case(
        "unknown-train-key",
        validate({"stages": {"sft": {"train": {"lerning_rate": 1e-3}}}}),
        ("stages.sft.train.lerning_rate", "learning_rate"),
    ),
    Case("unknown-model-key", validate({"model": {"dtpye": "float32"}}), ("model.dtpye", "dtype")),
    Case("seed-not-int", validate({"seed": "abc"}), ("seed",)),
    Case(
        "learning-rate-string",
        validate({"stages": {"sft": {"train": {"learning_rate": "fast"}}}}),
        ("stages.sft.train.learning_rate",),
    ),
    Case(
        "negative-learning-rate",
        validate({"stages": {"sft": {"train": {"learning_rate": -1}}}}),
        ("stages.sft.train.learning_rate",),
    ),
    Case(
        "max-length-zero", validate({"stages": {"sft": {"data": {"max_length": 0}}}}), ("stages.sft.data.max_length",)
    ),
    Case("unknown-stage-kind", stage({"kind": "ppo"}), ("stages.x", "ppo")),
    Case("stage-without-kind", stage({"policy_from": "sft"}), ("stages.x", "kind")),
    Case(
        "unknown-template",
        validate({"stages": {"sft": {"data": {"template": "chatml"}}}}),
        ("stages.sft.data.template", "chatml"),
    ),
    Case("unknown-dtype", validate({"model": {"dtype": "fp8"}}), ("model.dtype",)),
    Case("unknown-report-to", validate({"tracking": {"report_to": "mlflow"}}), ("tracking.report_to", "mlflow")),
    Case(
        "unknown-wandb-mode",
        validate({"tracking": {"report_to": "wandb", "wandb": {"mode": "sometimes"}}}),
        ("tracking.wandb.mode",),
    ),
    Case("4bit-without-lora", validate({"model": {"quantization": "4bit"}}), ("quantization", "lora")),
    Case("lora-rank-zero", validate({"lora": {"r": 0}}), ("lora.r",)),
    Case("reference-to-missing-stage", stage({**DPO, "policy_from": "sfft"}), ("stages.x.policy_from", "sfft")),
    Case("reference-to-wrong-kind", stage({**BON, "policy_from": "label"}, "label"), ("stages.label.policy_from",)),
    Case(
        "source-without-origin",
        stage({**DPO, "data": {"train": {"limit": 3}}}, "dpo"),
        ("stages.dpo.data.train", "path"),
    ),
    Case(
        "source-path-and-hub",
        validate({"stages": {"sft": {"data": {"train": {"path": str(SFT), "hub": "a/b"}}}}}),
        ("stages.sft.data.train", "exactly one"),
    ),
    Case(
        "unsupported-file-type",
        validate({"stages": {"sft": {"data": {"train": {"path": "rows.txt"}}}}}),
        ("rows.txt", ".jsonl"),
    ),
    Case(
        "data-dir-without-hub",
        validate({"stages": {"sft": {"data": {"train": {"path": str(SFT), "data_dir": "x"}}}}}),
        ("stages.sft.data.train", "data_dir"),
    ),
    Case(
        "output-without-from-stage",
        validate({"stages": {"sft": {"data": {"train": {"path": str(SFT), "output": "best"}}}}}),
        ("stages.sft.data.train", "output"),
    ),
    Case(
        "scorer-checker-and-reward",
        stage({**BON, "scorer": {"checker": "pipeline.builtin.tasks:preferred", "reward_from": "sft"}}, "label"),
        ("stages.label.scorer", "exactly one"),
    ),
    Case(
        "checker-not-a-function-ref",
        stage({**BON, "scorer": {"checker": "not_a_ref"}}, "label"),
        ("stages.label.scorer.checker", "not_a_ref"),
    ),
    Case("top-p-above-one", stage({**BON, "top_p": 1.5}, "label"), ("stages.label.top_p",)),
    Case(
        "loss-weights-mismatch",
        stage({**DPO, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "dpo"),
        ("stages.dpo", "loss_weights"),
    ),
    Case("pairs-from-and-data", stage({**DPO, "pairs_from": "sft"}, "dpo"), ("stages.dpo", "pairs_from")),
    Case(
        "eval-without-policies",
        stage({"kind": "eval", "prompts": {"path": str(PROMPTS)}, "policies": [], "reference": "sft"}, "eval"),
        ("stages.eval.policies",),
    ),
    Case("yaml-syntax-error", raw("name: x\nstages: {sft: [\n"), ("recipe.yaml", "not valid YAML")),
    Case("recipe-is-a-list", raw("- name: x\n"), ("recipe.yaml", "mapping")),
    Case("empty-recipe", raw(""), ("recipe.yaml", "mapping")),
    Case("missing-name", validate(drop=("name",)), ("name",)),
    Case(
        "local-model-dir-missing",
        validate({"model": {"name_or_path": "./no-such-model"}}),
        ("model.name_or_path", "no-such-model"),
    ),
    Case(
        "missing-data-file",
        validate({"stages": {"sft": {"data": {"train": {"path": "missing.jsonl"}}}}}),
        ("missing.jsonl", "not found"),
    ),
]

SET_CASES = [
    Case("set-without-equals", validate(None, "stages.sft.train.learning_rate"), ("--set", "key.path=value")),
    Case("set-unknown-key", validate(None, "stages.sft.train.lr=1e-4"), ("stages.sft.train.lr",)),
    Case("set-wrong-type", validate(None, "stages.sft.train.max_steps=many"), ("stages.sft.train.max_steps",)),
    Case("set-into-a-value", validate(None, "seed.value=1"), ("--set", "seed", "is a value")),
    Case("set-unknown-stage", validate(None, "stages.sfft.train.max_steps=3"), ("stages.sfft",)),
]

DATA_CASES = [
    Case(
        "jsonl-bad-json",
        sft_file("bad.jsonl", jsonl({"instruction": "a", "output": "b"}, '{"instruction": "x", ')),
        ("bad.jsonl line 2", "invalid JSON"),
    ),
    Case(
        "jsonl-row-not-object",
        sft_file("list.jsonl", jsonl({"instruction": "a", "output": "b"}, "[1, 2]")),
        ("list.jsonl line 2", "JSON object"),
    ),
    Case("jsonl-empty-file", sft_file("empty.jsonl", ""), ("empty.jsonl", "no rows")),
    Case(
        "alpaca-missing-output",
        sft_file("noout.jsonl", jsonl({"instruction": "a", "input": ""}), format="alpaca"),
        ("noout.jsonl", "output"),
    ),
    Case(
        "alpaca-empty-instruction",
        sft_file("emptyinst.jsonl", jsonl({"instruction": "a", "output": "b"}, {"instruction": " ", "output": "b"})),
        ("emptyinst.jsonl row 2", "instruction"),
    ),
    Case(
        "alpaca-output-not-string",
        sft_file("numout.jsonl", jsonl({"instruction": "a", "output": "b"}, {"instruction": "a", "output": 5})),
        ("numout.jsonl row 2", "output"),
    ),
    Case(
        "unknown-columns", sft_file("cols.jsonl", jsonl({"question": "a", "answer": "b"})), ("cols.jsonl", "question")
    ),
    Case(
        "column-mapping-names-missing-column",
        sft_file("map.jsonl", jsonl({"q": "a", "a": "b"}), columns={"instruction": "question", "output": "a"}),
        ("map.jsonl", "question"),
    ),
    Case(
        "messages-last-turn-not-assistant",
        sft_file(
            "msgs.jsonl",
            jsonl({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}),
            template="chat",
        ),
        ("msgs.jsonl row 1", "assistant"),
    ),
    Case(
        "messages-unknown-role",
        sft_file(
            "roles.jsonl",
            jsonl({"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
            template="chat",
        ),
        ("roles.jsonl row 1", "human"),
    ),
    Case(
        "sharegpt-unknown-from",
        sft_file(
            "sg.jsonl",
            jsonl({"conversations": [{"from": "alien", "value": "hi"}, {"from": "gpt", "value": "yo"}]}),
            template="chat",
        ),
        ("sg.jsonl row 1", "alien"),
    ),
    Case("json-not-a-list", sft_file("obj.json", json.dumps({"a": 1, "b": 2})), ("obj.json", "list")),
    Case("json-invalid", sft_file("broken.json", '[{"instruction": "a",]'), ("broken.json", "invalid JSON at line 1")),
    Case(
        "csv-extra-field",
        sft_file("extra.csv", "instruction,output\na,b\nc,d,e\n"),
        ("extra.csv line 3", "more fields"),
    ),
    Case("csv-empty", sft_file("empty.csv", ""), ("empty.csv", "empty CSV")),
    Case(
        "not-utf8",
        sft_file("latin1.jsonl", '{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1")),
        ("latin1.jsonl", "UTF-8"),
    ),
    Case("parquet-corrupt", sft_file("bad.parquet", b"PAR1 this is not parquet"), ("bad.parquet", "Parquet")),
    Case(
        "pairs-missing-rejected",
        pairs_file(
            "norej.jsonl", jsonl({"prompt": "a", "chosen": "b"}), **{"train": {"path": "", "format": "explicit"}}
        ),
        ("norej.jsonl", "rejected"),
    ),
    Case(
        "pairs-identical-with-lint-error",
        pairs_file("same.jsonl", jsonl(GOOD_PAIR, {"prompt": "a", "chosen": "same", "rejected": "same"}), lint="error"),
        ("same.jsonl row 2",),
    ),
    Case(
        "pairs-chosen-not-string",
        pairs_file("num.jsonl", jsonl(GOOD_PAIR, {"prompt": "a", "chosen": 3, "rejected": "b"})),
        ("num.jsonl row 2", "chosen"),
    ),
    Case(
        "ranked-scores-length-mismatch",
        pairs_file("ranked.jsonl", jsonl({"prompt": "a", "responses": ["x", "y"], "scores": [1.0]})),
        ("ranked.jsonl row 1", "scores"),
    ),
    Case(
        "prompts-without-prompt-column",
        prompts_file("p.jsonl", jsonl({"query_text": "hi"})),
        ("p.jsonl", "no prompt column"),
    ),
    Case(
        "prompts-empty-instruction",
        prompts_file("pi.jsonl", jsonl({"instruction": "ok"}, {"instruction": ""})),
        ("pi.jsonl row 2", "instruction"),
    ),
]


def _pairs_missing_rejected(tmp: Path) -> list[str]:
    path = write(tmp, "norej.jsonl", jsonl({"prompt": "a", "chosen": "b"}))
    stage = {"kind": "dpo", "policy_from": "sft", "data": {"train": {"path": path, "format": "explicit"}}}
    return ["validate", recipe(tmp, {"stages": {"dpo": stage}})]


DATA_CASES[[c.id for c in DATA_CASES].index("pairs-missing-rejected")].build = _pairs_missing_rejected


def _run_recipe(tmp: Path, extra: dict | None = None) -> str:
    return recipe(tmp, extra)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _export_missing_stage(tmp: Path) -> list[str]:
    run_dir = tmp / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(
        json.dumps({"stages": {"sft": {"status": "done", "kind": "sft", "outputs": {}}}})
    )
    return ["export", str(run_dir), "dpo", str(tmp / "out")]


CLI_CASES = [
    Case("unknown-command", lambda tmp: ["trian", "recipe.yaml"], ("invalid choice", "trian")),
    Case(
        "validate-missing-recipe",
        lambda tmp: ["validate", str(tmp / "nope.yaml")],
        ("recipe file not found", "nope.yaml"),
    ),
    Case(
        "run-unknown-stage",
        lambda tmp: ["run", _run_recipe(tmp), "--stages", "sft,dpoo", "--output-dir", str(tmp / "run")],
        ("no stage 'dpoo'",),
    ),
    Case(
        "stage-unknown-name",
        lambda tmp: ["stage", "sfft", _run_recipe(tmp), "--output-dir", str(tmp / "run")],
        ("no stage 'sfft'", "did you mean"),
    ),
    Case(
        "run-missing-data-file",
        lambda tmp: [
            "run",
            _run_recipe(tmp, {"stages": {"sft": {"data": {"train": {"path": "gone.jsonl"}}}}}),
            "--output-dir",
            str(tmp / "run"),
        ],
        ("gone.jsonl", "not found"),
    ),
    Case(
        "plan-bad-gpu-memory", lambda tmp: ["plan", _run_recipe(tmp), "--gpu-memory", "lots"], ("--gpu-memory", "lots")
    ),
    Case("export-missing-run-dir", lambda tmp: ["export", str(tmp / "no-run"), "sft", str(tmp / "out")], ("no-run",)),
    Case("export-stage-not-in-run", _export_missing_stage, ("dpo",)),
    Case(
        "run-wandb-online-unreachable",
        lambda tmp: [
            "run",
            _run_recipe(tmp, {"tracking": {"report_to": "wandb", "wandb": {"mode": "online"}}}),
            "--output-dir",
            str(tmp / "run"),
        ],
        ("tracking.wandb.mode is online", "cannot be reached"),
        env={"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{_closed_port()}"},
    ),
    Case(
        "run-hub-model-offline",
        lambda tmp: [
            "run",
            _run_recipe(tmp, {"model": {"name_or_path": "some-org/some-model"}}),
            "--output-dir",
            str(tmp / "run"),
        ],
        ("some-org/some-model", "HF_HUB_OFFLINE", "local directory"),
        env={"HF_HUB_OFFLINE": "1"},
    ),
    Case(
        "run-hub-model-unreachable",
        lambda tmp: [
            "run",
            _run_recipe(tmp, {"model": {"name_or_path": "some-org/some-model"}}),
            "--output-dir",
            str(tmp / "run"),
        ],
        ("some-org/some-model", "cannot be reached", "huggingface-cli download"),
        env={"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HUB_OFFLINE": "0"},
    ),
    Case(
        "run-hub-dataset-unreachable",
        lambda tmp: [
            "run",
            _run_recipe(tmp, {"stages": {"sft": {"data": {"train": {"hub": "some-org/some-data", "path": None}}}}}),
            "--output-dir",
            str(tmp / "run"),
        ],
        ("stages.sft.data.train: some-org/some-data", "cannot be reached", "use 'path:'", "HF_HUB_OFFLINE=1"),
        env={"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HUB_OFFLINE": "0", "HF_HOME": "/nonexistent-hf"},
    ),
    Case(
        "run-damaged-manifest",
        lambda tmp: _damaged_manifest_run(tmp),
        ("manifest.json is damaged", "not valid JSON", "To recover: move it aside"),
    ),
]


def _damaged_manifest_run(tmp: Path) -> list[str]:
    run_dir = tmp / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text('{"stages": {"sft": {"status": "do')
    return ["run", _run_recipe(tmp), "--output-dir", str(run_dir)]


CASES = RECIPE_CASES + SET_CASES + DATA_CASES + CLI_CASES


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_a_message_naming_it(case: Case, tmp_path):
    out = run_cli(*case.build(tmp_path), env={TOKEN_ENV: "", **case.env}, timeout=120)
    assert out.returncode == 2, f"exit {out.returncode}\nstdout: {out.stdout[-1500:]}\nstderr: {out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for expected in case.expect:
        assert expected in out.stderr, f"{expected!r} not in:\n{out.stderr[-3000:]}"


LOCK_HOLDER = "import sys, time; from pipeline.run.lock import run_dir_lock\nwith run_dir_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n"


@pytest.mark.parametrize("command", ["run", "stage"])
def test_locked_run_dir_exits_2_naming_the_holder(command, tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(run_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["run", _run_recipe(tmp_path)] if command == "run" else ["stage", "sft", _run_recipe(tmp_path)]
        out = run_cli(*args, "--output-dir", str(run_dir), env={TOKEN_ENV: ""})
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{run_dir} is in use by pid {holder.pid}" in out.stderr


def test_corpus_is_large():
    assert len(CASES) + 2 >= 50


def test_a_missing_model_directory_is_named_as_such_not_as_a_hub_id(tmp_path):
    from pipeline.modeling.loading import cannot_load

    gone = str(tmp_path / "old-place" / "sft" / "model")
    message = cannot_load("tokenizer", gone, OSError("Repo id must be in the form 'repo_name'"))
    assert message == f"cannot load the tokenizer of {gone!r}: no such directory (was it moved or deleted?)"
    assert "Hugging Face Hub" in cannot_load("model", "org/some-model", OSError("404"))
