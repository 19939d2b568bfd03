"""Attention: our flash prefill and split-KV decode vs PyTorch SDPA (flash and math backends) and eager.

    python -m benchmarks.bench_attention            # GPU: prefill T = 128 ... 4096, decode cache 128 ... 8192
    python -m benchmarks.bench_attention --smoke    # CPU: small shapes through the interpreter

Prefill (causal, D = 64): TFLOP/s = 2 * 2 * B * H * T^2 * D / 2 / time (the causal half).
Decode (one query per row, every row at the full cache length): GB/s = K and V bytes read / time,
against the device's measured copy bandwidth. SDPA reads the cache with a boolean length mask;
eager is ``softmax(q k^T) v`` written out. On CPU the kernels run in the Triton interpreter and
no results are written.
"""

from __future__ import annotations

import torch

from .kernel_cli import interpreted, parse, print_row  # first: it sets up the interpreter before gpt2kernels loads

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import gpt2kernels

from .report import bar_plot, write_results
from .roofline import copy_gbps, matmul_tflops
from .timing import bench

PREFILL = [(1, 12, t) for t in (128, 512, 1024, 2048, 4096)] + [(8, 25, 1024), (16, 25, 1024)]  # (B, H, T)
DECODE = [(b, 12, n) for b in (1, 8, 64) for n in (128, 512, 1024)] + [(1, 12, 8192), (8, 12, 8192)]  # (B, H, len)


def eager_attention(q, k, v, mask=None):
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1).to(v.dtype) @ v


def sdpa(backend, *args, **kw):
    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(*args, **kw)
    return run


def prefill_rows(shapes, d, dtype, device, causal_mask):
    rows = []
    for b, h, t in shapes:
        q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype) for _ in range(3))
        fns = {"ours": lambda: gpt2kernels.flash_attention(q, k, v, causal=True),
               "sdpa_math": sdpa(SDPBackend.MATH, q, k, v, is_causal=True),
               "eager": lambda: eager_attention(q, k, v, causal_mask(t))}
        if device.type == "cuda":
            fns["sdpa_flash"] = sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, is_causal=True)
        torch.testing.assert_close(fns["ours"](), fns["sdpa_math"](), atol=2e-2, rtol=2e-2)
        flops = 2 * 2 * b * h * t * t * d / 2
        row = {"kind": "prefill", "B": b, "H": h, "T": t}
        for name, fn in fns.items():
            ms = bench(fn, device)["ms"]
            row[f"{name}_ms"], row[f"{name}_tflops"] = ms, flops / ms / 1e9
        rows.append(row)
        print_row(row)
    return rows


def decode_rows(shapes, d, dtype, device, roof):
    rows = []
    for b, h, n in shapes:
        q = torch.randn(b, h, 1, d, device=device, dtype=dtype)
        k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype) for _ in range(2))
        lens = torch.full((b,), n, dtype=torch.int32, device=device)
        mask = (torch.arange(n, device=device)[None, :] < lens[:, None])[:, None, None, :]
        fns = {"ours": lambda: gpt2kernels.decode_attention(q, k, v, lens, check_lens=False),
               "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
               "eager": lambda: eager_attention(q, k, v, mask)}
        torch.testing.assert_close(fns["ours"](), fns["eager"](), atol=2e-2, rtol=2e-2)
        nbytes = 2 * b * h * n * d * q.element_size()
        row = {"kind": "decode", "B": b, "H": h, "T": n}
        for name, fn in fns.items():
            ms = bench(fn, device)["ms"]
            row[f"{name}_ms"], row[f"{name}_gbps"] = ms, nbytes / ms / 1e6
        row["ours_pct_copy"] = 100 * row["ours_gbps"] / roof
        rows.append(row)
        print_row(row)
    return rows


def main(argv=None):
    args, device, smoke = parse(__doc__, argv)
    dtype, d = torch.float16, 64
    prefill, decode = ([(1, 2, 77)], [(2, 2, 100)]) if smoke else (PREFILL, DECODE)
    roof = copy_gbps(device)
    tflops = matmul_tflops(device, dtype) if device.type == "cuda" else float("nan")

    def causal_mask(t):
        return torch.ones(t, t, dtype=torch.bool, device=device).tril()

    rows = prefill_rows(prefill, d, dtype, device, causal_mask) + decode_rows(decode, d, dtype, device, roof)
    if interpreted(device):
        return
    cols = ["kind", "B", "H", "T", "ours_ms", "sdpa_flash_ms", "sdpa_math_ms", "sdpa_ms", "eager_ms", "ours_tflops",
            "sdpa_flash_tflops", "ours_gbps", "sdpa_gbps", "ours_pct_copy"]
    out = write_results("attention", device, rows, cols, {"copy_gbps": roof, "matmul_tflops_fp16": tflops, "D": d},
                        notes="fp16, D=64. Prefill is causal (TFLOP/s count the causal half); decode has every row "
                              "at length T (GB/s = K+V bytes / time).")
    pre = [r for r in rows if r["kind"] == "prefill"]
    bar_plot(out / "attention_prefill.png", "causal prefill, fp16, D=64",
             [f"B{r['B']} H{r['H']} T{r['T']}" for r in pre],
             {k: [r[f"{k}_tflops"] for r in pre] for k in ("ours", "sdpa_flash", "sdpa_math", "eager")}, "TFLOP/s")
    dec = [r for r in rows if r["kind"] == "decode"]
    bar_plot(out / "attention_decode.png", f"decode, fp16, D=64 (copy {roof:.0f} GB/s)",
             [f"B{r['B']} T{r['T']}" for r in dec],
             {k: [r[f"{k}_gbps"] for r in dec] for k in ("ours", "sdpa", "eager")},
             "GB/s")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
