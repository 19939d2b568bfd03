"""What programmatic dependent launch (PDL) saves between two dependent kernels, in a CUDA graph.

    python -m benchmarks.pdl_gap          # GPU (sm_90+ for the PDL rows)

A chain of dependent GEMVs, y_{i+1} = W_i y_i (fp16, one token: a decode step's shape), each its own
kernel launch, captured in one CUDA graph and replayed; µs per kernel three ways:
- ``plain``: launched as today: each kernel starts when the previous one has finished;
- ``pdl_wait_first``: ``launch_pdl=True``, the kernel waits (``gdc_wait``) before any load;
- ``pdl_prefetch``: ``launch_pdl=True``, the weight tile is loaded *before* the wait (it does not
  depend on the previous kernel) and the next kernel is allowed to launch at once; only the
  activation load waits.
The matrices (gpt2's 768 x 768 and gpt2-xl's 1600 x 1600, 120 MB of them) exceed the L2, so the
weights stream from memory; ``copy_us`` is their bytes at the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .report import write_results
from .roofline import copy_gbps
from .timing import graph_bench

MODES = {"plain": 0, "pdl_wait_first": 1, "pdl_prefetch": 2}


@triton.jit
def _gemv_kernel(w_ptr, x_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if MODE == 1:
        gdc_wait()
        gdc_launch_dependents()
    w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
    if MODE == 2:
        gdc_launch_dependents()
        gdc_wait()
    x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
    y = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


def chain(weights: list[torch.Tensor], xs: list[torch.Tensor], mode: str, block_n: int):
    """A function launching one GEMV per matrix, each reading the previous one's output."""
    n, k = weights[0].shape
    block_k = triton.next_power_of_2(k)
    pdl = MODES[mode] != 0

    def run():
        for i, w in enumerate(weights):
            _gemv_kernel[(triton.cdiv(n, block_n),)](w, xs[i], xs[i + 1], n, k, BLOCK_N=block_n, BLOCK_K=block_k,
                                                      MODE=MODES[mode], num_warps=4, launch_pdl=pdl)
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megabytes", type=int, default=120, help="weights in the chain, beyond the L2")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("pdl_gap needs a GPU: nothing measured")
        return
    pdl_ok = torch.cuda.get_device_capability() >= (9, 0)
    roof = copy_gbps("cuda")
    rows = []
    for name, width, block_n in (("gpt2", 768, 4), ("gpt2-xl", 1600, 4)):
        count = args.megabytes * 2**20 // (width * width * 2)
        g = torch.Generator(device="cuda").manual_seed(0)
        weights = [torch.randn(width, width, device="cuda", dtype=torch.float16, generator=g) * width**-0.5
                   for _ in range(count)]
        xs = [torch.randn(width, device="cuda", dtype=torch.float16, generator=g)] + \
             [torch.empty(width, device="cuda", dtype=torch.float16) for _ in range(count)]
        row = {"shape": f"{name} {width}x{width}", "kernels": count, "programs": triton.cdiv(width, block_n),
               "copy_us": width * width * 2 / (roof * 1e3)}
        want = None
        for mode in MODES:
            if mode != "plain" and not pdl_ok:
                continue
            run = chain(weights, xs, mode, block_n)
            us = graph_bench(run, "cuda", replays=30)["ms"] * 1e3 / count
            out = xs[-1].float().clone()
            want = out if want is None else want
            torch.testing.assert_close(out, want)  # the same chain, the same result in every mode
            row[f"{mode}_us"] = us
        print(row, flush=True)
        rows.append(row)
        del weights, xs
    cols = ["shape", "kernels", "programs", "copy_us", *[f"{m}_us" for m in MODES]]
    write_results("pdl_gap", "cuda", rows, cols, {"copy_gbps": roof, "pdl_supported": pdl_ok},
                  notes="µs per dependent GEMV kernel (fp16, M = 1) in a CUDA graph of a chain of them; copy_us: its "
                        "weight bytes at the measured copy bandwidth. pdl_*: launched with programmatic dependent "
                        "launch (wait first, or the weights loaded before the wait).")


if __name__ == "__main__":
    main()
