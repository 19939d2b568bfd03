"""How much a prompt's result moves with the batch around it, per dtype.

    python -m benchmarks.batch_invariance [--model gpt2] [--device cpu] [--batches 1 2 4 8 16 17 20 32]

Row 0 holds the same prompt in every batch; the other rows hold different prompts of the same
length (distinct, so no prefill is shared). For each dtype and batch size: the largest change of
row 0's prefill logits against batch 1 (as a fraction of their range), and how many of row 0's
--new-tokens greedy tokens equal its tokens generated alone before the first difference. Random
weights (no checkpoint needed); a reduction whose order depends on the row count (a GEMM kernel
chosen by M, fp16 GEMVs upcast to an fp32 GEMM beyond 16 rows on CPU) shows here.
"""

from __future__ import annotations

import argparse

import torch

import engine

from .report import write_results


def measure(model, prompts: torch.Tensor, batches: list[int], new_tokens: int) -> list[dict]:
    """One row per batch size: row 0's logit change vs batch 1 and its greedy tokens' agreement."""
    with torch.inference_mode():
        alone_logits = model(prompts[:1])[0, -1].float()
    alone = engine.generate(model, prompts[:1], new_tokens, temperature=0, stop_at_eos=False).tokens[0]
    scale = float(alone_logits.max() - alone_logits.min())
    rows = []
    for b in batches:
        with torch.inference_mode():
            logits = model(prompts[:b])[0, -1].float()
        tokens = engine.generate(model, prompts[:b], new_tokens, temperature=0, stop_at_eos=False).tokens[0]
        same = next((i for i, (x, y) in enumerate(zip(tokens, alone)) if x != y), len(alone))
        rows.append({"batch": b, "max_abs_logit_change": float((logits - alone_logits).abs().max()),
                     "relative_to_logit_range": float((logits - alone_logits).abs().max()) / scale,
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
    cols = ["dtype", "batch", "max_abs_logit_change", "relative_to_logit_range",
            "greedy_tokens_equal_before_first_difference", "of"]
    out = write_results("batch_invariance", args.device, rows, cols,
                        {"model": f"random:{args.model}", "threads": torch.get_num_threads(),
                         "prompt_len": args.prompt_len},
                        notes="Row 0's prefill logits and greedy tokens in a batch of distinct prompts, "
                              "against the same prompt alone.")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
