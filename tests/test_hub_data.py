"""Hub data details real recipes need: data_dir / data_files, any split name, UltraFeedback's message-list
pairs, ShareGPT conversations. The Hub is unreachable here: ``datasets.load_dataset`` is replaced by a
stand-in that records its arguments and serves local rows of the real datasets' schemas."""

from __future__ import annotations

import pytest

from pipeline.config import DataSource, recipe_from_dict
from pipeline.data.preference.formats import load_preference_pairs
from pipeline.data.sft import load_sft_examples
from pipeline.data.sources import read_source
from pipeline.util.errors import RecipeError

HH_ROW = {
    "chosen": "\n\nHuman: What is 2+3?\n\nAssistant: 5.",
    "rejected": "\n\nHuman: What is 2+3?\n\nAssistant: 6, I think.",
}
ULTRAFEEDBACK_ROW = {  # HuggingFaceH4/ultrafeedback_binarized, split train_prefs: the prompt is inside chosen/rejected
    "prompt": "What is 2+3?",
    "prompt_id": "abc",
    "chosen": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5."}],
    "rejected": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "6."}],
    "messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5."}],
    "score_chosen": 9.0,
    "score_rejected": 3.0,
}
SHAREGPT_ROW = {
    "id": "x1",
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "What is 2+3?"},
        {"from": "gpt", "value": "5."},
    ],
}


class FakeDataset:
    def __init__(self, rows):
        self.rows = rows

    def to_list(self):
        return list(self.rows)


@pytest.fixture
def hub(monkeypatch):
    """Replace datasets.load_dataset; returns the list of (args, kwargs) it was called with."""
    import datasets

    calls, serve = [], {}

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return FakeDataset(serve[args[0]])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, serve


def test_data_dir_and_split_names_reach_load_dataset(hub):
    calls, serve = hub
    serve["Anthropic/hh-rlhf"] = [HH_ROW]
    source = DataSource(hub="Anthropic/hh-rlhf", data_dir="harmless-base", split="test")
    pairs, stats = load_preference_pairs(read_source(source))
    assert calls == [(("Anthropic/hh-rlhf", None), {"split": "test", "data_dir": "harmless-base"})]
    assert (
        stats["format"] == "implicit"
        and pairs[0].chosen == "5."
        and stats["source"] == "hub:Anthropic/hh-rlhf/harmless-base[test]"
    )


def test_data_files_and_a_split_slice_reach_load_dataset(hub):
    calls, serve = hub
    serve["tatsu-lab/alpaca"] = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}]
    source = DataSource(hub="tatsu-lab/alpaca", data_files={"train": "data/train-*.parquet"}, split="train[:100]")
    examples, fmt = load_sft_examples(source, "alpaca")
    assert calls[0][1] == {"split": "train[:100]", "data_files": {"train": "data/train-*.parquet"}}
    assert fmt == "alpaca" and examples[0].completion == "5"


def test_ultrafeedback_prefs_split_with_the_prompt_inside_the_message_lists(hub):
    calls, serve = hub
    serve["HuggingFaceH4/ultrafeedback_binarized"] = [ULTRAFEEDBACK_ROW]
    source = DataSource(hub="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs")
    pairs, stats = load_preference_pairs(read_source(source))
    assert calls[0][1] == {"split": "train_prefs"}
    assert stats["format"] == "conversational"
    assert pairs[0].prompt == [{"role": "user", "content": "What is 2+3?"}]
    assert pairs[0].chosen == [{"role": "assistant", "content": "5."}] and pairs[0].rejected == [
        {"role": "assistant", "content": "6."}
    ]
    assert pairs[0].meta["score_chosen"] == 9.0


@pytest.mark.parametrize(
    "source",
    [
        {"format": "sharegpt"},  # named format
        {},  # detected from the 'conversations' column
        {"format": "messages", "columns": {"messages": "conversations"}},  # mapped; from/value turns read as roles
    ],
)
def test_sharegpt_conversations_need_no_code(tmp_path, source):
    import json

    path = tmp_path / "sharegpt.jsonl"
    path.write_text(json.dumps(SHAREGPT_ROW) + "\n")
    examples, fmt = load_sft_examples(DataSource(path=str(path), **source), "chat")
    assert fmt in ("sharegpt", "messages")
    assert examples[0].prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
    ]
    assert examples[0].completion == [{"role": "assistant", "content": "5."}]


def test_data_dir_without_a_hub_dataset_is_refused():
    raw = {
        "name": "x",
        "stages": {"sft": {"kind": "sft", "data": {"train": {"path": "a.jsonl", "data_dir": "helpful-base"}}}},
    }
    with pytest.raises(RecipeError, match="data_dir.*need 'hub'"):
        recipe_from_dict(raw)
