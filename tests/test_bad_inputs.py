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
    env: dict | Callable[[Path], dict] = field(default_factory=dict)  # or env(tmp)


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

DUPLICATE_STAGE = f"""name: t
model: {{name_or_path: "builtin:tiny-llama"}}
stages:
  sft:
    kind: sft
    data: {{train: {{path: {SFT}}}}}
  sft:
    kind: sft
    data: {{train: {{path: {SFT}}}, max_length: 64}}
"""


def checker_module(source: str, ref: str, where: str = "scorer") -> Callable[[Path], list[str]]:
    """validate a bon stage whose checker (``where``: scorer or report) is ``ref`` in a module written to tmp."""

    def build(tmp: Path) -> list[str]:
        (tmp / "user_checks.py").write_text(source)
        body = {**BON, "scorer": {"checker": ref}} if where == "scorer" else {**BON, "report": {"mine": ref}}
        return ["validate", recipe(tmp, {"stages": {"label": body}})]

    return build


def on_pythonpath(tmp: Path) -> dict:
    return {"PYTHONPATH": str(tmp)}


def data_path_kind(make: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        return ["validate", recipe(tmp, {"stages": {"sft": {"data": {"train": {"path": str(make(tmp))}}}}})]

    return build


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


GRPO = {
    "kind": "grpo",
    "policy_from": "sft",
    "prompts": {"path": str(PROMPTS)},
    "rewards": {"acc": {"checker": "no_such_rewards:accuracy"}},
}
EVAL = {"kind": "eval", "prompts": {"path": str(PROMPTS)}, "policies": ["sft"], "reference": "sft"}

PREFLIGHT_CASES = [  # recipes that parse but would fail only when a stage starts (hours in, on a real model)
    Case(
        "duplicate-stage-name",
        raw(DUPLICATE_STAGE),
        ("recipe.yaml: duplicate key", "stages.sft: line 7 repeats line 4", "rename one or merge them"),
    ),
    Case(
        "duplicate-key-in-a-section",
        raw('name: t\nmodel: {name_or_path: "builtin:tiny-llama", dtype: float32, dtype: bfloat16}\nstages: {}\n'),
        ("recipe.yaml: duplicate key", "model.dtype: given twice on line 2"),
    ),
    Case(
        "duplicate-key-in-set", validate(None, "lora={r: 8, r: 16}"), ("--set 'lora={r: 8, r: 16}'", "r: given twice")
    ),
    Case("recipe-is-a-directory", lambda tmp: ["validate", str(tmp)], ("is a directory", "YAML file")),
    Case(
        "checker-module-missing",
        stage({**BON, "scorer": {"checker": "no_such_checks:fn"}}, "label"),
        ("stages.label.scorer.checker", "cannot import module 'no_such_checks'", "PYTHONPATH"),
    ),
    Case(
        "checker-function-missing",
        stage({**BON, "scorer": {"checker": "pipeline.builtin.tasks:no_such"}}, "label"),
        ("stages.label.scorer.checker", "has no function 'no_such'", "answer_correct"),
    ),
    Case(
        "checker-takes-one-argument",
        checker_module("def judge(response):\n    return True\n", "user_checks:judge"),
        ("stages.label.scorer.checker", "cannot be called as judge(row, response)", "judge(response)"),
        env=on_pythonpath,
    ),
    Case(
        "checker-takes-three-arguments",
        checker_module("def judge(row, response, gold):\n    return True\n", "user_checks:judge", where="report"),
        ("stages.label.report.mine", "cannot be called as judge(row, response)", "gold"),
        env=on_pythonpath,
    ),
    Case(
        "checker-module-has-a-syntax-error",
        checker_module("def judge(row, response)\n    return True\n", "user_checks:judge"),
        ("stages.label.scorer.checker", "fails when imported: SyntaxError", "user_checks.py, line 1"),
        env=on_pythonpath,
    ),
    Case(
        "checker-module-fails-on-import",
        checker_module("import json\nTABLE = json.loads('not json')\n", "user_checks:judge"),
        ("stages.label.scorer.checker", "fails when imported: JSONDecodeError"),
        env=on_pythonpath,
    ),
    Case("grpo-reward-function-missing", stage(GRPO, "grpo"), ("stages.grpo.rewards.acc.checker", "no_such_rewards")),
    Case(
        "eval-checker-wrong-signature",
        stage({**EVAL, "checkers": {"acc": "json:dumps"}}, "eval"),
        ("stages.eval.checkers.acc", "cannot be called as dumps(row, response)"),
    ),
    Case(
        "lora-target-typo",
        validate({"lora": {"target_modules": ["q_prj", "v_proj"]}}),
        ("lora.target_modules[0]", "'q_prj' matches no module", "did you mean 'q_proj'"),
    ),
    Case(
        "lora-target-not-a-layer",
        validate({"lora": {"target_modules": ["layers"]}}),
        ("lora.target_modules[0]", "ModuleList, which LoRA cannot wrap"),
    ),
    Case(
        "lora-modules-to-save-typo",
        validate({"lora": {"modules_to_save": ["lm_haed"]}}),
        ("lora.modules_to_save[0]", "'lm_haed'", "lm_head"),
    ),
    Case(
        "data-path-is-a-directory",
        data_path_kind(lambda tmp: _mkdir(tmp / "rows.jsonl")),
        ("stages.sft.data.train.path", "rows.jsonl is a directory, not a file"),
    ),
    Case(
        "data-path-without-file-type",
        data_path_kind(lambda tmp: _mkdir(tmp / "rows")),
        ("stages.sft.data.train", "'rows' has no file type", ".jsonl"),
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
        "gzip-cut-short",
        sft_file(
            "cut.jsonl.gz", __import__("gzip").compress(jsonl({"instruction": "a", "output": "b"}).encode() * 50)[:-25]
        ),
        ("cut.jsonl.gz", "cannot decompress it as gzip", "damaged or cut short"),
    ),
    Case(
        "bad-row-inside-a-gzip-file",
        sft_file(
            "bad.jsonl.gz",
            __import__("gzip").compress(("\ufeff" + jsonl({"instruction": "a", "output": "b"}, '{"x": ')).encode()),
        ),
        ("bad.jsonl.gz line 2", "invalid JSON"),
    ),
    Case(
        "git-lfs-pointer",
        sft_file("lfs.jsonl", "version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 1234\n"),
        ("lfs.jsonl is a Git LFS pointer", "git lfs pull"),
    ),
    Case(
        "pandas-default-to-json",
        sft_file("cols.json", json.dumps({"instruction": {"0": "a"}, "output": {"0": "b"}})),
        ("cols.json", "object of columns", "orient='records'"),
    ),
    Case(
        "tsv-extra-field",
        sft_file("extra.tsv", "instruction\toutput\na\tb\nc\td\te\n"),
        ("extra.tsv line 3", "more fields", "tabs"),
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


def _output_dir_is_a_file(tmp: Path, command: str = "run", under: bool = False) -> list[str]:
    target = tmp / "taken"
    target.write_text("a file\n")
    out = target / "run" if under else target
    args = ["run", _run_recipe(tmp)] if command == "run" else ["stage", "sft", _run_recipe(tmp)]
    return [*args, "--output-dir", str(out)]


def _finished_run(tmp: Path) -> Path:
    """A run directory whose sft stage is done (a fake model directory is enough for export's checks)."""
    run_dir = tmp / "run"
    (run_dir / "sft" / "model").mkdir(parents=True)
    model = {"path": str(run_dir / "sft" / "model"), "kind": "full", "base": None}
    (run_dir / "manifest.json").write_text(
        json.dumps({"stages": {"sft": {"status": "done", "kind": "sft", "outputs": {"model": model}}}})
    )
    return run_dir


def _export_into_run_dir(tmp: Path) -> list[str]:
    run_dir = _finished_run(tmp)
    return ["export", str(run_dir), "sft", str(run_dir / "exported")]


def _export_onto_a_file(tmp: Path) -> list[str]:
    run_dir = _finished_run(tmp)
    (tmp / "model.bin").write_bytes(b"x")
    return ["export", str(run_dir), "sft", str(tmp / "model.bin")]


def _trained_with_another_tokenizer(consumer: str) -> Callable[[Path], list[str]]:
    """The run directory holds a stage ``old`` trained with another model (another vocabulary); ``consumer`` would
    use it beside the SFT policy this run trains: a best-of-n scoring the policy's samples with ``old`` as reward
    model, or a DPO with ``old`` as reference. Refused before anything runs."""

    def build(tmp: Path) -> list[str]:
        run_dir = tmp / "run"
        model_dir = run_dir / "old" / "model"
        model_dir.mkdir(parents=True)
        (model_dir / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}))
        kind = "reward" if consumer == "label" else "sft"
        model = {"path": str(model_dir), "kind": "full"}
        done = {"status": "done", "kind": kind, "config_hash": "old", "outputs": {"model": model}}
        (run_dir / "manifest.json").write_text(json.dumps({"stages": {"old": done}}))
        pairs = write(tmp, "pairs.jsonl", jsonl(GOOD_PAIR, {**GOOD_PAIR, "prompt": "Say yes."}))
        if consumer == "label":
            stages = {
                "old": {"kind": "reward", "base_from": "sft", "data": {"train": {"path": pairs}}},
                "label": {**BON, "scorer": {"reward_from": "old"}},
            }
        else:
            stages = {
                "old": {"kind": "sft", "data": {"train": {"path": str(SFT)}}},
                "dpo": {**DPO, "reference_from": "old", "data": {"train": {"path": pairs}}},
            }
        return ["run", recipe(tmp, {"stages": stages}), "--stages", f"sft,{consumer}", "--output-dir", str(run_dir)]

    return build


PATH_CASES = [  # paths of the wrong type
    Case("run-output-dir-is-a-file", _output_dir_is_a_file, ("--output-dir", "taken is a file, not a directory")),
    Case(
        "stage-output-dir-is-a-file",
        lambda tmp: _output_dir_is_a_file(tmp, "stage"),
        ("--output-dir", "is a file, not a directory"),
    ),
    Case(
        "run-output-dir-under-a-file",
        lambda tmp: _output_dir_is_a_file(tmp, under=True),
        ("taken is a file, so no directory can be created under it",),
    ),
    Case("export-into-the-run-directory", _export_into_run_dir, ("OUT_DIR", "is inside the run directory", "run-sft")),
    Case("export-onto-a-file", _export_onto_a_file, ("OUT_DIR", "model.bin is a file")),
    Case(
        "run-reward-model-with-another-tokenizer",
        _trained_with_another_tokenizer("label"),
        (
            "stages.label.scorer.reward_from",
            "different tokenizer (2 tokens)",
            "builtin:tiny-llama",
            "--stages old,label",
        ),
    ),
    Case(
        "run-dpo-reference-with-another-tokenizer",
        _trained_with_another_tokenizer("dpo"),
        ("stages.dpo.reference_from", "different tokenizer (2 tokens)", "stages.dpo.policy_from", "--stages old,dpo"),
    ),
]

CASES = RECIPE_CASES + PREFLIGHT_CASES + SET_CASES + DATA_CASES + CLI_CASES + PATH_CASES


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_a_message_naming_it(case: Case, tmp_path):
    args = case.build(tmp_path)
    env = case.env(tmp_path) if callable(case.env) else case.env
    out = run_cli(*args, env={TOKEN_ENV: "", **env}, timeout=120)
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
    assert len(CASES) + 2 >= 100


def test_a_missing_model_directory_is_named_as_such_not_as_a_hub_id(tmp_path):
    from pipeline.modeling.loading import cannot_load

    gone = str(tmp_path / "old-place" / "sft" / "model")
    message = cannot_load("tokenizer", gone, OSError("Repo id must be in the form 'repo_name'"))
    assert message == f"cannot load the tokenizer of {gone!r}: no such directory (was it moved or deleted?)"
    assert "Hugging Face Hub" in cannot_load("model", "org/some-model", OSError("404"))


# --------------------------------------------------------------------------------------------
# The other side: valid files as other tools write them are read (validate), and run
# --------------------------------------------------------------------------------------------


def test_files_as_other_tools_write_them_pass_validate(tmp_path):
    """One SFT mixture with a source per way of writing the file (compressed, BOMs, CRLF, JSON Lines named .json,
    pandas / datasets / Excel output): `validate` reads every one of them, row by row, in one call."""
    from test_data import WRITERS

    sources = []
    for i, write_file in enumerate(WRITERS.values()):
        folder = tmp_path / f"w{i}"
        folder.mkdir()
        sources.append({"path": str(write_file(folder))})
    path = recipe(tmp_path, {"stages": {"sft": {"data": {"train": sources, "eval": None, "eval_fraction": 0.0}}}})
    out = run_cli("validate", path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "is valid (1 stage(s): sft)" in out.stderr


def _hh_row(row: dict) -> dict:
    """An Anthropic HH-RLHF row (whole transcripts sharing the prompt) made of a tiny-task row."""
    prompt = f"\n\nHuman: {row['instruction']} {row['input']}".rstrip()
    return {"chosen": f"{prompt}\n\nAssistant: {row['output']}", "rejected": f"{prompt}\n\nAssistant: I do not know."}


@pytest.mark.slow
def test_files_as_other_tools_write_them_run(tmp_path):
    """SFT on a JSONL file with a byte-order mark, CRLF line ends and blank lines (Windows editors), then a reward
    model on HH-RLHF's own form (.jsonl.gz of chosen / rejected transcripts): the run reads both and finishes."""
    import gzip

    rows = [json.loads(line) for line in SFT.read_text().splitlines()[:64]]
    sft = tmp_path / "windows.jsonl"
    sft.write_bytes(("\ufeff" + "\r\n\r\n".join(json.dumps(r) for r in rows) + "\r\n").encode())
    hh = tmp_path / "hh-helpful-base-train.jsonl.gz"
    hh.write_bytes(gzip.compress("".join(json.dumps(_hh_row(r)) + "\n" for r in rows).encode()))
    short = {"max_steps": 2, "batch_size": 4, "precision": "fp32", "save_steps": 2}
    stages = {
        "sft": {
            "data": {"train": {"path": str(sft), "limit": None}, "eval": None, "eval_fraction": 0.0},
            "train": short,
        },
        "reward": {"kind": "reward", "base_from": "sft", "data": {"train": {"path": str(hh)}}, "train": short},
    }
    run_dir = tmp_path / "run"
    out = run_cli("run", recipe(tmp_path, {"stages": stages}), "--output-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    stages_done = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert stages_done["sft"]["status"] == stages_done["reward"]["status"] == "done"
    assert stages_done["sft"]["metrics"]["train_rows"] == 64
    summary = json.loads((run_dir / "reward" / "data_summary.json").read_text())
    read = summary["train_source"]
    assert read["format"] == "implicit" and read["rows"] == read["pairs"] == 64 and read["split_failures"] == 0
