"""Sampling n responses per prompt, fast.

Why not ``model.generate(num_return_sequences=n)``: it copies every prompt n times before the
prefill (n times the prompt compute) and keeps finished sequences in the batch until the last one
ends. Here the prompts of a batch are prefilled once, the KV cache is shared by repeating it n times,
and sequences that hit EOS leave the batch. Prompts are sorted by length so padding is minimal.
Greedy decoding (temperature 0) gives exactly ``generate(do_sample=False)`` (tested).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline.rollout.batches import pad_batch
from pipeline.util.errors import DataError


@dataclass
class Sample:
    prompt_index: int  # position in the list of prompts sampled
    sample_idx: int
    token_ids: list[int]
    finish_reason: str  # "eos" | "length"


def encode_prompts(tokenizer, prompts: Sequence) -> list[list[int]]:
    """Token ids exactly as SFT saw the prompts: chat messages through the chat template, text as is."""
    from pipeline.modeling.chat import chat_ids

    out = []
    for prompt in prompts:
        if isinstance(prompt, list):
            try:
                ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
            except Exception as exc:
                from pipeline.data.chat_fit import FIX_STRICT, is_template_error

                if not is_template_error(exc):
                    raise
                raise DataError(
                    f"prompt {len(out) + 1} {str(prompt)[:120]}: the model's chat template refuses it ({exc}); {FIX_STRICT}"
                ) from None
        else:
            ids = tokenizer(prompt)["input_ids"]  # what TRL's SFT tokenization does for text prompts
        out.append(list(ids))
    return out


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token once the mass before it already reaches top_p (the top token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_batch(
    model,
    prompt_ids: list[list[int]],
    n: int,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[tuple[list[int], str]]]:
    """n continuations for each prompt of one batch: result[prompt][sample] = (token ids, finish reason)."""
    from transformers import DynamicCache

    device = model.device
    batch = len(prompt_ids)
    input_ids, attention, positions = pad_batch(prompt_ids, pad_id, side="left")  # every prompt ends at one column
    input_ids, attention, positions = input_ids.to(device), attention.to(device), positions.to(device)

    cache = DynamicCache()
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    logits = out.logits[:, -1].repeat_interleave(n, 0)
    cache.batch_repeat_interleave(n)  # one prefill, shared by the n samples
    attention = attention.repeat_interleave(n, 0)
    position = positions[:, -1].repeat_interleave(n, 0)
    alive = torch.arange(batch * n, device=device)  # row -> sequence it belongs to
    tokens: list[list[int]] = [[] for _ in range(batch * n)]
    finish = ["length"] * (batch * n)
    eos = torch.tensor(eos_ids, device=device)

    for step in range(max_new_tokens):
        nxt = _next_tokens(logits, temperature, top_p, generator)
        ended = torch.isin(nxt, eos)
        for seq, tok, end in zip(alive.tolist(), nxt.tolist(), ended.tolist()):
            tokens[seq].append(tok)
            if end:
                finish[seq] = "eos"
        if step == max_new_tokens - 1:
            break
        keep = (~ended).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        if keep.numel() < alive.numel():  # finished sequences leave the batch
            cache.batch_select_indices(keep)
            attention, position, nxt, alive = attention[keep], position[keep], nxt[keep], alive[keep]
        attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=1)
        position = position + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=attention,
            position_ids=position[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        cache, logits = out.past_key_values, out.logits[:, -1]
    return [[(tokens[p * n + s], finish[p * n + s]) for s in range(n)] for p in range(batch)]


def prompt_inputs(model, tokenizer, prompts: Sequence) -> tuple[list[list[int]], list[int]]:
    """(token ids of each text or chat prompt, encoded as SFT saw it; every id that ends a response for this
    model, ``modeling.chat.stop_ids``): what any sampler needs besides the settings."""
    from pipeline.modeling.chat import stop_ids

    chat = any(isinstance(p, list) for p in prompts)
    return encode_prompts(tokenizer, prompts), stop_ids(model, tokenizer, chat)


def sample_ids(
    model,
    encoded: list[list[int]],
    n: int,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[Sample]:
    """n samples for every prompt given as token ids (the ``hf`` engine, see ``pipeline.rollout.engine``)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    generator = torch.Generator(device=model.device).manual_seed(seed)
    samples: list[Sample] = []
    started, generated = time.perf_counter(), 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        result = sample_batch(
            model, [encoded[i] for i in chunk], n, max_new_tokens, eos_ids, pad_id, temperature, top_p, generator
        )
        for prompt_index, continuations in zip(chunk, result):
            for sample_idx, (ids, reason) in enumerate(continuations):
                samples.append(Sample(prompt_index, sample_idx, ids, reason))
                generated += len(ids)
        if progress:
            progress(min(start + batch_size, len(order)), generated, time.perf_counter() - started)
    model.train(was_training)
    samples.sort(key=lambda s: (s.prompt_index, s.sample_idx))
    return samples


def decode(tokenizer, sample: Sample) -> str:
    return tokenizer.decode(sample.token_ids, skip_special_tokens=True).strip()


@torch.no_grad()
def completion_logprobs(
    model, prompt_ids: list[list[int]], completion_ids: list[list[int]], batch_size: int = 64
) -> list[float]:
    """Sum of log p(completion token | prefix) for each (prompt, completion), e.g. for KL estimates."""
    sequences = [p + c for p, c in zip(prompt_ids, completion_ids)]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [0.0] * len(sequences)
    device = model.device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        # right padding: real tokens keep positions 0..n-1 without position ids; the pad id (0) is masked
        ids, mask, _ = pad_batch([sequences[i] for i in chunk], 0)
        logprobs = torch.log_softmax(
            model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), dim=-1
        )
        for row, i in enumerate(chunk):
            start_pos, end_pos = len(prompt_ids[i]), len(sequences[i])
            if end_pos == start_pos:
                continue
            targets = ids[row, start_pos:end_pos].to(device)
            out[i] = float(logprobs[row, start_pos - 1 : end_pos - 1].gather(-1, targets[:, None]).sum())
    return out
