"""The batch-1 decode GEMV: ``y = act(LayerNorm?(x) @ weight.T + bias) + residual`` for one row, in one
kernel that starts streaming its weights before the previous kernel of the step has finished.

At decode sizes a linear is a few µs of weight bytes behind a fixed latency: launch, the first
loads' round trip, the LayerNorm statistics, the epilogue's stores (DESIGN.md). This kernel cuts
that chain:
- each program holds one tile of ``BLOCK_N`` weight rows by ``BLOCK_K`` columns in registers
  (the whole of K for GPT-2's shapes), loaded first: with programmatic dependent launch (PDL,
  sm_90+) it calls ``gdc_launch_dependents`` and only then ``gdc_wait``, so the weights (which
  nothing in the step writes) stream in while the previous kernel finishes, and the next kernel
  can start doing the same; activations, the residual and the cache lengths are read after the wait;
- no ``tl.dot`` padding to 16 rows: products in fp32 FMAs and one ``tl.sum`` (as gemlite's GEMV does);
- no split-K: the tiles are sized so the grid has at least one program per SM, and each output is
  reduced by one program in a fixed order (deterministic, no atomics);
- the LayerNorm prologue reads the row once, in one wide load, for its statistics and its values.
The epilogue (int8 scales, bias, GELU, residual, or the KV-cache store of a fused QKV projection)
is ``linear_epilogue``, the same as the tiled kernel's. ``gpt2kernels.linear`` and the fused decode
ops route one-row products here (``gemv_applies``); the references are theirs.

Only one row: a version unrolling up to 8 rows over the same weight tile was correct on an H200 but
slower than the tiled kernel at batch 8 (gpt2 9483 tok/s against 16826, gpt2-xl 889 against 2564;
benchmarks/results/nvidia-h200/e2e_*_fp16_decode.md): 8 cross-warp reductions a program, and 220
registers a thread. Batches of 2 and more stay on the tiled split-K kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .epilogue import argmax_epilogue, linear_epilogue
from .layernorm import centre_and_scale
from ._ops import arrival_counters, use_pdl

# Rows a GEMV launch takes; more go to the tiled kernel (gpt2kernels.linear). See the module's docstring.
GEMV_MAX_ROWS = 1
# Weight elements one program holds (BLOCK_N x BLOCK_K): 64 16-bit values a thread at 4 warps, 32
# registers. fp32 (the correctness path) at 4096 spilled 8-28 bytes on sm_80 and sm_90 (gpt2kernels.aot,
# Triton 3.9), and 2048 at 4 warps still 8 bytes on sm_80 with the LayerNorm (Triton 3.6): 2048 at 8 warps.
TILE_ELEMENTS = {2: 8192, 4: 2048}  # by the activations' element size
MAX_BLOCK_N = 64
# Fewer weight elements than this per program only add programs: at GPT-2's shapes every tile holds
# at least this many anyway (gpt2's 768 x 768 at 4 x 1024); narrow layers (test models, 64 wide)
# get wider column blocks instead of one program per column, which in the interpreter took minutes.
MIN_TILE_ELEMENTS = 4096
# Partials the greedy lm_head's last program reduces at a time: gpt2's 50257 columns in 8-row tiles
# leave 6283, 7 steps of 1024 (8 fp32 values a thread at 4 warps; only the winner's index is read).
ARGMAX_REDUCE = 1024


@triton.jit
def _gemv_kernel(
    x_ptr,      # (1, K) input
    ln_w_ptr,   # (K,) LayerNorm weight (read when NORM)
    ln_b_ptr,   # (K,) LayerNorm bias (read when NORM)
    w_ptr,      # (N, K) weight, any strides: x's dtype, or int8 (INT8_WEIGHT)
    s_ptr,      # (N,) fp32 per-column scales of an int8 weight (read when INT8_WEIGHT)
    b_ptr,      # (N,) bias (read when HAS_BIAS)
    r_ptr,      # (1, N) residual, last dim contiguous (read when HAS_RESIDUAL)
    y_ptr,      # (1, N) output; with KV_CACHE (1, N / 3), the query only
    kc_ptr,     # (1, H, L, D) key cache, unit D stride (written when KV_CACHE)
    vc_ptr,     # (1, H, L, D) value cache, the key cache's strides (written when KV_CACHE)
    lens_ptr,   # (1,) int32 cache length including the new token (read when KV_CACHE)
    part_ptr,   # (2, 1, programs) fp32 argmax partials (when ARGMAX)
    count_ptr,  # (1,) int32 zero: the programs' arrivals (when ARGMAX), left at zero
    tok_ptr,    # (1,) int64 greedy token out (when ARGMAX)
    N, K,
    stride_xk, stride_wn, stride_wk, stride_rm, stride_ym, stride_cb, stride_ch, stride_ct,
    head_dim, eps,
    NORM: tl.constexpr, INT8_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, KV_CACHE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ARGMAX: tl.constexpr, REDUCE: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # the next kernel may launch once every program got here, and prefetch its own weights
        gdc_launch_dependents()
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn[:, None] < N
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :] * stride_wk
    w_first = tl.load(w_ptrs, mask=n_ok & (rk[None, :] < K), other=0)  # widened after the wait, not before
    if USE_PDL:
        gdc_wait()  # the previous kernel has finished: its outputs (x, residual, lengths) are visible
    w_first = w_first.to(tl.float32)
    k_ok = rk < K
    x = tl.load(x_ptr + rk * stride_xk, mask=k_ok, other=0.0)
    if NORM:  # the whole row is in this tile (gemv_config): its statistics from the registers
        g = tl.load(ln_w_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
        beta = tl.load(ln_b_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
        centred, rstd = centre_and_scale(x.to(tl.float32), k_ok, K, eps)
        x = (centred * rstd * g + beta).to(x.dtype)  # rounded as a separate LayerNorm's output would be
    acc = tl.sum(w_first * x.to(tl.float32)[None, :], axis=1)
    for k0 in range(BLOCK_K, K, BLOCK_K):  # K beyond one tile (never with NORM; not at GPT-2's shapes)
        kk = k0 + rk
        w = tl.load(w_ptrs + k0 * stride_wk, mask=n_ok & (kk[None, :] < K), other=0).to(tl.float32)
        xk = tl.load(x_ptr + kk * stride_xk, mask=kk < K, other=0.0)
        acc += tl.sum(w * xk.to(tl.float32)[None, :], axis=1)
    rm = tl.arange(0, 1)
    out = linear_epilogue(acc[None, :], rm, rn, 1, N, s_ptr, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym, kc_ptr,
                          vc_ptr, lens_ptr, stride_cb, stride_ch, stride_ct, head_dim, INT8_WEIGHT, HAS_BIAS,
                          ACTIVATION, HAS_RESIDUAL, KV_CACHE)
    if ARGMAX:
        argmax_epilogue(out, rm, rn, 1, N, 0, tl.program_id(0), tl.num_programs(0), part_ptr, count_ptr, tok_ptr,
                        1, REDUCE)

def gemv_config(n: int, k: int, dtype: torch.dtype, sms: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for a (1, k) x (k, n) product with ``dtype`` activations on ``sms`` SMs.

    BLOCK_K: all of K (a power of two) up to the tile budget (``TILE_ELEMENTS``); BLOCK_N: the most
    rows, up to ``MAX_BLOCK_N``, that keep the tile within the budget and the grid at one program
    per SM or more (gpt2: 4-8 rows, 192-384 programs a layer GEMV; gpt2-xl: 1-4, 400-1600), and
    enough for ``MIN_TILE_ELEMENTS`` where the budget allows.
    """
    budget = TILE_ELEMENTS[dtype.itemsize]
    block_k = min(triton.next_power_of_2(k), budget)
    block_n = 1
    while (block_n * 2 <= MAX_BLOCK_N and block_n * 2 * block_k <= budget
           and (triton.cdiv(n, block_n * 2) >= sms or block_n * block_k < MIN_TILE_ELEMENTS)):
        block_n *= 2
    return block_n, block_k


def gemv_applies(m: int, k: int, dtype: torch.dtype, norm: bool) -> bool:
    """Whether the GEMV kernel takes an (m, k) input: ``GEMV_MAX_ROWS`` (one) row of 16-bit or fp32
    activations (fp64, the gradcheck path, stays on the tiled kernel), and, with a LayerNorm
    prologue, a row that fits one tile."""
    if not 1 <= m <= GEMV_MAX_ROWS or dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return not norm or triton.next_power_of_2(k) <= TILE_ELEMENTS[dtype.itemsize]


def gemv_launch(x2: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, activation: int,
                residual: Tensor | None, y2: Tensor, norm: tuple[Tensor, Tensor, float] | None,
                kv_cache: tuple[Tensor, Tensor, Tensor] | None, sms: int, tokens: Tensor | None = None) -> None:
    """Launch the GEMV for checked, allocated operands (``gpt2kernels.linear``'s launcher does both):
    x2 (1, K); weight (N, K) in x2's dtype or int8 with its fp32 ``scale`` (N,); bias (N,) or None;
    activation 0 (none) or 1 (tanh GELU); residual (1, N) or None; y2 the output, (1, N), or
    (1, N / 3) with ``kv_cache`` (k_cache, v_cache, cache_lens); norm (ln_weight, ln_bias, eps) or None;
    tokens: int64 (1,) to receive the output's argmax (``argmax_epilogue``), or None."""
    k = x2.shape[1]
    n = weight.shape[0]
    block_n, block_k = gemv_config(n, k, x2.dtype, sms)
    programs = triton.cdiv(n, block_n)
    argmax = tokens is not None
    if argmax:
        parts = torch.empty((2, 1, programs), dtype=torch.float32, device=x2.device)
        counts = arrival_counters(x2.device, 1)
    else:
        parts = counts = tokens = y2
    r2 = residual if residual is not None else y2
    ln_w, ln_b, eps = norm if norm is not None else (y2, y2, 0.0)
    kc, vc, lens = kv_cache if kv_cache is not None else (y2, y2, y2)
    cache_strides = (kc.stride(0), kc.stride(1), kc.stride(2), kc.shape[3]) if kv_cache is not None else (0, 0, 0, 1)
    pdl = use_pdl(x2.device)
    _gemv_kernel[(programs,)](
        x2, ln_w, ln_b, weight, scale, bias if bias is not None else y2, r2, y2, kc, vc, lens, parts, counts, tokens,
        n, k, x2.stride(1), weight.stride(0), weight.stride(1), r2.stride(0), y2.stride(0), *cache_strides,
        eps, NORM=norm is not None, INT8_WEIGHT=weight.dtype == torch.int8, HAS_BIAS=bias is not None,
        ACTIVATION=activation, HAS_RESIDUAL=residual is not None, KV_CACHE=kv_cache is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, ARGMAX=argmax, REDUCE=ARGMAX_REDUCE, USE_PDL=pdl,
        num_warps=8 if x2.dtype == torch.float32 else 4, num_stages=1, launch_pdl=pdl)
