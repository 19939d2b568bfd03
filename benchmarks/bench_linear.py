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

from .kernel_cli import interpreted, parse, print_row  # first: it sets up the interpreter before gpt2kernels loads

import torch.nn.functional as F

import gpt2kernels

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
    args, device, smoke = parse(__doc__, argv,
                                lambda p: p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"]))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if smoke:
        models, rows, vocab = {"tiny": 96}, [1, 33], 1000
        dtype = torch.float16 if device.type == "cpu" else dtype  # interpreter: no bf16 tl.dot
    else:
        models, rows, vocab = LAYERS, ROWS, 50257
    roof_gbps = copy_gbps(device)
    roof_tflops = matmul_tflops(device, dtype) if device.type == "cuda" else float("nan")
    print(f"copy {roof_gbps:.0f} GB/s, matmul {roof_tflops:.1f} TFLOP/s")

    def measure(model, layer, m, n, k, fns, flops, nbytes):
        """One result row from {"ours", "eager", "cublas"} callables; checks ours against eager first."""
        torch.testing.assert_close(fns["ours"](), fns["eager"](), atol=3e-2, rtol=3e-2)
        t = {name: bench(fn, device)["ms"] for name, fn in fns.items()}
        row = {"model": model, "layer": layer, "M": m, "N": n, "K": k, **{f"{name}_ms": v for name, v in t.items()},
               "ours_tflops": flops / t["ours"] / 1e9, "cublas_tflops": flops / t["cublas"] / 1e9,
               "ours_gbps": nbytes / t["ours"] / 1e6, "vs_cublas": t["cublas"] / t["ours"],
               "vs_eager": t["eager"] / t["ours"]}
        row["ours_pct_hbm"] = 100 * row["ours_gbps"] / roof_gbps
        print_row(row)
        return row

    def rand(*shape, seed, scale=1.0):
        return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(device, dtype)

    results = []
    for model, c in models.items():
        for layer, n, k, act, has_res, has_bias in layer_cases(c, vocab):
            for m in rows:
                x, w = rand(m, k, seed=m), rand(n, k, seed=n + k, scale=k**-0.5)
                b = rand(n, seed=n) if has_bias else None
                r = rand(m, n, seed=m + n) if has_res else None
                fns = {"ours": lambda: gpt2kernels.linear(x, w, b, act, r), "eager": lambda: eager(x, w, b, act, r),
                       "cublas": lambda: F.linear(x, w, b)}
                nbytes = (n * k + m * k + m * n * (2 if has_res else 1)) * x.element_size()
                results.append(measure(model, layer, m, n, k, fns, 2 * m * n * k, nbytes))
        # The whole MLP, residual included: ours (two fused linears) vs eager vs the two cuBLAS matmuls alone.
        f = 4 * c
        for m in rows:
            x, r = rand(m, c, seed=m), rand(m, c, seed=m + 1)
            fc_w, fc_b = rand(f, c, seed=1, scale=c**-0.5), rand(f, seed=2)
            pw, pb = rand(c, f, seed=3, scale=f**-0.5), rand(c, seed=4)
            fns = {"ours": lambda: gpt2kernels.gelu_mlp(x, fc_w, fc_b, pw, pb, r),
                   "eager": lambda: F.linear(F.gelu(F.linear(x, fc_w, fc_b), approximate="tanh"), pw, pb) + r,
                   "cublas": lambda: F.linear(F.linear(x, fc_w, fc_b), pw, pb)}
            nbytes = (2 * f * c + 3 * m * c) * x.element_size()
            results.append(measure(model, "gelu_mlp+res", m, c, f, fns, 2 * 2 * m * f * c, nbytes))

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
