"""The backward passes: LayerNorm, the GELU MLP and flash attention, ours against PyTorch's.

    python -m benchmarks.bench_backward            # GPU: GPT-2 training shapes, bf16
    python -m benchmarks.bench_backward --smoke    # CPU: small shapes through the interpreter

Each case times only the backward (``torch.autograd.grad`` on a kept graph, do_bench medians):
LayerNorm against ``F.layer_norm``'s, ``gelu_mlp`` against eager ``F.linear`` -> GELU -> ``F.linear``
(which saves its pre-activation and activation; ours saves neither and recomputes one GEMM), and
``flash_attention`` against SDPA's flash backward and SDPA's default choice. Inputs are larger than L2.
"""

from __future__ import annotations

import torch

from .kernel_cli import interpreted, parse, print_row  # first: it sets up the interpreter before gpt2kernels loads

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import gpt2kernels

from .report import write_results
from .timing import bench


def _backward(fn, inputs, device):
    """A callable running only fn's backward, on a graph built once, and the grad it feeds."""
    out = fn(*inputs)
    grad = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


def cases(smoke: bool, device, dtype):
    rows, widths = (64, (96,)) if smoke else (8192, (768, 1600))
    for c in widths:
        g = torch.Generator().manual_seed(c)
        x = torch.randn(rows, c, generator=g).to(device, dtype).requires_grad_()
        w, b = (1 + 0.1 * torch.randn(c, generator=g)).to(device, dtype).requires_grad_(), \
            torch.zeros(c, device=device, dtype=dtype, requires_grad=True)
        yield (f"layer_norm C={c}", {"ours": (gpt2kernels.layer_norm, (x, w, b)),
                                     "eager": (lambda x, w, b: F.layer_norm(x, (c,), w, b), (x, w, b))})
        fw = (torch.randn(4 * c, c, generator=g) * c ** -0.5).to(device, dtype).requires_grad_()
        pw = (torch.randn(c, 4 * c, generator=g) * (4 * c) ** -0.5).to(device, dtype).requires_grad_()
        fb, pb = torch.zeros(4 * c, device=device, dtype=dtype, requires_grad=True), b
        yield (f"gelu_mlp M={rows} C={c}", {
            "ours": (gpt2kernels.gelu_mlp, (x, fw, fb, pw, pb)),
            "eager": (lambda *a: F.linear(F.gelu(F.linear(a[0], a[1], a[2]), approximate="tanh"), a[3], a[4]),
                      (x, fw, fb, pw, pb))})
    shapes = [(1, 2, 64, 64)] if smoke else [(8, 12, 1024, 64), (4, 12, 2048, 64), (8, 25, 1024, 64)]
    for b_, h, t, d in shapes:
        g = torch.Generator().manual_seed(t)
        q, k, v = (torch.randn(b_, h, t, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        cases_ = {"ours": (lambda q, k, v: gpt2kernels.flash_attention(q, k, v, True), (q, k, v))}
        if device.type == "cuda":
            def sdpa_flash(q, k, v):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            cases_["sdpa_flash"] = (sdpa_flash, (q, k, v))
        cases_["sdpa_default"] = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v))
        yield (f"flash_attention B={b_} H={h} T={t} D={d}", cases_)


def main(argv=None):
    args, device, smoke = parse(__doc__, argv)
    dtype = torch.float32 if smoke else torch.bfloat16
    results = []
    for name, impls in cases(smoke, device, dtype):
        times = {impl: bench(_backward(fn, inputs, device), device)["ms"] for impl, (fn, inputs) in impls.items()}
        row = {"case": name, **{f"{k}_ms": v for k, v in times.items()}}
        for other in times:
            if other != "ours":
                row[f"ours_vs_{other}"] = times[other] / times["ours"]  # > 1: ours faster
        results.append(row)
        print_row(row)
    if interpreted(device):
        return
    cols = sorted({k for r in results for k in r}, key=lambda k: (k != "case", not k.endswith("_ms"), k))
    out = write_results("backward", device, results, cols, {"dtype": "bf16"},
                        notes="Backward only (graph built once), do_bench medians. ours_vs_X = X's time / ours "
                              "(> 1: ours faster).")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
