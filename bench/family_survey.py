"""Trap survey: run every stage of a tiny recipe on each offline model-family replica, through the CLI.

    python bench/family_survey.py [--families llama3,gemma2] [--templates alpaca,chat] [--out /tmp/family-survey]

For each family x template it writes a small recipe (sft -> label -> reward -> bon -> dpo -> eval, a few
steps each), runs ``python -m pipeline run`` then ``python -m pipeline export`` for sft and dpo, and
prints one line per run plus what it finds in the artifacts: special tokens leaking into responses,
sampling that never stops, exported models whose logits differ from the stage's. Stage failures are
recorded, not fixed. Needs a few minutes per family on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "tiny"
sys.path.insert(0, str(REPO))  # this checkout's pipeline, also when run as a script from elsewhere
TRAIN = {
    "max_steps": 4,
    "batch_size": 8,
    "logging_steps": 2,
    "save_steps": 4,
    "precision": "fp32",
    "learning_rate": 1e-3,
}


def write_data(out: Path) -> dict[str, Path]:
    """Chat-format SFT rows and explicit / conversational preference pairs, from the tiny tasks."""
    rows = [json.loads(line) for line in (TINY / "sft_train.jsonl").read_text().splitlines()[:64]]
    paths = {name: out / f"{name}.jsonl" for name in ("sft_messages", "pairs_text", "pairs_chat")}
    with (
        paths["sft_messages"].open("w") as sft,
        paths["pairs_text"].open("w") as text,
        paths["pairs_chat"].open("w") as chat,
    ):
        for row in rows:
            user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            good, bad = f"The answer is {row['answer']}.", f"The answer is {row['answer']}. Anyway, whatever."
            sft.write(
                json.dumps(
                    {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}
                )
                + "\n"
            )
            text.write(json.dumps({"prompt": row["instruction"], "chosen": good, "rejected": bad}) + "\n")
            chat.write(
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": user}],
                        "chosen": [{"role": "assistant", "content": good}],
                        "rejected": [{"role": "assistant", "content": bad}],
                    }
                )
                + "\n"
            )
    return paths


def recipe(template: str, data: dict[str, Path]) -> dict:
    sft_train = (
        {"path": str(data["sft_messages"])}
        if template == "chat"
        else {"path": str(TINY / "sft_train.jsonl"), "limit": 64}
    )
    pairs = {
        "train": {"path": str(data["pairs_chat" if template == "chat" else "pairs_text"])},
        "eval_fraction": 0.25,
        "max_length": 128,
        "template": "none" if template == "chat" else "alpaca",
    }
    prompts = {"path": str(TINY / "prompts_eval.jsonl"), "limit": 16}
    report = {"preferred": "pipeline.builtin.tasks:preferred"}
    return {
        "name": f"survey-{template}",
        "seed": 0,
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
        "tracking": {"report_to": "none"},
        "stages": {
            "sft": {
                "kind": "sft",
                "data": {"train": sft_train, "eval_fraction": 0.1, "template": template, "max_length": 128},
                "train": TRAIN,
            },
            "label": {
                "kind": "bon",
                "policy_from": "sft",
                "prompts": prompts,
                "n": 4,
                "max_new_tokens": 16,
                "scorer": {"checker": "pipeline.builtin.tasks:preferred"},
                "report": report,
            },
            "reward": {"kind": "reward", "base_from": "sft", "data": pairs, "train": TRAIN},
            "bon": {
                "kind": "bon",
                "policy_from": "sft",
                "prompts": prompts,
                "n": 4,
                "max_new_tokens": 16,
                "scorer": {"reward_from": "reward"},
                "report": report,
            },
            "dpo": {"kind": "dpo", "policy_from": "sft", "data": pairs, "beta": 0.3, "train": TRAIN},
            "eval": {
                "kind": "eval",
                "prompts": prompts,
                "policies": ["sft", "dpo"],
                "reference": "sft",
                "bon_from": "bon",
                "reward_from": "reward",
                "max_new_tokens": 16,
                "kl_samples": 1,
                "checkers": report,
            },
        },
    }


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def failure(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line or "failed" in line.lower()]
    return (errors or lines or ["(no output)"])[-1][:300]


def leaks(run_dir: Path, tokens: list[str]) -> dict[str, int]:
    """Responses (eval, bon candidates) that contain a special token's text."""
    found: dict[str, int] = {}
    for path in [
        run_dir / "eval" / "responses.jsonl",
        run_dir / "bon" / "candidates.jsonl",
        run_dir / "label" / "candidates.jsonl",
    ]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            text = json.dumps(json.loads(line))
            for token in tokens:
                if token in text:
                    found[f"{path.parent.name}:{token}"] = found.get(f"{path.parent.name}:{token}", 0) + 1
    return found


def export_matches(run_dir: Path, stage: str, out: Path) -> str:
    """Export ``stage`` and compare the exported model's logits with the stage's saved model."""
    proc = cli("export", str(run_dir), stage, str(out))
    if proc.returncode != 0:
        return f"export {stage} failed: {failure(proc)}"
    code = (
        "import json,sys,torch;from transformers import AutoModelForCausalLM as A, AutoTokenizer as T\n"
        "run,stage,out=sys.argv[1:];m=json.load(open(run+'/manifest.json'))['stages'][stage]['outputs']['model']\n"
        "a=A.from_pretrained(m['path']) if m['kind']=='full' else None\n"
        "b=A.from_pretrained(out);t=T.from_pretrained(out);ids=torch.tensor([t('The answer is 5.')['input_ids']])\n"
        "print('untied' if not b.config.tie_word_embeddings else 'tied', 'same' if a is None or torch.allclose(a(ids).logits,b(ids).logits,atol=1e-5) else 'DIFFERENT')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(run_dir), stage, str(out)], capture_output=True, text=True, cwd=REPO
    )
    return proc.stdout.strip() or failure(proc)


def survey(family: str, template: str, out: Path, data: dict[str, Path]) -> dict:
    run_dir = out / f"{family}-{template}"
    path = out / f"recipe-{template}.yaml"
    path.write_text(yaml.safe_dump(recipe(template, data), sort_keys=False))
    proc = cli("run", str(path), "--output-dir", str(run_dir), "--set", f"model.name_or_path=builtin:replica-{family}")
    manifest = run_dir / "manifest.json"
    stages = json.loads(manifest.read_text())["stages"] if manifest.is_file() else {}
    result = {
        "family": family,
        "template": template,
        "rc": proc.returncode,
        "stages": {name: entry.get("status") for name, entry in stages.items()},
    }
    if proc.returncode != 0:
        result["failure"] = failure(proc)
    from pipeline.builtin import replicas

    result["leaks"] = leaks(
        run_dir, list({*replicas.FAMILIES[family].specials_back, *replicas.FAMILIES[family].specials_front} - {"<unk>"})
    )
    for stage in ("sft", "dpo"):
        if stages.get(stage, {}).get("status") in ("done", "cached"):
            result[f"export_{stage}"] = export_matches(run_dir, stage, out / f"{family}-{template}-export-{stage}")
    return result


def main() -> None:
    from pipeline.builtin import replicas

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(replicas.FAMILIES))
    parser.add_argument("--templates", default="alpaca,chat")
    parser.add_argument("--out", default="/tmp/family-survey")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = write_data(out)
    for family in args.families.split(","):
        for template in args.templates.split(","):
            print(json.dumps(survey(family, template, out, data)), flush=True)


if __name__ == "__main__":
    main()
