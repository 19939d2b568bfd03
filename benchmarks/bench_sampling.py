"""Sampling latency: our compiled sampler vs torch's sort-based top-k/top-p and plain multinomial.

    python -m benchmarks.bench_sampling            # batch 1, 8, 64, 256 x vocab 50257
    python -m benchmarks.bench_sampling --smoke    # batch 1, 8 only

The torch baseline is what HF's warpers do: temperature, top-k by ``topk``, softmax, sort,
cumsum for top-p, then ``torch.multinomial``. Runs on CPU (the C++ path: real CPU figures) and on
GPU (the CUDA path). Results go to benchmarks/results/<device>/sampling.*.
"""

from __future__ import annotations

import torch

import gpt2kernels

from .kernel_cli import parse, print_row
from .report import bar_plot, write_results
from .timing import bench

SETTINGS = {"top_k=50": dict(top_k=50, top_p=1.0), "top_p=0.9": dict(top_k=0, top_p=0.9),
            "top_k=50,top_p=0.9": dict(top_k=50, top_p=0.9)}


def torch_sort_sampler(logits, temperature, top_k, top_p):
    x = logits.float() / temperature
    if top_k:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1:
        vals, idx = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(vals, -1)
        before = torch.cumsum(probs, -1) - probs
        vals = vals.masked_fill(before >= top_p, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(1, idx, vals)
    return torch.multinomial(torch.softmax(x, -1), 1).squeeze(1)


def main(argv=None):
    args, device, _ = parse(__doc__, argv, real_cpu_timings=True)  # the C++ sampler's
    batches = [1, 8] if args.smoke else [1, 8, 64, 256]  # the C++ path on CPU gives real figures
    gpt2kernels.sample(torch.randn(1, 10, device=device))  # build / load the extension outside the timings
    rows = []
    for batch in batches:
        logits = torch.randn(batch, 50257, device=device) * 3
        for name, kw in SETTINGS.items():
            fns = {"ours": lambda: gpt2kernels.sample(logits, 0.8, seed=1, **kw),
                   "torch_sort": lambda: torch_sort_sampler(logits, 0.8, **kw),
                   "torch_multinomial": lambda: torch.multinomial(torch.softmax(logits / 0.8, -1), 1)}
            row = {"batch": batch, "setting": name}
            for impl, fn in fns.items():
                row[f"{impl}_us"] = bench(fn, device, warmup=1 if args.smoke else 3,
                                          reps=3 if args.smoke else 20)["ms"] * 1e3
            row["speedup_vs_sort"] = row["torch_sort_us"] / row["ours_us"]
            rows.append(row)
            print_row(row)
    if args.smoke:
        print("smoke run: nothing written")
        return
    cols = ["batch", "setting", "ours_us", "torch_sort_us", "torch_multinomial_us", "speedup_vs_sort"]
    out = write_results("sampling", device, rows, cols, {"vocab": 50257, "temperature": 0.8},
                        notes="Latency per call in microseconds (median). torch_multinomial applies no top-k/top-p.")
    labels = [f"b{r['batch']} {r['setting']}" for r in rows]
    bar_plot(out / "sampling.png", "sampling latency, vocab 50257", labels,
             {k: [r[f"{k}_us"] for r in rows] for k in ("ours", "torch_sort", "torch_multinomial")}, "µs")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
