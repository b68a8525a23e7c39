"""Best-of-n generation throughput: the stage's sampler vs a plain per-prompt generate() loop.

The stage's sampler is reached as the stages reach it: the ``hf`` sampling engine (``pipeline.rollout.engine``).

Same model, prompts, n and lengths, one process, one after the other. Prints generated tokens/s for
both and, as the last line, ``speedup_vs_loop: <float>``.

    python bench/bon_throughput.py                          # built-in tiny model (untrained)
    python bench/bon_throughput.py --model runs/demo/sft/model   # a trained policy (stops at EOS)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.builtin.prompt_templates import alpaca_prompt  # noqa: E402
from pipeline.modeling.chat import stop_ids  # noqa: E402
from pipeline.rollout import engine  # noqa: E402


def generated_tokens(seqs: torch.Tensor, prompt_len: int, eos_ids: list[int], pad_id: int) -> int:
    """Tokens up to and including the first EOS (what the stage counts too)."""
    total = 0
    for row in seqs[:, prompt_len:].tolist():
        for j, tok in enumerate(row):
            if tok in eos_ids:
                total += j + 1
                break
        else:
            total += len(row)
    return total


def per_prompt_loop(model, tok, prompts, n, max_new_tokens, eos_ids) -> int:
    tokens = 0
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                pad_token_id=tok.pad_token_id,
                eos_token_id=eos_ids,
            )
        tokens += generated_tokens(out, enc["input_ids"].shape[1], eos_ids, tok.pad_token_id)
    return tokens


def stage_sampler(model, tok, prompts, n, max_new_tokens, batch_size) -> int:
    samples = engine.sample_prompts(
        engine.hf_engine(model, tok, batch_size), model, tok, prompts, n=n, max_new_tokens=max_new_tokens, seed=0
    )
    return sum(len(s.token_ids) for s in samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (default: the built-in tiny model)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per batch in the stage's sampler")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings each")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.builtin.tiny_model import tiny_model_path

    path = args.model or str(tiny_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    rows = [json.loads(line) for line in (REPO / "data/tiny/prompts_bon.jsonl").read_text().splitlines()]
    seen, prompts = set(), []
    for r in rows:  # distinct prompts
        p = alpaca_prompt(r["instruction"], r["input"])
        if p not in seen:
            seen.add(p)
            prompts.append(p)
    prompts = prompts[: args.prompts]
    eos_ids = stop_ids(model, tok, chat=False)
    print(
        f"model {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), {len(prompts)} prompts x "
        f"{args.n} samples x {args.max_new_tokens} new tokens, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}"
    )

    def best_of(fn):
        rates = []
        for i in range(args.repeats):
            torch.manual_seed(i)
            start = time.perf_counter()
            tokens = fn()
            rates.append(tokens / (time.perf_counter() - start))
        return max(rates), tokens

    per_prompt_loop(model, tok, prompts[:2], args.n, args.max_new_tokens, eos_ids)  # warm-up
    loop_rate, loop_tokens = best_of(lambda: per_prompt_loop(model, tok, prompts, args.n, args.max_new_tokens, eos_ids))
    stage_rate, stage_tokens = best_of(
        lambda: stage_sampler(model, tok, prompts, args.n, args.max_new_tokens, args.batch_size)
    )
    print(f"per-prompt generate() loop: {loop_rate:,.0f} generated tokens/s ({loop_tokens} tokens)")
    print(
        f"stage sampler, hf engine (batch {args.batch_size} prompts, shared prefill, finished rows dropped): {stage_rate:,.0f} generated tokens/s ({stage_tokens} tokens)"
    )
    print(f"speedup_vs_loop: {stage_rate / loop_rate:.2f}")


if __name__ == "__main__":
    main()
