"""Batches without wasted compute: length-grouped batches (SFT rows, preference pairs) and packed SFT rows.

Correctness first: grouping only reorders the epoch (every row once, the same summed loss), a packed batch
gives the same loss as the same rows padded, and no attention crosses the boundary between packed rows.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pipeline import compat
from pipeline.config import load_recipe
from pipeline.run import runner
from pipeline.stages import dpo, reward, sft
from pipeline.util.errors import RecipeError


def _sft_trainer(make_recipe, tmp_path, batching: str, **train):
    recipe = load_recipe(
        make_recipe({"stages": {"sft": {"train": {"batching": batching, **train}}}}, name=f"{batching}.yaml")
    )
    ctx = runner.make_context(recipe, "sft", tmp_path / batching)
    ctx.config_hash = "test"
    trainer, _ = sft.build_trainer(ctx)
    return trainer


def _epoch(trainer) -> list[dict]:
    return list(trainer.get_train_dataloader())


def _rows(batches: list[dict]) -> Counter:
    """Each real row of a padded batch as a tuple of its token ids."""
    rows = Counter()
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            rows[tuple(ids[mask.bool()].tolist())] += 1
    return rows


def _nonpad_share(batches: list[dict]) -> float:
    return sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["input_ids"].numel() for b in batches)


def test_grouped_epoch_visits_every_row_once_with_less_padding(make_recipe, tmp_path):
    padded = _sft_trainer(make_recipe, tmp_path, "padded")
    grouped = _sft_trainer(make_recipe, tmp_path, "grouped")
    assert type(grouped).__name__ == "GroupedSFTTrainer" and grouped.args.train_sampling_strategy == "group_by_length"
    dataset_rows = Counter(tuple(r["input_ids"]) for r in grouped.train_dataset)
    padded_epoch, grouped_epoch = _epoch(padded), _epoch(grouped)
    assert _rows(grouped_epoch) == dataset_rows == _rows(padded_epoch)
    assert _nonpad_share(grouped_epoch) > _nonpad_share(padded_epoch)
    assert _nonpad_share(grouped_epoch) >= 0.95


def _summed_loss(trainer, batches: list[dict]) -> tuple[float, int]:
    """Token-weighted loss over batches: sum of per-token losses and the number of loss tokens."""
    model = trainer.model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            n = int((batch["labels"][:, 1:] != -100).sum()) if "labels" in batch else 0
            loss = trainer.compute_loss(model, dict(batch))
            total, tokens = total + float(loss) * n, tokens + n
    return total, tokens


def test_grouped_epoch_has_the_same_summed_loss_as_a_padded_one(make_recipe, tmp_path):
    padded = _sft_trainer(make_recipe, tmp_path, "padded")
    grouped = _sft_trainer(make_recipe, tmp_path, "grouped")
    grouped.model.load_state_dict(padded.model.state_dict())
    loss_p, n_p = _summed_loss(padded, _epoch(padded))
    loss_g, n_g = _summed_loss(grouped, _epoch(grouped))
    assert n_p == n_g > 0
    assert loss_g == pytest.approx(loss_p, rel=1e-5)


def test_packed_batch_gives_the_padded_loss_and_no_attention_crosses_rows(make_recipe, tmp_path):
    padded = _sft_trainer(make_recipe, tmp_path, "padded")
    packed = _sft_trainer(make_recipe, tmp_path, "packed")
    packed.model.load_state_dict(padded.model.state_dict())
    rows = [padded.train_dataset[i] for i in range(6)]
    features = [{k: r[k] for k in ("input_ids", "labels")} for r in rows]
    pad_batch = padded.data_collator(features)
    pack_batch = packed.data_collator(features)
    assert pack_batch["input_ids"].shape[0] == 1 and "position_ids" in pack_batch  # one row, no padding
    model = padded.model.eval()
    with torch.no_grad():
        loss_padded = padded.compute_loss(model, dict(pad_batch))
        loss_packed = packed.compute_loss(model, dict(pack_batch))
        # each packed row's logits equal the row's logits alone: nothing attends across the boundary
        logits = model(
            input_ids=pack_batch["input_ids"], position_ids=pack_batch["position_ids"], use_cache=False
        ).logits[0]
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0]
            assert torch.allclose(logits[start : start + len(row["input_ids"])], alone, atol=1e-4)
            start += len(row["input_ids"])
    assert float(loss_packed) == pytest.approx(float(loss_padded), rel=1e-5)


def test_packing_is_for_sft_only(make_recipe, tmp_path):
    from pipeline.train.batching import resolve as batching_mode

    assert batching_mode("auto", packable=True, cuda=False) == "padded"  # grouping skews SFT batches (see resolve)
    assert batching_mode("auto", packable=False, cuda=False) == "grouped"
    assert batching_mode("auto", packable=True, cuda=True) == "packed"
    assert batching_mode("auto", packable=False, cuda=True) == "grouped"
    assert batching_mode("padded", packable=True, cuda=True) == "padded"
    with pytest.raises(RecipeError, match="packed is for SFT stages"):
        batching_mode("packed", packable=False, cuda=True)


def _pairs_file(tmp_path) -> str:
    """Pairs of varied lengths: chosen answers, rejected ones with trailing chatter of 0-3 sentences."""
    import json

    from conftest import TINY

    rows = [json.loads(line) for line in (TINY / "sft_train.jsonl").read_text().splitlines()[:48]]
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as fh:
        for i, row in enumerate(rows):
            chatter = " Anyway, whatever." * (i % 4)
            fh.write(
                json.dumps(
                    {
                        "prompt": row["instruction"],
                        "chosen": row["output"],
                        "rejected": row["output"] + chatter + " Ugh.",
                    }
                )
                + "\n"
            )
    return str(path)


@pytest.mark.slow  # trains the shared 300-step policy
@pytest.mark.parametrize("kind", ["reward", "dpo"])
def test_pairs_are_grouped_by_their_longer_side(policy_copy, tmp_path, kind):
    """Reward and DPO batches pad chosen and rejected together: grouping measures the pair's longer side,
    and an epoch still visits every pair once."""
    import yaml

    recipe_path, run_dir = policy_copy
    raw = yaml.safe_load(recipe_path.read_text())
    link = {"policy_from": "sft"} if kind == "dpo" else {"base_from": "sft"}
    raw["stages"]["pairs"] = {
        "kind": kind,
        **link,
        "data": {"train": {"path": _pairs_file(tmp_path)}, "template": "alpaca", "eval_fraction": 0.2},
        "train": {"batch_size": 4, "max_steps": 2, "batching": "grouped"},
    }
    path = tmp_path / "pairs.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    ctx = runner.make_context(load_recipe(path), "pairs", run_dir)
    ctx.config_hash = "test"
    trainer = (reward if kind == "reward" else dpo).build_trainer(ctx)[0]
    sampler = trainer._get_train_sampler()
    lengths = [compat.sequence_length(row) for row in trainer.train_dataset]
    order = list(iter(sampler))
    assert sorted(order) == list(range(len(trainer.train_dataset)))  # every pair once
    batches = [order[i : i + 4] for i in range(0, len(order), 4)]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    shuffled = torch.randperm(len(order), generator=torch.Generator().manual_seed(0)).tolist()
    random_spread = sum(
        max(lengths[i] for i in shuffled[j : j + 4]) - min(lengths[i] for i in shuffled[j : j + 4])
        for j in range(0, len(shuffled), 4)
    ) / len(batches)
    assert spread < random_spread
    assert len(trainer.get_eval_dataloader()) > 0  # evaluation batches pairs too (in dataset order)


def test_sequence_length_of_sft_rows_and_pairs():
    assert compat.sequence_length({"input_ids": [1, 2, 3]}) == 3
    assert compat.sequence_length({"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]}) == 5
    assert compat.sequence_length({"chosen_ids": [3, 4], "rejected_ids": [6, 7, 8, 9]}) == 4  # reward rows


def test_grouped_batches_are_homogeneous_and_in_random_order():
    from pipeline.train.batching import LengthGroupedBatches

    torch.manual_seed(0)
    lengths = [int(x) for x in torch.randint(10, 200, (1000,))]
    sampler = LengthGroupedBatches(lengths, batch_size=8, seed=0, bucket_batches=25)
    order = list(sampler)
    assert sorted(order) == list(range(1000))  # every row once
    batches = [order[i : i + 8] for i in range(0, 1000, 8)]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 15  # random batches of 8 spread ~150 tokens
    # batches do not run from longest to shortest within a bucket: their order is shuffled
    maxima = [max(lengths[i] for i in b) for b in batches[:25]]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
    sampler.set_epoch(1)
    assert list(sampler) != order  # a new order each epoch


def test_grouped_order_depends_on_seed_and_epoch_only_so_a_resumed_run_skips_into_the_same_order():
    from pipeline.train.batching import LengthGroupedBatches

    lengths = list(range(5, 505))
    first = LengthGroupedBatches(lengths, batch_size=8, seed=3)
    first.set_epoch(2)
    expected = list(first)
    torch.manual_seed(123)  # the global RNG state at resume differs from the uninterrupted run's
    torch.rand(7)
    resumed = LengthGroupedBatches(lengths, batch_size=8, seed=3)
    resumed.set_epoch(2)
    assert list(resumed) == expected
    assert list(LengthGroupedBatches(lengths, batch_size=8, seed=4)) != expected
