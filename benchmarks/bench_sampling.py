"""Sampling latency: our compiled samplers vs torch's sort-based top-k/top-p and plain multinomial.

    python -m benchmarks.bench_sampling            # batch 1, 8, 64, 256 x vocab 50257
    python -m benchmarks.bench_sampling --smoke    # batch 1, 8 only
    python -m benchmarks.bench_sampling --sweep    # the split sampler's sizes (block, rounds) at batch 1

The torch baseline is what HF's warpers do: temperature, top-k by ``topk``, softmax, sort,
cumsum for top-p, min-p against the top probability, then ``torch.multinomial``;
``torch_multinomial`` is a softmax and ``multinomial`` alone (no filter). ``ours`` is
``sample_unchecked`` as the engine calls it: on a GPU the split sampler below as many rows as the
GPU has SMs, the CUDA one-block-per-row sampler from there; both are also timed on their own
(``split``, ``block``). On CPU, ``ours`` is the C++ sampler (real CPU figures).

Each row says how it was timed (``timing``): ``python`` is one call from Python (CUDA events
through ``do_bench``, L2 flushed), which at these sizes is mostly launch overhead (6 Triton launches
for the split sampler); ``graph`` is one call replayed from a CUDA graph, the device time a graphed
decode step pays (GPU only). Results go to benchmarks/results/<device>/sampling.*.
"""

from __future__ import annotations

import torch

from .kernel_cli import parse, print_row  # before gpt2kernels: the interpreter switch
from .report import bar_plot, write_results
from .timing import bench, graph_bench

import gpt2kernels  # noqa: E402
from gpt2kernels import sampling_split  # noqa: E402
from gpt2kernels.sampling import row_parameters, row_seeds, sample_blockwise, sample_unchecked  # noqa: E402

TEMPERATURE = 0.8
SETTINGS = {"top_k=50": dict(top_k=50), "top_p=0.9": dict(top_p=0.9), "top_k=50,top_p=0.9": dict(top_k=50, top_p=0.9),
            "min_p=0.05": dict(min_p=0.05)}
IMPLS = ("ours", "split", "block", "torch_sort", "torch_multinomial")


def torch_sort_sampler(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
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
    probs = torch.softmax(x, -1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    return torch.multinomial(probs, 1).squeeze(1)


def row_params(batch: int, device: torch.device, top_k=0, top_p=1.0, min_p=0.0) -> tuple[torch.Tensor, ...]:
    """The per-row tensors ``sample_unchecked`` takes (temperature ... min_p, seed, offset)."""
    return (*row_parameters(batch, device, TEMPERATURE, top_k, top_p, min_p), row_seeds(1, batch, device),
            torch.zeros(batch, dtype=torch.int64, device=device))


def implementations(logits: torch.Tensor, kw: dict) -> dict:
    """impl -> a capturable call (no host sync, no allocation outside the graph's pool)."""
    params = row_params(logits.shape[0], logits.device, **kw)
    fns = {"ours": lambda: sample_unchecked(logits, *params),
           "torch_sort": lambda: torch_sort_sampler(logits, TEMPERATURE, **kw),
           "torch_multinomial": lambda: torch.multinomial(torch.softmax(logits / TEMPERATURE, -1), 1)}
    if logits.is_cuda:
        if logits.shape[0] < sampling_split.split_max_rows(logits.device):
            fns["split"] = lambda: sampling_split.sample_split(logits, *params)
        fns["block"] = lambda: sample_blockwise(logits, *params)
    return fns


SWEEP_BLOCKS = (512, 1024, 2048, 4096)
SWEEP_ROUNDS = (2, 3)


def sweep_split(device: torch.device, smoke: bool) -> None:
    """Graph-replay latency of the split sampler at batch 1 for each (tokens per program, rounds),
    every setting, all drawing the same tokens (checked); on CPU (the interpreter) a small vocabulary
    and one call each, which shows only that the sizes run (with ``smoke``: two of them, one setting)."""
    vocab = 50257 if device.type == "cuda" else 3000
    logits = torch.randn(1, vocab, device=device) * 3
    rows = []
    blocks, settings = (SWEEP_BLOCKS[:2], list(SETTINGS.items())[2:3]) if smoke else (SWEEP_BLOCKS, SETTINGS.items())
    for name, kw in settings:
        params = row_params(1, device, **kw)
        out = torch.empty(1, dtype=torch.int64, device=device)
        tokens = set()
        for block in blocks:
            for rounds in SWEEP_ROUNDS:
                def fn():
                    sampling_split.split_launch(logits, *params, out, advance=False,
                                                block=block, rounds=rounds)
                fn()
                tokens.add(int(out.item()))
                timed = graph_bench(fn, device, warmup=0, reps=1) if device.type == "cpu" else graph_bench(fn, device)
                row = {"setting": name, "block": block, "rounds": rounds, "graph_us": timed["ms"] * 1e3}
                rows.append(row)
                print_row(row)
        assert len(tokens) == 1, f"{name}: the sizes drew different tokens {tokens}"
    if device.type == "cpu" or smoke:
        print("sweep on CPU (interpreter) or smoke: nothing written")
        return
    write_results("sampling_split_sweep", device, rows, ["setting", "block", "rounds", "graph_us"],
                  {"vocab": vocab, "batch": 1, "temperature": TEMPERATURE},
                  notes="One call of the split sampler replayed from a CUDA graph (µs, median); block = tokens "
                        "per program, rounds = multi-program rounds before a row finishes in one program.")


def main(argv=None):
    args, device, _ = parse(__doc__, argv, real_cpu_timings=True,  # the C++ sampler's
                            add_arguments=lambda p: p.add_argument("--sweep", action="store_true",
                                                                   help="time the split sampler's sizes instead"))
    if args.sweep:
        sweep_split(device, args.smoke)
        return
    batches = [1, 8] if args.smoke else [1, 8, 64, 256]
    gpt2kernels.sample(torch.randn(1, 10, device=device))  # build / load the extension outside the timings
    timings = ["python", "graph"] if device.type == "cuda" else ["python"]
    reps = dict(warmup=1 if args.smoke else 3, reps=3 if args.smoke else 20)
    rows = []
    for batch in batches:
        logits = torch.randn(batch, 50257, device=device) * 3
        for name, kw in SETTINGS.items():
            fns = implementations(logits, kw)
            for timing in timings:
                row = {"batch": batch, "setting": name, "timing": timing}
                for impl, fn in fns.items():
                    timed = bench(fn, device, **reps) if timing == "python" else graph_bench(fn, device, **reps)
                    row[f"{impl}_us"] = timed["ms"] * 1e3
                row["speedup_vs_sort"] = row["torch_sort_us"] / row["ours_us"]
                rows.append(row)
                print_row(row)
    if args.smoke:
        print("smoke run: nothing written")
        return
    cols = ["batch", "setting", "timing"] + [f"{impl}_us" for impl in IMPLS] + ["speedup_vs_sort"]
    out = write_results("sampling", device, rows, cols, {"vocab": 50257, "temperature": TEMPERATURE},
                        notes="Latency per call in microseconds (median). timing: python = one call from Python "
                              "(mostly launch overhead at these sizes), graph = one call replayed from a CUDA "
                              "graph. ours = what the engine calls (split below the SM count of rows, block from "
                              "there; the C++ sampler on CPU). torch_multinomial applies no filter.")
    labels = [f"b{r['batch']} {r['setting']} {r['timing']}" for r in rows]
    bar_plot(out / "sampling.png", "sampling latency, vocab 50257", labels,
             {k: [r.get(f"{k}_us", 0.0) for r in rows] for k in ("ours", "torch_sort", "torch_multinomial")}, "µs")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
