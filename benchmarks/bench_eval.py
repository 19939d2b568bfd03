"""Perplexity evaluation time: ``engine.perplexity`` vs HF transformers' ``labels=`` loss over the same
sliding windows (HF's perplexity guide), same random weights, round-robin in one process.

    python -m benchmarks.bench_eval [--model gpt2] [--tokens 4096] [--device cpu] [--dtype float32]

Both score the same tokens; the losses must agree. Medians of --reps runs each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import engine
from engine.scoring import windows

from .report import write_results


def hf_perplexity_nll(hf, ids: list[int], window: int, stride: int, device) -> tuple[float, int]:
    """(NLL sum, tokens scored) by HF's guide: labels masked to -100 outside each window's new tokens."""
    nll, count = 0.0, 0
    for w in windows(len(ids), window, stride):
        inputs = torch.tensor([ids[w.begin:w.end]], device=device)
        labels = inputs.clone()
        labels[:, :w.first - w.begin] = -100
        with torch.inference_mode():
            loss = hf(inputs, labels=labels).loss
        n = w.end - w.first
        nll += loss.item() * n
        count += n
    return nll, count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    import transformers

    from engine.model.config import CONFIGS

    cfg = CONFIGS[args.model]
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = engine.load_model(d, device=args.device, dtype=args.dtype)
    hf = hf.to(args.device, getattr(torch, args.dtype))
    ids = torch.randint(0, 50257, (args.tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    window, stride = cfg.n_positions, cfg.n_positions // 2
    times = {"ours": [], "hf": []}
    for _ in range(args.reps):
        start = time.perf_counter()
        got = engine.perplexity(ours, ids, window, stride)
        times["ours"].append(time.perf_counter() - start)
        start = time.perf_counter()
        nll, count = hf_perplexity_nll(hf, ids, window, stride, args.device)
        times["hf"].append(time.perf_counter() - start)
    assert got.tokens == count and abs(got.loss - nll / count) < 1e-3 * max(1.0, nll / count), (got, nll / count)
    rows = [{"impl": k, "model": args.model, "dtype": args.dtype, "tokens": count, "seconds": statistics.median(v),
             "tokens_per_s": count / statistics.median(v), "loss": got.loss if k == "ours" else nll / count}
            for k, v in times.items()]
    for r in rows:
        print(r)
    ratio = rows[0]["seconds"] / rows[1]["seconds"]
    print(f"ours / hf time: {ratio:.3f}")
    cols = ["impl", "model", "dtype", "tokens", "seconds", "tokens_per_s", "loss"]
    out = write_results("eval", args.device, rows, cols,
                        {"window": window, "stride": stride, "threads": torch.get_num_threads(), "ours_over_hf": ratio},
                        notes="engine.perplexity vs HF's labels= loss over the same windows (round-robin, medians).")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
