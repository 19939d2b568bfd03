"""Linear layers with a fused prologue and epilogues: ``y = act(LayerNorm?(x) @ weight.T + bias) + residual``.

Two regimes, one kernel:
- decode (M <= 16 rows): 16-row tiles, narrow column blocks and split-K, so that even one row
  launches enough programs to stream the weight once at full bandwidth. With split-K each program
  writes an fp32 partial sum and counts its arrival; the last program of each output tile sums the
  partials in split order (deterministic: no float atomics) and runs the epilogue. One kernel.
- prefill (larger M): tensor-core tiles (fp16/bf16 in, fp32 accumulate) in grouped order for L2 reuse.
Prologue (optional): LayerNorm of x's rows, each program computing its rows' statistics itself, so
a LayerNorm costs no kernel of its own (``ln_linear``). Epilogue: bias, GPT-2's tanh GELU and the
residual in fp32 before the one rounding to the output dtype; or, for a decode step's fused QKV
projection, the key and value stored straight into the KV cache (``ln_qkv_append``).
fp32 inputs use IEEE fp32 dot products (the correctness path, not TF32).
``weight`` is (N, K), the nn.Linear layout, with any strides.
References: Triton tutorial 03-matrix-multiplication; split-K as in CUTLASS / gpt-fast's int4 GEMV;
the serial split-K fix-up (last arrival reduces) as in CUTLASS's and stream-K's semaphores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .layernorm import layer_norm_ref
from .quantize import dequantize_int8
from .sampling import greedy_ref
from .matmul import grouped_tile
from .epilogue import argmax_epilogue, linear_epilogue
from .gemv import gemv_applies, gemv_launch
from ._ops import (TRAIN_DTYPES, acc_dtype, arrival_counters, check_tensor, dot_precision, kernel_op,
                   sm_count, tl_acc, use_pdl)

ACTIVATIONS = (None, "gelu_tanh")
DECODE_MAX_ROWS = 16
PDL_MAX_ROWS = 64  # the largest decode graph bucket (engine.core.runner.GRAPH_BUCKETS)
# Argmax partials (rows x tiles) the last program of a row block reduces at a time: 16 rows x 64 tiles
# at decode sizes (13 steps over gpt2's 786 lm_head tiles). 2048 spilled on sm_80 (24 bytes, 16-row
# fp16 tiles; gpt2kernels.aot, Triton 3.9).
ARGMAX_PARTIALS = 1024


@triton.jit
def _row_stats(x_ptr, rm, M, K, stride_xm, stride_xk, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """LayerNorm's mean and 1/std (fp32, (BLOCK_M,)) of rows ``rm`` of x over K, in one pass:
    each K block's own mean and centred sum of squares, merged by Chan's formula (no
    E[x^2] - E[x]^2 cancellation, so a large mean costs no precision)."""
    rk = tl.arange(0, BLOCK_K)
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask = (rm[:, None] < M) & (kk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :] * stride_xk, mask=mask, other=0.0)
        x = x.to(tl.float32)
        n_b = tl.minimum(K - k0, BLOCK_K).to(tl.float32)
        mean_b = tl.sum(x, axis=1) / n_b
        centred = tl.where(mask, x - mean_b[:, None], 0.0)
        n = k0 + n_b
        delta = mean_b - mean
        mean += delta * (n_b / n)
        m2 += tl.sum(centred * centred, axis=1) + delta * delta * (k0 * n_b / n)
    return mean, 1.0 / tl.sqrt(m2 / K + eps)


# M is B*T in a prefill and changes with every prompt; its alignment buys nothing (it only masks
# rows), so only M == 1 gets its own variant, never M % 16 == 0. (One-row float products run
# gemv.py's kernel; M == 1 reaches this one in fp64 and in the GELU-gradient backward.)
@triton.jit(do_not_specialize_on_alignment=["M"])
def _linear_fwd_kernel(
    x_ptr,      # (M, K) input
    ln_w_ptr,   # (K,) LayerNorm weight (read when NORM)
    ln_b_ptr,   # (K,) LayerNorm bias (read when NORM)
    w_ptr,      # (N, K) weight, any strides: x's dtype, or int8 (INT8_WEIGHT)
    s_ptr,      # (N,) fp32 per-column scales of an int8 weight (read when INT8_WEIGHT)
    b_ptr,      # (N,) bias (read when HAS_BIAS)
    r_ptr,      # (M, N) residual, last dim contiguous (read when HAS_RESIDUAL)
    y_ptr,      # (M, N) output, contiguous rows; with KV_CACHE (M, N / 3), the query only
    kc_ptr,     # (M, H, L, D) key cache, unit D stride (written when KV_CACHE)
    vc_ptr,     # (M, H, L, D) value cache, the key cache's strides (written when KV_CACHE)
    lens_ptr,   # (M,) int32 cache lengths including the new token (read when KV_CACHE)
    ws_ptr,     # (SPLIT_K, M, N) fp32 partial sums (when SPLIT_K > 1)
    count_ptr,  # int32 zeros, left at zero: arrivals per output tile (tiles,) when SPLIT_K > 1, then with
                # ARGMAX per row block (cdiv(M, BLOCK_M),)
    part_ptr,   # (2, M, cdiv(N, BLOCK_N)) fp32 argmax partials (when ARGMAX)
    tok_ptr,    # (M,) int64 greedy tokens out (when ARGMAX)
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_ym, stride_cb, stride_ch, stride_ct,
    head_dim, eps,
    NORM: tl.constexpr, INT8_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, KV_CACHE: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, STATS_K: tl.constexpr,
    ACC: tl.constexpr,  # fp32; fp64 for fp64 inputs (gradcheck)
    ARGMAX: tl.constexpr, REDUCE: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # passed by decode-sized launches only (``pdl_kwargs``)
):
    if USE_PDL:  # the next kernel may launch now; this one reads nothing before the previous has finished
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if NORM:  # each program normalises its rows itself: no LayerNorm kernel, no normalised copy
        mean, rstd = _row_stats(x_ptr, rm, M, K, stride_xm, stride_xk, eps, BLOCK_M, STATS_K)
    k_span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K  # this split's share of K, whole blocks
    k0 = pid_k * k_span
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k0 + rk)[None, :] * stride_xk
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + (k0 + rk)[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, k_span, BLOCK_K):
        kk = k0 + k + rk
        a = tl.load(x_ptrs, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        if NORM:  # rounded to the input dtype, as a separate LayerNorm's output would be
            g = tl.load(ln_w_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            beta = tl.load(ln_b_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            a = ((a.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + beta[None, :]).to(a.dtype)
        b = tl.load(w_ptrs, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0)
        if INT8_WEIGHT:  # widened in registers: int8 is exact in fp16, bf16 and fp32; the scale comes after the dot
            b = b.to(x_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if SPLIT_K > 1:
        # No second kernel: every split stores its fp32 partial, and the tile's last split to arrive
        # (an integer counter) sums all of them in split order, so the result does not depend on
        # the arrival order, then runs the epilogue and re-arms the counter.
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        offs = rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(ws_ptr + pid_k.to(tl.int64) * M * N + offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        if tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            for s in range(SPLIT_K):  # .cg: from L2, where the other programs' partials are
                acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            out = linear_epilogue(acc, rm, rn, M, N, s_ptr, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym, kc_ptr, vc_ptr,
                                  lens_ptr, stride_cb, stride_ch, stride_ct, head_dim, INT8_WEIGHT, HAS_BIAS,
                                  ACTIVATION, HAS_RESIDUAL, KV_CACHE)
            tl.atomic_xchg(count_ptr + pid, 0)
            if ARGMAX:
                _greedy_tokens(out, rm, rn, M, N, pid_m, pid_n, part_ptr, count_ptr, tok_ptr, BLOCK_M, BLOCK_N, REDUCE)
    else:
        out = linear_epilogue(acc, rm, rn, M, N, s_ptr, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym, kc_ptr, vc_ptr,
                              lens_ptr, stride_cb, stride_ch, stride_ct, head_dim, INT8_WEIGHT, HAS_BIAS, ACTIVATION,
                              HAS_RESIDUAL, KV_CACHE)
        if ARGMAX:
            _greedy_tokens(out, rm, rn, M, N, pid_m, pid_n, part_ptr, count_ptr, tok_ptr, BLOCK_M, BLOCK_N, REDUCE)


@triton.jit
def _greedy_tokens(out, rm, rn, M, N, pid_m, pid_n, part_ptr, count_ptr, tok_ptr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, REDUCE: tl.constexpr):
    """``argmax_epilogue`` for one tile: its row block counts arrivals after the split-K counters."""
    split_counters = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    argmax_epilogue(out, rm, rn, M, N, pid_m * BLOCK_M, pid_n, tl.cdiv(N, BLOCK_N), part_ptr,
                    count_ptr + split_counters + pid_m,
                    tok_ptr, BLOCK_M, REDUCE)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    group_m: int = 8


# Decode launches aim at this many programs per SM: two resident programs keep one streaming its
# weight tile while the other waits on memory (DESIGN.md); fewer leave bandwidth unused at batch 1.
DECODE_PROGRAMS_PER_SM = 2
# At most this many K splits, and at least this many BLOCK_K blocks in each: more or shorter splits
# spend on writing and re-reading fp32 partials what they gain in parallelism.
MAX_SPLIT_K = 16
MIN_BLOCKS_PER_SPLIT = 2


# Decode tiles measured best on an H200 (fp16, M = 1 and 8; benchmarks/sweep_decode_gemv.py, results in
# benchmarks/results/nvidia-h200/decode_gemv_sweep.md), where they beat the rule below. gpt2's layers
# are small (1.2-4.7 MB of weights): fewer, longer programs with wide K blocks and no split-K won by
# 0.3-1 µs a kernel, 1.19x on the graphed gpt2 step. At gpt2-xl's shapes the rule's choice was best.
DECODE_TUNED = {  # (N, K) -> (BLOCK_N, BLOCK_K, num_warps, num_stages, split_k), 16-bit weights
    (3 * 768, 768): (32, 256, 4, 3, 1), (768, 768): (16, 256, 4, 4, 1), (4 * 768, 768): (32, 256, 4, 3, 1),
    (768, 4 * 768): (32, 128, 4, 4, 8), (50257, 768): (64, 128, 4, 4, 1),
}
# int8 weights at gpt2's shapes: the 16-bit tiles. The int8 sweep on an H200 (decode_gemv_sweep_int8.md,
# 16 tile sets, wider K blocks included) found no better ones for the whole step: its per-shape
# winners gave 1.007x on gpt2's graphed step and 0.95x on gpt2-xl's.
DECODE_TUNED_INT8 = dict(DECODE_TUNED)


# The LayerNorm prologue's statistics loop is a chain of dependent steps, one per block of K, before
# the first weight load: on an H200 each step cost ~0.25 µs (gpt2's graphed step gained 1.19x when
# BLOCK_K went 64 -> 256, 3x what its GEMVs alone gained), so it reads K in blocks of up to this many
# elements per tile (32 fp32 registers a thread at 4 warps): 7 steps instead of 25 at gpt2-xl's width.
STATS_TILE = 4096


def stats_block(cfg: GemmConfig, k: int) -> int:
    """Width of the K blocks the LayerNorm prologue reads: wide, as registers allow, never narrower than BLOCK_K."""
    return max(cfg.block_k, min(triton.next_power_of_2(k), STATS_TILE // cfg.block_m))


def _every_split_has_work(k_blocks: int, split: int) -> bool:
    """Whether cutting ``k_blocks`` into ``split`` shares of whole blocks leaves none empty."""
    return (split - 1) * triton.cdiv(k_blocks, split) < k_blocks


def decode_split_k(n: int, k: int, block_n: int, block_k: int, target: int) -> int:
    """K splits (a power of two) for a decode GEMV at these tiles: doubled until the programs reach
    ``target``, while every split keeps at least ``MIN_BLOCKS_PER_SPLIT`` blocks and none is empty."""
    tiles, split, k_blocks = triton.cdiv(n, block_n), 1, triton.cdiv(k, block_k)
    while (tiles * split < target and split < MAX_SPLIT_K and k_blocks >= MIN_BLOCKS_PER_SPLIT * split * 2
           and _every_split_has_work(k_blocks, split * 2)):
        split *= 2
    return split


def gemm_config(m: int, n: int, k: int, dtype: torch.dtype, sms: int, int8_weight: bool = False) -> GemmConfig:
    """Tile sizes for an (m, k) x (k, n) product, and split-K for decode-sized m on ``sms`` SMs.

    Decode (m <= 16): 16-row tiles (``tl.dot``'s minimum), BLOCK_K = 64 (one 128-byte line of an
    fp16 weight row per column; 128 for int8 weights with 16-bit activations, the same line), and
    the widest column block (64, 32, then 16) that, with K split into powers of two, reaches
    ``DECODE_PROGRAMS_PER_SM`` programs per SM (gpt2-xl's c_fc: 100 x 4 splits = 400 programs, its
    lm_head 786 x 1); shapes in ``DECODE_TUNED`` (``DECODE_TUNED_INT8`` for int8 weights) take the
    measured tiles.
    """
    wide = dtype.itemsize >= 4  # fp32 (and fp64) tiles take twice the registers and shared memory
    tuned = DECODE_TUNED_INT8 if int8_weight else DECODE_TUNED
    if m <= DECODE_MAX_ROWS and not wide and (n, k) in tuned:
        block_n, block_k, warps, stages, split = tuned[n, k]
        return GemmConfig(16, block_n, block_k, warps, stages, split)
    if m <= DECODE_MAX_ROWS:
        # int8 weights take a 128-byte line in 128 columns; with fp32 activations (the correctness path)
        # that spilled on sm_80 and sm_90 (gpt2kernels.aot, Triton 3.9: 255 registers), so 64 there.
        block_k, target = 128 if int8_weight and not wide else 64, DECODE_PROGRAMS_PER_SM * sms
        # fp32 (the correctness path) at BLOCK_N = 64 and M = 1 spilled on sm_90 (gpt2kernels.aot, Triton 3.9).
        for block_n in (32, 16) if wide else (64, 32, 16):
            split = decode_split_k(n, k, block_n, block_k, target)
            if triton.cdiv(n, block_n) * split >= target:
                break
        return GemmConfig(16, block_n, block_k, 4, 3 if wide else 4, split)
    if wide:
        # fp32 is the correctness path. Under Triton 3.6, 64x64x32 spills on sm_80 at 4 warps (128-164
        # registers) and, with the GELU epilogue, on sm_90 at 8; BLOCK_K = 16 at 8 warps holds 80 and none.
        return GemmConfig(64, 64, 16, 8, 2)
    if m <= 64:
        # int8 weights widened to bf16 spilled at 4 warps on sm_80 (168 registers; gpt2kernels.aot, Triton 3.9):
        # 8 warps halve each thread's share of the tile.
        return GemmConfig(64, 128, 64, 8 if int8_weight and dtype == torch.bfloat16 else 4, 4)
    return GemmConfig(128, 128, 64, 8, 3)


def pdl_kwargs(m: int, device: torch.device) -> dict:
    """The tiled kernel's launch options for programmatic dependent launch: decode-sized products
    (``PDL_MAX_ROWS`` rows or fewer: a decode step at every graph bucket) pass ``USE_PDL`` (on
    where the GPU has PDL, ``use_pdl``); larger ones (prefill, training) pass nothing and never
    use it. Unlike the batch-1 GEMV, the tile waits before its first load, weights included: it
    only lets the next kernel launch early (``gdc_launch_dependents``), so no input of any caller
    can be read before the kernel that wrote it has finished."""
    if m > PDL_MAX_ROWS:
        return {}
    pdl = use_pdl(device)
    return {"USE_PDL": pdl, "launch_pdl": pdl}


def tile_warps(cfg: GemmConfig, heavy_epilogue: bool) -> int:
    """Warps for a tile whose epilogue also stores a fused QKV projection's key and value into the
    cache or takes the greedy argmax (``heavy_epilogue``): the 64-row tiles of batches 32 and 64
    spilled at 4 warps (the argmax 8-200 bytes on sm_80 and sm_90, the cache store with the
    LayerNorm prologue 64-88 bytes on sm_80; gpt2kernels.aot, Triton 3.9); at 8, which halve each
    thread's share of the tile, none does. Other tiles keep their own."""
    return max(cfg.num_warps, 8) if heavy_epilogue and cfg.block_m > 16 else cfg.num_warps


def _check_linear(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
                  weight_scale: Tensor | None = None) -> None:
    check_tensor("x", x, last_dim_contiguous=False, dtypes=TRAIN_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dim (..., K)")
    int8_weight = isinstance(weight, Tensor) and weight.dtype == torch.int8
    check_tensor("weight", weight, ndim=2, dtypes=None, dtype=None if int8_weight else x.dtype, device=x.device,
                 last_dim_contiguous=False)
    n, k = weight.shape
    if int8_weight:
        if weight_scale is None:
            raise ValueError("weight is int8 but weight_scale is None: an int8 weight needs its (N,) fp32 scales")
        check_tensor("weight_scale", weight_scale, shape=(n,), dtypes=(torch.float32,), device=x.device)
    elif weight_scale is not None:
        raise ValueError(f"weight_scale was given but weight has dtype {weight.dtype}: scales go with int8 weights")
    if x.shape[-1] != k:
        raise ValueError(f"x has shape {list(x.shape)} but weight has shape {list(weight.shape)}: "
                         f"x's last dim must equal weight's K = {k}")
    if bias is not None:
        check_tensor("bias", bias, shape=(n,), device=x.device, dtypes=TRAIN_DTYPES)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_norm(x: Tensor, ln_weight: Tensor, ln_bias: Tensor) -> None:
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_tensor(name, t, shape=(x.shape[-1],), device=x.device)


def _check_kv_cache(x: Tensor, weight: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be (B, C), one new token per row, got shape {list(x.shape)}")
    b, c = x.shape
    check_tensor("k_cache", k_cache, ndim=4, dtype=x.dtype, device=x.device)
    check_tensor("v_cache", v_cache, ndim=4, dtype=x.dtype, device=x.device)
    if weight.shape[0] != 3 * c:
        raise ValueError(f"weight has shape {list(weight.shape)}: the fused QKV projection needs N = 3 * C = {3 * c}")
    h, d = k_cache.shape[1], k_cache.shape[3]
    if k_cache.shape[0] != b or h * d != c:
        raise ValueError(f"k_cache has shape {list(k_cache.shape)}: expected (B, H, max_len, D) with B = {b} "
                         f"and H * D = C = {c}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(f"v_cache (shape {list(v_cache.shape)}, strides {v_cache.stride()}) must match k_cache "
                         f"(shape {list(k_cache.shape)}, strides {k_cache.stride()})")
    check_tensor("cache_lens", cache_lens, dtypes=(torch.int32,), shape=(b,), device=x.device)


def _linear_launch(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
                   residual: Tensor | None, norm: tuple[Tensor, Tensor, float] | None = None,
                   kv_cache: tuple[Tensor, Tensor, Tensor] | None = None, weight_scale: Tensor | None = None,
                   gelu_grad: bool = False, tokens: Tensor | None = None) -> Tensor:
    """The one launcher behind every linear op: checks, allocates, picks the tiles and launches.

    norm: (ln_weight, ln_bias, eps) to LayerNorm x's rows in the prologue. kv_cache: (k_cache,
    v_cache, cache_lens) to store columns [C, 3C) of a fused QKV projection into the caches; the
    output is then the query, (M, C). weight_scale: (N,) fp32 scales of an int8 weight.
    gelu_grad: the epilogue returns ``residual * gelu'(x @ weight.T + bias)`` (see ``linear_gelu_grad``).
    tokens: int64 (M,) to receive each output row's argmax (``ln_linear_argmax``).
    """
    _check_linear(x, weight, bias, activation, weight_scale)
    n, k = weight.shape
    out_shape = (*x.shape[:-1], n)
    if residual is not None:
        check_tensor("residual", residual, shape=out_shape, dtype=x.dtype, device=x.device, dtypes=None)
    if norm is not None:
        _check_norm(x, norm[0], norm[1])
    if kv_cache is not None:
        _check_kv_cache(x, weight, *kv_cache)
        out_shape = (x.shape[0], n // 3)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if tokens is not None:
        check_tensor("tokens", tokens, shape=(m,), dtypes=None, dtype=torch.int64, device=x.device)
        if n == 0:
            raise ValueError("weight has no rows (N = 0): there is no column to take the argmax of")
    y = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        if norm is not None or kv_cache is not None:
            raise ValueError("x has no columns (K = 0): there is nothing to normalise")
        return linear_ref(x, weight, bias, activation, residual, weight_scale)  # no product to compute
    y2 = y.view(m, -1)
    r2 = residual.reshape(m, n) if residual is not None else y2
    b = bias if bias is not None else y2
    ln_w, ln_b, eps = norm if norm is not None else (y2, y2, 0.0)
    kc, vc, lens = kv_cache if kv_cache is not None else (y2, y2, y2)
    int8_weight = weight.dtype == torch.int8
    scale = weight_scale if int8_weight else y2
    if not gelu_grad and gemv_applies(m, k, x.dtype, norm is not None):
        gemv_launch(x2, weight, scale, bias, int(activation == "gelu_tanh"),
                    residual.reshape(m, n) if residual is not None else None, y2, norm, kv_cache, sm_count(x.device),
                    tokens)
        return y
    cfg = gemm_config(m, n, k, x.dtype, sm_count(x.device), int8_weight)
    row_blocks, col_blocks = triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n)
    tiles = row_blocks * col_blocks
    ws = counts = parts = y2
    if cfg.split_k > 1:
        ws = torch.empty((cfg.split_k, m, n), dtype=acc_dtype(x.dtype), device=x.device)
        counts = arrival_counters(x.device, tiles)
    if tokens is not None:
        parts = torch.empty((2, m, col_blocks), dtype=torch.float32, device=x.device)
        counts = arrival_counters(x.device, tiles + row_blocks)  # the row blocks' counters after split-K's
    cache_strides = (kc.stride(0), kc.stride(1), kc.stride(2), kc.shape[3]) if kv_cache is not None else (0, 0, 0, 1)
    _linear_fwd_kernel[(tiles, cfg.split_k)](
        x2, ln_w, ln_b, weight, scale, b, r2, y2, kc, vc, lens, ws, counts, parts,
        tokens if tokens is not None else y2, m, n, k,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), r2.stride(0), y2.stride(0),
        *cache_strides, eps, NORM=norm is not None, INT8_WEIGHT=int8_weight, HAS_BIAS=bias is not None,
        ACTIVATION=2 if gelu_grad else int(activation == "gelu_tanh"), HAS_RESIDUAL=residual is not None,
        KV_CACHE=kv_cache is not None,
        SPLIT_K=cfg.split_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        STATS_K=stats_block(cfg, k) if norm is not None else cfg.block_k,
        DOT_PRECISION=dot_precision(x.dtype), ACC=tl_acc(x.dtype), ARGMAX=tokens is not None,
        REDUCE=ARGMAX_PARTIALS // cfg.block_m, num_warps=tile_warps(cfg, tokens is not None or kv_cache is not None),
        num_stages=cfg.num_stages, **({} if gelu_grad else pdl_kwargs(m, x.device)))
    return y


@kernel_op("linear")
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
           residual: Tensor | None = None, weight_scale: Tensor | None = None) -> Tensor:
    """``act(x @ weight.T + bias) + residual`` in one kernel (split-K partials are summed inside it).

    Args:
        x: (..., K), fp32/fp16/bf16, any strides.
        weight: (N, K) in x's dtype or int8 (the nn.Linear layout), any strides.
        bias: (N,) or None.
        activation: None or ``"gelu_tanh"`` (GPT-2's tanh approximation of GELU).
        residual: (..., N) in x's dtype, last dim contiguous, added after the activation; or None.
        weight_scale: (N,) fp32 per-output-channel scales when ``weight`` is int8 (``gpt2kernels.quantize_int8``),
            applied in the epilogue before the bias; None for a float weight.
    Returns:
        y: (..., N) in x's dtype. Accumulation and the whole epilogue are fp32; one final rounding.
    """
    return _linear_launch(x, weight, bias, activation, residual, weight_scale=weight_scale)


@linear.op.register_fake
def _(x, weight, bias=None, activation=None, residual=None, weight_scale=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@kernel_op("linear_gelu_grad")
def linear_gelu_grad(x: Tensor, weight: Tensor, bias: Tensor | None, grad_h: Tensor) -> Tensor:
    """The gradient reaching a GELU's input, with that input recomputed: ``grad_h * gelu'(x @ weight.T + bias)``
    in one kernel (the forward GEMM, its epilogue taking the derivative), so that the pre-activation
    is neither saved by the forward nor written by the backward.

    Args:
        x: (..., K) fp32/fp16/bf16/fp64; weight: (N, K) in x's dtype, any strides; bias: (N,) or None;
        grad_h: (..., N) in x's dtype, last dim contiguous: the gradient of ``gelu(x @ weight.T + bias)``.
    Returns:
        (..., N) in x's dtype.
    """
    return _linear_launch(x, weight, bias, None, grad_h, gelu_grad=True)


@linear_gelu_grad.op.register_fake
def _(x, weight, bias, grad_h):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@kernel_op("gelu_mlp")
def gelu_mlp(x: Tensor, fc_weight: Tensor, fc_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor,
             residual: Tensor | None = None, fc_scale: Tensor | None = None,
             proj_scale: Tensor | None = None) -> Tensor:
    """GPT-2's MLP ``proj(gelu_tanh(fc(x))) + residual`` as two fused linears.

    Args:
        x: (..., C); fc_weight: (F, C); fc_bias: (F,); proj_weight: (C, F); proj_bias: (C,);
        residual: (..., C) or None. All in x's dtype (fp32/fp16/bf16), or int8 weights with
        fc_scale: (F,) and proj_scale: (C,) fp32, their per-output-channel scales.
    Returns:
        (..., C) in x's dtype.
    """
    h = _linear_launch(x, fc_weight, fc_bias, "gelu_tanh", None, weight_scale=fc_scale)
    return _linear_launch(h, proj_weight, proj_bias, None, residual, weight_scale=proj_scale)


@gelu_mlp.op.register_fake
def _(x, fc_weight, fc_bias, proj_weight, proj_bias, residual=None, fc_scale=None, proj_scale=None):
    return x.new_empty((*x.shape[:-1], proj_weight.shape[0]))


@kernel_op("ln_linear",
           inference_only="train with gpt2kernels.layer_norm then gpt2kernels.linear")
def ln_linear(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor | None = None,
              activation: str | None = None, eps: float = 1e-5, weight_scale: Tensor | None = None) -> Tensor:
    """``act(LayerNorm(x) @ weight.T + bias)`` in one kernel: the LayerNorm runs in the GEMM's prologue.

    Each program computes the mean and 1/std of its rows in fp32 (the whole row, one pass) and
    normalises x's K blocks as it loads them, rounding them to x's dtype as a separate LayerNorm's
    output would be; the normalised activations are never written. Meant for decode-sized M (<= 16
    rows), where re-reading a row per program is cheap beside the weight; any M works.

    Args:
        x: (..., K), fp32/fp16/bf16, any strides.
        ln_weight, ln_bias: (K,), any float dtype, on x's device.
        weight: (N, K) in x's dtype or int8 (the nn.Linear layout), any strides.
        bias: (N,) or None.
        activation: None or ``"gelu_tanh"``.
        eps: added to the variance.
        weight_scale: (N,) fp32 per-output-channel scales when ``weight`` is int8 (``gpt2kernels.quantize_int8``),
            applied in the epilogue before the bias; None for a float weight.
    Returns:
        y: (..., N) in x's dtype.
    """
    return _linear_launch(x, weight, bias, activation, None, norm=(ln_weight, ln_bias, eps), weight_scale=weight_scale)


@ln_linear.op.register_fake
def _(x, ln_weight, ln_bias, weight, bias=None, activation=None, eps=1e-5, weight_scale=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@kernel_op("ln_linear_argmax", mutates_args=("tokens",),
           inference_only="it picks a decode step's greedy tokens; train with gpt2kernels.layer_norm then "
               "gpt2kernels.linear")
def ln_linear_argmax(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, tokens: Tensor,
                      bias: Tensor | None = None, eps: float = 1e-5, weight_scale: Tensor | None = None) -> Tensor:
    """A greedy decode step's lm_head in one kernel: ``ln_linear`` (no activation), and each row's
    greedy token written into ``tokens``, so that no sampler kernel runs after it.

    ``tokens[r]`` is the first column holding the maximum of row r of the returned logits (as
    rounded to x's dtype), or -1 where that row holds a NaN or only -inf: what ``gpt2kernels.sample``
    picks at temperature 0 (``gpt2kernels.greedy_ref``). Every program writes its columns' maximum;
    the last to finish (an integer arrival counter) reduces them in column order, so the tokens do
    not depend on the order the programs ran in.

    Args:
        x: (M, K), fp32/fp16/bf16, any strides; ln_weight, ln_bias: (K,).
        weight: (N, K), N >= 1, in x's dtype or int8 with ``weight_scale`` (N,) fp32.
        tokens: int64 (M,) on x's device, contiguous; overwritten.
        bias: (N,) or None; eps: LayerNorm's epsilon.
    Returns:
        logits: (M, N) in x's dtype, as ``ln_linear`` returns them.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (M, K), one row per token, got shape {list(x.shape)}")
    return _linear_launch(x, weight, bias, None, None, norm=(ln_weight, ln_bias, eps), weight_scale=weight_scale,
                          tokens=tokens)


@ln_linear_argmax.op.register_fake
def _(x, ln_weight, ln_bias, weight, tokens, bias=None, eps=1e-5, weight_scale=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


@kernel_op("ln_qkv_append", mutates_args=("k_cache", "v_cache"),
           inference_only="it writes a decode step's KV cache; train with gpt2kernels.layer_norm, "
               "gpt2kernels.linear and gpt2kernels.flash_attention")
def ln_qkv_append(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
                  k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, eps: float = 1e-5,
                  weight_scale: Tensor | None = None) -> Tensor:
    """A decode step's attention input in one kernel: LayerNorm, the fused QKV projection, and the
    new token's key and value stored straight into the cache (no separate cache write).

    ``qkv = LayerNorm(x) @ weight.T + bias``; columns [0, C) are the query (returned), [C, 2C) the
    key and [2C, 3C) the value, each laid out (H, D); row b's key and value are stored at position
    ``cache_lens[b] - 1`` of ``k_cache[b]`` and ``v_cache[b]``.

    Args:
        x: (B, C) fp32/fp16/bf16, one new token per row.
        ln_weight, ln_bias: (C,).
        weight: (3C, C) in x's dtype or int8; bias: (3C,).
        k_cache, v_cache: (B, H, max_len, D) with H * D = C, x's dtype, unit D stride, the same
            strides (views of the static cache); written at one position per row, nowhere else.
        cache_lens: int32 (B,) on x's device, each row's length including the new token (>= 1,
            <= max_len; not checked: reading it would cost a host sync).
        eps: LayerNorm's epsilon.
        weight_scale: (N,) fp32 per-output-channel scales when ``weight`` is int8 (``gpt2kernels.quantize_int8``),
            applied in the epilogue before the bias; None for a float weight.
    Returns:
        q: (B, C) in x's dtype, contiguous; ``q.view(B, 1, H, D).transpose(1, 2)`` is (B, H, 1, D).
    """
    return _linear_launch(x, weight, bias, None, None, norm=(ln_weight, ln_bias, eps),
                          kv_cache=(k_cache, v_cache, cache_lens), weight_scale=weight_scale)


@ln_qkv_append.op.register_fake
def _(x, ln_weight, ln_bias, weight, bias, k_cache, v_cache, cache_lens, eps=1e-5, weight_scale=None):
    return x.new_empty((x.shape[0], weight.shape[0] // 3))


def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
               residual: Tensor | None = None, weight_scale: Tensor | None = None) -> Tensor:
    """``act(x @ weight.T + bias) + residual`` in plain PyTorch, in the input dtype.

    x (..., K); weight (N, K) (nn.Linear layout); bias (N,); residual (..., N); returns (..., N).
    ``activation`` is None or ``"gelu_tanh"`` (GPT-2's tanh approximation). An int8 weight with its
    (N,) fp32 ``weight_scale`` is dequantised to x's dtype first (``dequantize_int8``).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if weight.dtype == torch.int8:
        weight = dequantize_int8(weight, weight_scale, x.dtype)
    y = F.linear(x, weight, bias)
    if activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        y = y + residual
    return y


def gelu_mlp_ref(x: Tensor, fc_weight: Tensor, fc_bias: Tensor, proj_weight: Tensor,
                 proj_bias: Tensor, residual: Tensor | None = None, fc_scale: Tensor | None = None,
                 proj_scale: Tensor | None = None) -> Tensor:
    """GPT-2's MLP ``proj(gelu_tanh(fc(x))) + residual``. x (..., C); fc_weight (F, C); proj_weight (C, F)."""
    h = linear_ref(x, fc_weight, fc_bias, activation="gelu_tanh", weight_scale=fc_scale)
    return linear_ref(h, proj_weight, proj_bias, residual=residual, weight_scale=proj_scale)


def ln_linear_ref(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor | None = None,
                  activation: str | None = None, eps: float = 1e-5, weight_scale: Tensor | None = None) -> Tensor:
    """``act(LayerNorm(x) @ weight.T + bias)`` in plain PyTorch: ``layer_norm_ref`` then ``linear_ref``."""
    return linear_ref(layer_norm_ref(x, ln_weight, ln_bias, eps), weight, bias, activation, weight_scale=weight_scale)


def ln_linear_argmax_ref(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, tokens: Tensor,
                         bias: Tensor | None = None, eps: float = 1e-5, weight_scale: Tensor | None = None) -> Tensor:
    """``ln_linear_argmax`` in plain PyTorch: ``ln_linear_ref``, then ``greedy_ref`` into ``tokens``."""
    y = ln_linear_ref(x, ln_weight, ln_bias, weight, bias, None, eps, weight_scale)
    tokens.copy_(greedy_ref(y))
    return y


def ln_qkv_append_ref(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, bias: Tensor,
                      k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, eps: float = 1e-5,
                      weight_scale: Tensor | None = None) -> Tensor:
    """``ln_qkv_append`` in plain PyTorch: LayerNorm, QKV projection, then the key and value
    written into the caches by device-side indexing (no host sync). Returns q (B, C)."""
    qkv = linear_ref(layer_norm_ref(x, ln_weight, ln_bias, eps), weight, bias, weight_scale=weight_scale)
    return qkv_append_ref(qkv, k_cache, v_cache, cache_lens)


def qkv_append_ref(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor) -> Tensor:
    """Split a decode step's fused projection qkv (B, 3C) into q, k, v; store row b's key and value
    at position ``cache_lens[b] - 1`` of the caches (B, H, max_len, D) by device-side indexing; return q (B, C)."""
    b, c = qkv.shape[0], qkv.shape[1] // 3
    h, d = k_cache.shape[1], k_cache.shape[3]
    q, k, v = qkv.split(c, dim=-1)
    rows, pos = torch.arange(b, device=qkv.device), cache_lens.long() - 1
    k_cache[rows, :, pos] = k.reshape(b, h, d).to(k_cache.dtype)
    v_cache[rows, :, pos] = v.reshape(b, h, d).to(v_cache.dtype)
    return q


# Row counts covering every config gemm_config and gemv_config pick and every way the JIT specialises
# M: one row (the GEMV), the tiled kernel's decode tiles (5: 2 to 16 rows), prefill up to 64 rows (40)
# and beyond (512).
AOT_ROWS = (1, 5, 40, 512)
AOT_DECODE_ROWS = (1, 5, 40)  # the fused decode ops: the GEMV, the decode tiles, and batches 32 and 64's tiles


def aot_launches() -> None:
    """Call the launcher for GPT-2's linears at every size: c_attn (bias), attention c_proj (bias,
    and bias + residual as the fused API offers it), c_fc (bias + GELU), MLP c_proj (bias, bias +
    residual) and lm_head (no bias, N = 50257), fp16/bf16/fp32, at ``AOT_ROWS`` rows; and the fused
    decode ops (``ln_qkv_append``, ``ln_linear`` for c_fc and lm_head, ``ln_linear_argmax``) at
    ``AOT_DECODE_ROWS``.
    For ``gpt2kernels.aot``, which records the launches without running them."""
    from .aot import GPT2_SIZES, GPT2_VOCAB

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for c, _ in GPT2_SIZES:
            layers = [(3 * c, c, (None,), False), (c, c, (None,), True), (4 * c, c, ("gelu_tanh",), False),
                      (c, 4 * c, (None,), True), (GPT2_VOCAB, c, (None,), False)]
            for n, k, activations, with_residual in layers:
                w = torch.empty((n, k), dtype=dtype)
                bias = torch.empty(n, dtype=dtype) if n != GPT2_VOCAB else None
                for m in AOT_ROWS:
                    x = torch.empty((m, k), dtype=dtype)
                    for activation in activations:
                        _linear_launch(x, w, bias, activation, None)
                    if with_residual:
                        _linear_launch(x, w, bias, None, torch.empty((m, n), dtype=dtype))
            # The fused decode ops: LayerNorm + QKV + cache write, LayerNorm + c_fc + GELU, ln_f + lm_head.
            ln = (torch.empty(c, dtype=dtype), torch.empty(c, dtype=dtype), 1e-5)
            for m in AOT_DECODE_ROWS:
                x = torch.empty((m, c), dtype=dtype)
                cache = torch.empty((2, m, c // 64, 1024, 64), dtype=dtype)
                _linear_launch(x, torch.empty((3 * c, c), dtype=dtype), torch.empty(3 * c, dtype=dtype), None, None,
                               norm=ln, kv_cache=(cache[0], cache[1], torch.ones(m, dtype=torch.int32)))
                _linear_launch(x, torch.empty((4 * c, c), dtype=dtype), torch.empty(4 * c, dtype=dtype), "gelu_tanh",
                               None, norm=ln)
                _linear_launch(x, torch.empty((GPT2_VOCAB, c), dtype=dtype), None, None, None, norm=ln)
                _linear_launch(x, torch.empty((GPT2_VOCAB, c), dtype=dtype), None, None, None, norm=ln,
                               tokens=torch.empty(m, dtype=torch.int64))  # a greedy step's
            for m in (40, 8192):  # the training backward's GELU gradient (linear_gelu_grad), both weight layouts
                for w in (torch.empty((4 * c, c), dtype=dtype), torch.empty((c, 4 * c), dtype=dtype).t()):
                    _linear_launch(torch.empty((m, c), dtype=dtype), w, torch.empty(4 * c, dtype=dtype), None,
                                   torch.empty((m, 4 * c), dtype=dtype), gelu_grad=True)
    _int8_aot_launches()


def _int8_aot_launches() -> None:
    """int8 weights as a quantised model runs them: the prefill linears (bias, GELU after c_fc, no
    residual) at ``AOT_ROWS``; at ``AOT_DECODE_ROWS`` the fused decode ops (the greedy lm_head
    too), the two c_proj with their residual and the prefill's lm_head on each row's last position.
    fp16/bf16 activations at every size; fp32 (the correctness path) at gpt2's width only, to keep
    the report's time down."""
    from .aot import GPT2_SIZES, GPT2_VOCAB

    def int8(n, k):
        return torch.empty((n, k), dtype=torch.int8), torch.empty(n, dtype=torch.float32)

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for c, _ in GPT2_SIZES if dtype != torch.float32 else GPT2_SIZES[:1]:
            ln = (torch.empty(c, dtype=dtype), torch.empty(c, dtype=dtype), 1e-5)
            for n, k, activation in ((3 * c, c, None), (c, c, None), (4 * c, c, "gelu_tanh"), (c, 4 * c, None),
                                     (GPT2_VOCAB, c, None)):
                w, s = int8(n, k)
                bias = torch.empty(n, dtype=dtype) if n != GPT2_VOCAB else None
                for m in AOT_ROWS:  # a short prompt's prefill takes the decode tiles
                    _linear_launch(torch.empty((m, k), dtype=dtype), w, bias, activation, None, weight_scale=s)
                for m in AOT_DECODE_ROWS:
                    x = torch.empty((m, k), dtype=dtype)
                    if n == 3 * c:
                        cache = torch.empty((2, m, c // 64, 1024, 64), dtype=dtype)
                        _linear_launch(x, w, bias, None, None, norm=ln, weight_scale=s,
                                       kv_cache=(cache[0], cache[1], torch.ones(m, dtype=torch.int32)))
                    elif k == c and n != c:  # c_fc + GELU, lm_head: LayerNorm in the prologue
                        _linear_launch(x, w, bias, activation, None, norm=ln, weight_scale=s)
                    else:  # both c_proj: the residual in the epilogue
                        _linear_launch(x, w, bias, None, torch.empty((m, n), dtype=dtype), weight_scale=s)
                    if n == GPT2_VOCAB:  # a prefill's lm_head on each row's last position; a greedy step's
                        _linear_launch(x, w, None, None, None, weight_scale=s)
                        _linear_launch(x, w, None, None, None, norm=ln, weight_scale=s,
                                       tokens=torch.empty(m, dtype=torch.int64))
