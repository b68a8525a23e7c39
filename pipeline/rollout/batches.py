"""Padding token-id lists into one batch: the one padding rule the sampler and the scorers share."""

from __future__ import annotations

import torch


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right"):
    """(ids, attention mask, position ids) of a padded batch, on the CPU.

    Positions count real tokens only, so a left-padded sequence gets the positions it has alone (the model
    would otherwise number the padding). Left padding ends every sequence at the same column (the sampler
    reads the next token there); a classifier reads the last non-pad token, wherever the padding is."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions
