"""Cross-entropy and lm_head + cross-entropy: ours vs PyTorch eager vs torch.compile, time and peak memory.

    python -m benchmarks.bench_cross_entropy           # GPU: N = 1K..16K tokens, C = 768 and 1600, V = 50257, bf16
    python -m benchmarks.bench_cross_entropy --smoke   # CPU: small shapes through the interpreter

linear_cross_entropy: ours (``gpt2kernels.linear_cross_entropy``, chunked, never holding N x V logits)
against ``F.cross_entropy(F.linear(h, w), t)`` as a training loop writes it, and that expression
under ``torch.compile`` (at --compile-n tokens only: each shape compiles for a minute). Forward
alone (under no_grad) and forward + backward (grads for hidden and weight). cross_entropy: ours
against ``F.cross_entropy`` on given logits. Peak memory: the most allocated above the inputs
during the call (grads included), from torch.cuda's peak statistics.
"""

from __future__ import annotations

import torch

from .kernel_cli import interpreted, parse, print_row  # first: it sets up the interpreter before gpt2kernels loads

import torch.nn.functional as F

import gpt2kernels

from .report import bar_plot, write_results
from .roofline import roofline
from .timing import bench

VOCAB = 50257
TOKENS = [1024, 4096, 8192, 16384]
WIDTHS = [768, 1600]


def unfused(h, w, t):
    return F.cross_entropy(F.linear(h, w), t)


def peak_mb(fn, device) -> float:
    """MB allocated at the peak of ``fn()`` above what was allocated before it (CPU: not measured)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure(fn, device) -> dict:
    fn()  # compiles, autotuning and the caching allocator's first growth stay out of both figures
    return {"ms": bench(fn, device)["ms"], "peak_mb": peak_mb(fn, device)}


def linear_rows(n, c, vocab, dtype, device, compile_n) -> list[dict]:
    g = torch.Generator().manual_seed(n + c)
    h = torch.randn(n, c, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, c, generator=g) / c**0.5).to(device, dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g).to(device)
    impls = {"ours": gpt2kernels.linear_cross_entropy, "eager": unfused}
    if n == compile_n and c == WIDTHS[-1]:  # one shape: each compile takes a minute
        impls["compile"] = torch.compile(unfused)
    # Same loss and gradients (bf16 grads: a few 1e-3 apart, the unfused path rounds its logits too).
    got, want = gpt2kernels.linear_cross_entropy(h, w, t), unfused(h, w, t)
    (gh, gw), (wh, ww) = torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in ((gh, wh), (gw, ww)))
    rows = []
    for name, f in impls.items():
        def forward():
            with torch.no_grad():
                return f(h, w, t)

        def forward_backward():
            h.grad = w.grad = None
            f(h, w, t).backward()

        fwd, both = measure(forward, device), measure(forward_backward, device)
        rows.append({"op": "linear_cross_entropy", "impl": name, "tokens": n, "width": c,
                     "fwd_ms": fwd["ms"], "fwd_peak_mb": fwd["peak_mb"],
                     "fwd_bwd_ms": both["ms"], "fwd_bwd_peak_mb": both["peak_mb"], "grad_rel_err": err})
    return rows


def plain_rows(n, vocab, dtype, device) -> list[dict]:
    g = torch.Generator().manual_seed(n)
    logits = (torch.randn(n, vocab, generator=g) * 3).to(device, dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g).to(device)
    rows = []
    for name, f in {"ours": gpt2kernels.cross_entropy, "eager": F.cross_entropy}.items():
        def forward():
            with torch.no_grad():
                return f(logits, t)

        def forward_backward():
            logits.grad = None
            f(logits, t).backward()

        fwd, both = measure(forward, device), measure(forward_backward, device)
        nbytes = logits.numel() * logits.element_size()
        rows.append({"op": "cross_entropy", "impl": name, "tokens": n, "width": vocab,
                     "fwd_ms": fwd["ms"], "fwd_peak_mb": fwd["peak_mb"],
                     "fwd_bwd_ms": both["ms"], "fwd_bwd_peak_mb": both["peak_mb"],
                     "fwd_gbps": nbytes / fwd["ms"] / 1e6})
    return rows


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's time and peak memory as a share of the eager row of the same op and shape."""
    eager = {(r["op"], r["tokens"], r["width"]): r for r in rows if r["impl"] == "eager"}
    for r in rows:
        e = eager.get((r["op"], r["tokens"], r["width"]))
        if e is None:
            continue
        r["fwd_bwd_time_vs_eager"] = r["fwd_bwd_ms"] / e["fwd_bwd_ms"]
        r["fwd_bwd_mem_vs_eager"] = r["fwd_bwd_peak_mb"] / e["fwd_bwd_peak_mb"] if e["fwd_bwd_peak_mb"] else None
    return rows


def save(results: list[dict], device, extra: dict):
    cols = ["op", "impl", "tokens", "width", "fwd_ms", "fwd_bwd_ms", "fwd_peak_mb", "fwd_bwd_peak_mb",
            "fwd_bwd_time_vs_eager", "fwd_bwd_mem_vs_eager", "grad_rel_err", "fwd_gbps"]
    return write_results("cross_entropy", device, with_ratios(results), cols, extra,
                         notes="linear_cross_entropy: hidden (tokens, width) x weight (50257, width), bf16; eager is "
                               "F.cross_entropy(F.linear(h, w), t), compile is torch.compile of it. cross_entropy: on "
                               "given bf16 logits (width = vocab). Times: medians of do_bench; peak: MB above the "
                               "inputs, grads included. grad_rel_err: max |ours - eager| / max |eager| over both "
                               "grads.")


def main(argv=None):
    def add_arguments(p):
        p.add_argument("--compile-n", type=int, default=8192, help="tokens at which torch.compile is timed (0: never)")

    args, device, smoke = parse(__doc__, argv, add_arguments)
    vocab, tokens, widths, dtype = VOCAB, TOKENS, WIDTHS, torch.bfloat16
    if smoke:
        vocab, tokens, widths, dtype, args.compile_n = 1000, [64], [48], torch.float32, 0
    extra = {} if interpreted(device) else {"dtype": "bf16", "vocab": vocab, **roofline(device)}
    results = []
    cases = [(linear_rows, (n, c, vocab, dtype, device, args.compile_n)) for c in widths for n in tokens]
    cases += [(plain_rows, (n, vocab, dtype, device)) for n in tokens]
    for fn, case_args in cases:
        for row in fn(*case_args):
            results.append(row)
            print_row(row)
        if not interpreted(device, quiet=True):  # after every case: a run cut short keeps what it measured
            out = save(results, device, extra)
    if interpreted(device):
        return
    big = [r for r in results if r["op"] == "linear_cross_entropy" and r["impl"] != "compile"]
    labels = [f"{r['impl']} N={r['tokens']} C={r['width']}" for r in big]
    bar_plot(out / "cross_entropy.png", "lm_head + cross-entropy, forward + backward (bf16)", labels,
             {"ms": [r["fwd_bwd_ms"] for r in big], "peak GB": [r["fwd_bwd_peak_mb"] / 1024 for r in big]}, "ms / GB")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
