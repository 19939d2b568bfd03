"""Linear (+ bias, GELU, residual) and the GELU-MLP: our Triton kernels vs eager PyTorch and cuBLAS.

    python -m benchmarks.bench_linear            # GPU: gpt2 ... gpt2-xl shapes, M = 1 ... 4096, fp16
    python -m benchmarks.bench_linear --smoke    # CPU: two small shapes through the interpreter

Per case: ours (one fused kernel, two with split-K), eager (``F.linear`` then ``F.gelu`` then
``+ residual``, what a PyTorch model runs) and cuBLAS alone (``F.linear`` with bias, no
activation or residual: the matmul floor the fused epilogue competes with). Reported as TFLOP/s
(2·M·N·K / time) and GB/s (weight + activations read and written / time) against the device's
measured matmul and copy roofline. On CPU the kernels run in the Triton interpreter: the run
proves the benchmark works; its timings mean nothing and no results are written.
"""

from __future__ import annotations

import torch

from .kernel_cli import interpreted, parse, print_row  # first: it sets up the interpreter before kernels loads

import torch.nn.functional as F

import kernels

from .report import bar_plot, write_results
from .roofline import copy_gbps, matmul_tflops
from .timing import bench

LAYERS = {  # model -> width
    "gpt2": 768, "gpt2-medium": 1024, "gpt2-large": 1280, "gpt2-xl": 1600,
}
ROWS = [1, 8, 64, 512, 4096]


def layer_cases(c: int, vocab: int = 50257):
    """(layer, N, K, activation, residual?, bias?) as GPT-2 runs them; lm_head has no bias."""
    return [("c_attn", 3 * c, c, None, False, True), ("attn.c_proj+res", c, c, None, True, True),
            ("c_fc+gelu", 4 * c, c, "gelu_tanh", False, True), ("mlp.c_proj+res", c, 4 * c, None, True, True),
            ("lm_head", vocab, c, None, False, False)]


def eager(x, w, b, act, r):
    y = F.linear(x, w, b)
    if act:
        y = F.gelu(y, approximate="tanh")
    return y + r if r is not None else y


def main(argv=None):
    args, device, smoke = parse(__doc__, argv, lambda p: p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"]))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if smoke:
        models, rows, vocab = {"tiny": 96}, [1, 33], 1000
        dtype = torch.float16 if device.type == "cpu" else dtype  # interpreter: no bf16 tl.dot
    else:
        models, rows, vocab = LAYERS, ROWS, 50257
    roof_gbps = copy_gbps(device)
    roof_tflops = matmul_tflops(device, dtype) if device.type == "cuda" else float("nan")
    print(f"copy {roof_gbps:.0f} GB/s, matmul {roof_tflops:.1f} TFLOP/s")

    results = []
    for model, c in models.items():
        for layer, n, k, act, has_res, has_bias in layer_cases(c, vocab):
            for m in rows:
                g = torch.Generator().manual_seed(m + n + k)
                x = torch.randn(m, k, generator=g).to(device, dtype)
                w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
                b = torch.randn(n, generator=g).to(device, dtype) if has_bias else None
                r = torch.randn(m, n, generator=g).to(device, dtype) if has_res else None
                ours = lambda: kernels.linear(x, w, b, act, r)  # noqa: E731
                base = lambda: eager(x, w, b, act, r)  # noqa: E731
                cublas = lambda: F.linear(x, w, b)  # noqa: E731
                torch.testing.assert_close(ours(), base(), atol=3e-2, rtol=3e-2)
                t = {name: bench(fn, device)["ms"] for name, fn in (("ours", ours), ("eager", base), ("cublas", cublas))}
                flops = 2 * m * n * k
                nbytes = (n * k + m * k + m * n * (2 if has_res else 1)) * x.element_size()
                row = {"model": model, "layer": layer, "M": m, "N": n, "K": k, **{f"{k_}_ms": v for k_, v in t.items()},
                       "ours_tflops": flops / t["ours"] / 1e9, "cublas_tflops": flops / t["cublas"] / 1e9,
                       "ours_gbps": nbytes / t["ours"] / 1e6, "vs_cublas": t["cublas"] / t["ours"],
                       "vs_eager": t["eager"] / t["ours"]}
                row["ours_pct_hbm"] = 100 * row["ours_gbps"] / roof_gbps
                results.append(row)
                print_row(row)

    if interpreted(device):
        return
    cols = ["model", "layer", "M", "N", "K", "ours_ms", "eager_ms", "cublas_ms", "ours_tflops", "cublas_tflops",
            "ours_gbps", "ours_pct_hbm", "vs_cublas", "vs_eager"]
    out = write_results(f"linear_{args.dtype}", device, results, cols,
                        {"copy_gbps": roof_gbps, "matmul_tflops": roof_tflops, "dtype": args.dtype},
                        notes="vs_cublas / vs_eager: speed-up of ours (>1 is faster). Decode rows (M=1) are judged "
                              "by ours_pct_hbm, prefill rows (M>=512) by vs_cublas.")
    for m in (1, 512):
        sel = [r for r in results if r["M"] == m]
        metric = "ours_gbps" if m == 1 else "ours_tflops"
        base_metric = None if m == 1 else "cublas_tflops"
        series = {"ours": [r[metric] for r in sel]}
        if base_metric:
            series["cuBLAS"] = [r[base_metric] for r in sel]
        bar_plot(out / f"linear_{args.dtype}_M{m}.png", f"linear {args.dtype}, M={m}",
                 [f"{r['model']} {r['layer']}" for r in sel], series, "GB/s" if m == 1 else "TFLOP/s")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
