"""How much a prompt's result moves with the batch around it, per dtype.

    python -m benchmarks.batch_invariance [--model gpt2] [--device cpu] [--batches 1 2 4 8 16 17 20 32]

Row 0 holds the same prompt in every batch; the other rows hold different prompts of the same
length (distinct, so no prefill is shared). For each dtype and batch size: the largest change of
row 0's logits against batch 1, in the prefill and in the decode steps (row 0 fed the same tokens
in every batch), also as a fraction of the logits' range; and how many of row 0's --new-tokens
greedy tokens equal its tokens generated alone before the first difference. Random
weights (no checkpoint needed); a reduction whose order depends on the row count (a GEMM kernel
chosen by M, fp16 GEMVs upcast to an fp32 GEMM beyond 16 rows on CPU) shows here.
"""

from __future__ import annotations

import argparse

import torch

import engine
from engine.model.cache import KVCache

from .report import write_results

NOTES = ("Row 0's logits (prefill and decode steps, fed the same tokens) and greedy tokens in a batch of "
         "distinct prompts, against the same prompt alone.")


def _row0_logits(model, prompts: torch.Tensor, steps: int, fed: list[int] | None) -> torch.Tensor:
    """Row 0's fp32 logits after the prefill and after each of ``steps`` decode steps, (steps + 1, vocab).
    Row 0 is fed ``fed`` (its tokens alone) so that every batch size sees the same inputs; the other
    rows their own argmax."""
    b, t = prompts.shape
    cache = KVCache(model.config, b, t + steps + 1, model.dtype, model.device)
    with torch.inference_mode():
        logits = model.prefill(prompts, torch.full((b,), t, dtype=torch.int32), cache)
        out = [logits[0].float()]
        for i in range(steps):
            tokens = logits.argmax(-1)
            if fed is not None:
                tokens[0] = fed[i]
            logits = model.decode(tokens, cache)
            out.append(logits[0].float())
    return torch.stack(out)


def measure(model, prompts: torch.Tensor, batches: list[int], new_tokens: int) -> list[dict]:
    """One row per batch size: row 0's logit change vs batch 1 (prefill and decode steps, which run
    with as many rows as the batch) and its greedy tokens' agreement with the prompt alone."""
    alone = engine.generate(model, prompts[:1], new_tokens, temperature=0, stop_at_eos=False).tokens[0]
    alone_logits = _row0_logits(model, prompts[:1], new_tokens - 1, alone)
    scale = float(alone_logits[0].max() - alone_logits[0].min())
    rows = []
    for b in batches:
        change = (_row0_logits(model, prompts[:b], new_tokens - 1, alone) - alone_logits).abs()
        tokens = engine.generate(model, prompts[:b], new_tokens, temperature=0, stop_at_eos=False).tokens[0]
        same = next((i for i, (x, y) in enumerate(zip(tokens, alone)) if x != y), len(alone))
        rows.append({"batch": b, "prefill_max_abs_logit_change": float(change[0].max()),
                     "decode_max_abs_logit_change": float(change[1:].max()) if len(change) > 1 else 0.0,
                     "relative_to_logit_range": float(change.max()) / scale,
                     "greedy_tokens_equal_before_first_difference": same, "of": len(alone)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="a released size, drawn at random (random:<model>)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 17, 20, 32])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="a few small batches, for the test suite")
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.prompt_len, args.new_tokens, args.dtypes = [1, 3], 4, 3, ["float32", "float16"]
    prompts = torch.randint(0, 50257, (max(args.batches), args.prompt_len), generator=torch.Generator().manual_seed(0))
    rows = []
    for dtype in args.dtypes:
        model = engine.load_model(f"random:{args.model}", device=args.device, dtype=dtype)
        for r in measure(model, prompts, args.batches, args.new_tokens):
            rows.append({"dtype": dtype, **r})
            print(rows[-1], flush=True)
    cols = ["dtype", "batch", "prefill_max_abs_logit_change", "decode_max_abs_logit_change", "relative_to_logit_range",
            "greedy_tokens_equal_before_first_difference", "of"]
    out = write_results("batch_invariance", args.device, rows, cols,
                        {"model": f"random:{args.model}", "threads": torch.get_num_threads(),
                         "prompt_len": args.prompt_len},
                        notes=NOTES)
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
