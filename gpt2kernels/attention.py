"""Causal attention: flash-attention prefill and split-KV (flash-decoding) decode over a static cache.

    o = softmax(q k^T * scale + mask) v

Prefill (``flash_attention``): one program per (query block, batch*head) streams key/value blocks
through an online softmax in fp32 (running max and sum, rescaled accumulator), never writing the
score matrix. The causal mask is aligned bottom-right: with Tq < Tk, query i sees keys
``j <= i + Tk - Tq`` (a prompt continued on a cache).

Decode (``decode_attention``): each (batch*head) row's valid cache prefix is cut into num_splits
chunks (a count fixed by the cache's shape; the chunk size computed on the device from the row's
length); one program per chunk writes a partial (max, sum, accumulator), and the row's last chunk
to finish (an integer arrival counter) combines them in chunk order: one kernel, deterministic,
and batch 1 still fills the GPU. Keys at or past a row's length are never loaded.
The lengths are read on the device: no host sync, and the grid depends only on shapes.
References: FlashAttention-2 (Dao, 2023), the Triton fused-attention tutorial, flash-decoding.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._ops import (FLOAT_DTYPES, TRAIN_DTYPES, acc_dtype, arrival_counters, check_tensor, dot_precision, kernel_op,
                   sm_count, tl_acc, use_pdl)

# any D up to 128 works; these (one per block size and alignment) are compiled ahead of time
HEAD_DIMS = (32, 64, 80, 128)
MAX_HEAD_DIM = 128
MAX_DECODE_QUERIES = 16
LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """Fold one block of base-2 scores s (rows, keys) and values v (keys, D) into the running
    max m_i, sum l_i and accumulator acc (all fp32); returns the updated three."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# Prompt lengths change from call to call: compiling per length class (1, multiple of 16, other)
# would stall the first prompt of each class, and the lengths only bound loops and masks.
@triton.jit(do_not_specialize=["Tq", "Tk"])
def _flash_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, D), any strides but unit D stride
    o_ptr,                # (B, H, Tq, D) output, any strides but unit D stride
    lse_ptr,              # (B*H, Tq) ACC: each query's log2-sum-exp2 of its scaled scores, for the backward
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    H, Tq, Tk, D, qk_scale,  # qk_scale = scale * log2(e): the softmax runs in base 2
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,  # ACC: fp32; fp64 for fp64 inputs (gradcheck)
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rm = start_m + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rm[:, None] * stride_qt + rd[None, :],
                mask=(rm[:, None] < Tq) & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    offset = Tk - Tq  # bottom-right alignment of the causal mask
    end = tl.minimum(Tk, start_m + BLOCK_M + offset) if CAUSAL else Tk
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + rn
        kv_mask = (cols[:, None] < Tk) & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kt + rd[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = cols[None, :] < Tk
        if CAUSAL:
            visible = visible & (cols[None, :] <= rm[:, None] + offset)
        s = tl.where(visible, s, float("-inf"))
        v = tl.load(v_base + cols[:, None] * stride_vt + rd[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * stride_ob + h * stride_oh + rm[:, None] * stride_ot + rd[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(rm[:, None] < Tq) & d_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * Tq + rm, m_i + tl.log2(l_i), mask=rm < Tq)


@triton.jit
def _combine_splits(part_o_ptr, part_ml_ptr, base, num_splits, active, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the fp32 partials (max, sum, accumulator) of ``num_splits`` splits starting at partial
    ``base``, in split order; returns the normalised output (BLOCK_Q, BLOCK_D). ``active``
    (BLOCK_Q,) bool, all equal: unless set, reads nothing and the result is meaningless."""
    rq = tl.arange(0, BLOCK_Q)
    rd = tl.arange(0, BLOCK_D)
    m = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    for s in range(num_splits):  # .cg: read from L2, where the other programs' partials are
        m = tl.maximum(m, tl.load(part_ml_ptr + (base + s) * 2 * BLOCK_Q + rq, mask=active, other=0.0,
                                  cache_modifier=".cg"))
    denom = tl.zeros((BLOCK_Q,), dtype=tl.float32)  # the softmax's sum of exp
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for s in range(num_splits):
        m_s = tl.load(part_ml_ptr + (base + s) * 2 * BLOCK_Q + rq, mask=active, other=0.0, cache_modifier=".cg")
        w = tl.where(m_s == float("-inf"), 0.0, tl.exp2(m_s - m))  # an empty split weighs nothing
        denom += w * tl.load(part_ml_ptr + (base + s) * 2 * BLOCK_Q + BLOCK_Q + rq, mask=active, other=0.0,
                         cache_modifier=".cg")
        acc += w[:, None] * tl.load(part_o_ptr + (base + s) * BLOCK_Q * BLOCK_D + rq[:, None] * BLOCK_D + rd[None, :],
                                    mask=active[:, None], other=0.0, cache_modifier=".cg")
    return acc / tl.where(active, denom, 1.0)[:, None]  # inactive: no 0 / 0


# The cache length and the split count are fixed per cache, but differ between caches; as runtime
# values they never cause a compile (they only bound loops), so one variant serves every cache.
@triton.jit(do_not_specialize=["L", "num_splits"])
def _decode_attn_fwd_kernel(
    q_ptr,                # (B, H, Lq, D) the newest Lq tokens' queries
    k_ptr, v_ptr,         # (B, H, L, D) caches, unit D stride
    lens_ptr,             # (B,) int32 valid length per row, including the Lq new tokens
    o_ptr,                # (B, H, Lq, D) output, unit D stride
    part_o_ptr,           # (B*H, num_splits, BLOCK_Q, BLOCK_D) fp32 partial accumulators
    part_ml_ptr,          # (B*H, num_splits, 2, BLOCK_Q) fp32 partial running max and sum
    count_ptr,            # (B*H,) int32 zeros: splits arrived per row, left at zero
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, Lq, L, D, num_splits, qk_scale,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,  # num_splits > 1
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # launched early, behind the QKV projection: the next GEMV may start prefetching its
        gdc_launch_dependents()  # weights at once; everything here reads the step's writes, so
        gdc_wait()  # nothing loads before the wait (the lengths are advanced two kernels back)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    length = tl.minimum(tl.load(lens_ptr + b), L)  # never read past the cache, whatever lens says
    rq = tl.arange(0, BLOCK_Q)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rq[:, None] * stride_qt + rd[None, :],
                mask=(rq[:, None] < Lq) & d_ok[None, :], other=0.0)
    last_key = length - Lq + rq  # query i sees keys j <= last_key[i]
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    m_i = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    # Each row's own length is cut into whole BLOCK_N blocks per split, on the device: the grid and
    # the arguments stay the same at every step, and short rows leave the last splits empty.
    chunk = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + rn
        kv_mask = (cols[:, None] < hi) & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kt + rd[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where((cols[None, :] < hi) & (cols[None, :] <= last_key[:, None]), s, float("-inf"))
        v = tl.load(v_base + cols[:, None] * stride_vt + rd[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + rq[:, None] * stride_ot + rd[None, :]
    if not SPLIT:  # one program per row: no partials, no arrival count
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(rq[:, None] < Lq) & d_ok[None, :])
        return
    # No combine kernel: every split stores its partial and counts its arrival; the row's last
    # split to arrive merges all of them in split order (the same result whatever the order).
    base = bh.to(tl.int64) * num_splits
    part = base + split
    tl.store(part_o_ptr + part * BLOCK_Q * BLOCK_D + rq[:, None] * BLOCK_D + rd[None, :], acc)
    tl.store(part_ml_ptr + part * 2 * BLOCK_Q + rq, m_i)
    tl.store(part_ml_ptr + part * 2 * BLOCK_Q + BLOCK_Q + rq, l_i)
    tl.debug_barrier()  # every thread's partial is written before the release below
    arrived = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel", scope="gpu")
    # Branch-free, the others reading and storing nothing (an `if` here made ptxas spill on sm_90);
    # the flag is a vector because the interpreter takes no scalar mask.
    last = (rq * 0 + arrived) == num_splits - 1
    out = _combine_splits(part_o_ptr, part_ml_ptr, base, num_splits, last, BLOCK_Q, BLOCK_D)
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=last[:, None] & (rq[:, None] < Lq) & d_ok[None, :])
    tl.atomic_add(count_ptr + bh, tl.where(arrived == num_splits - 1, -num_splits, 0))  # the last re-arms it


def prefill_settings(d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the prefill kernel."""
    if dtype == torch.float32:
        # 8 warps: at 4, 32x32 tiles hit 255 registers and spill on sm_90 (Triton 3.6, D = 64);
        # above D = 64, 32-row tiles still spilled on sm_80 (gpt2kernels.aot under 3.6), 16 rows do not.
        return (32, 32, 8, 2) if d <= 64 else (16, 32, 8, 2)
    if d <= 64:
        return 128, 64, 8, 2
    # Above D = 64: 64x64 tiles spill on sm_80 at 4 warps, and at 8 under Triton 3.9; 64x32 at 8
    # warps and 2 stages spilled 8 bytes on sm_80 under 3.6 once the kernel also stored the
    # log-sum-exp for the backward; with 1 stage it spills under neither 3.6 nor 3.9 (gpt2kernels.aot).
    return 64, 32, 8, 1


def decode_settings(d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for the split-KV decode kernel."""
    if dtype == torch.float32:
        # Above D = 64, 32 keys a block at 8 warps spilled 8 bytes on sm_90 once one split wrote its
        # output directly (SPLIT off, with PDL; gpt2kernels.aot, Triton 3.9): 16 keys hold it.
        return (32, 4) if d <= 64 else (16, 8)
    # D <= 32 at 4 warps spilled on sm_90 (gpt2kernels.aot, Triton 3.9); 2 warps hold it in 80 registers.
    return (64, 2) if d <= 32 else (64, 4)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    check_tensor("q", q, ndim=4, dtypes=dtypes)
    check_tensor("k", k, ndim=4, dtype=q.dtype, device=q.device, dtypes=None)
    check_tensor("v", v, ndim=4, dtype=q.dtype, device=q.device, dtypes=None)
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D = {d} is not supported (1 <= D <= {MAX_HEAD_DIM})")


def _flash_attention_launch(q: Tensor, k: Tensor, v: Tensor, causal: bool,
                            scale: float | None) -> tuple[Tensor, Tensor]:
    _check_qkv(q, k, v, TRAIN_DTYPES)
    b, h, tq, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[-1] != d or v.shape != k.shape:
        raise ValueError(f"q has shape {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}: "
                         "expected k and v of shape (B, H, Tk, D) matching q's B, H and D")
    tk = k.shape[2]
    if causal and tq > tk:
        raise ValueError(f"causal attention needs Tq <= Tk (bottom-right mask), got Tq = {tq}, Tk = {tk}")
    # Laid out (B, Tq, H, D) so that the caller's transpose(1, 2).reshape(B, Tq, H * D) is free.
    o = torch.empty((b, tq, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((b, h, tq), dtype=acc_dtype(q.dtype), device=q.device)
    if o.numel() == 0:
        return o, lse
    if tk == 0:
        raise ValueError("k and v hold no keys (Tk = 0)")
    block_m, block_n, warps, stages = prefill_settings(d, q.dtype)
    scale = d ** -0.5 if scale is None else scale
    _flash_attn_fwd_kernel[(triton.cdiv(tq, block_m), b * h)](
        q, k, v, o, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        h, tq, tk, d, scale * LOG2E, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), DOT_PRECISION=dot_precision(q.dtype), ACC=tl_acc(q.dtype),
        num_warps=warps, num_stages=stages)
    return o, lse


@kernel_op("flash_attention")
def flash_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                             scale: float | None = None) -> tuple[Tensor, Tensor]:
    """``flash_attention``, also returning each query's log-sum-exp (what its backward, or a merge
    of attention over split key ranges, needs).

    Returns:
        (o, lse): o as ``flash_attention``'s; lse (B, H, Tq) fp32 (fp64 for fp64 inputs),
        ``log2(sum_j 2^(s_ij))`` of the base-2 scores ``s = q k^T * scale * log2(e)``, i.e. the
        natural log-sum-exp times log2(e). Not differentiable.
    """
    return _flash_attention_launch(q, k, v, causal, scale)


@flash_attention_with_lse.op.register_fake
def _(q, k, v, causal=True, scale=None):
    b, h, tq, d = q.shape
    return q.new_empty((b, tq, h, d)).transpose(1, 2), q.new_empty((b, h, tq), dtype=acc_dtype(q.dtype))


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None) -> Tensor:
    """Attention without materialising the score matrix; differentiable (FlashAttention-2's backward).

    Args:
        q: (B, H, Tq, D); k, v: (B, H, Tk, D). fp32/fp16/bf16 (fp64 for gradcheck), any strides with
            unit stride in D; D <= 128. With ``causal``, Tq <= Tk and the mask is aligned bottom-right.
        scale: default 1/sqrt(D).
    Returns:
        o: (B, H, Tq, D) in q's dtype, laid out as (B, Tq, H, D) in memory (so that
        ``o.transpose(1, 2).reshape(B, Tq, H * D)`` is a view). Softmax statistics in fp32.
    """
    return flash_attention_with_lse(q, k, v, causal, scale)[0]


flash_attention.op = flash_attention_with_lse.op



# Split counts measured on an H200 (benchmarks/sweep_decode_attention, decode_attention_splits.md: fp16,
# D 64, gpt2's and gpt2-xl's heads at batch 1 and 8, caches of 128-1024 positions, 1-32 splits).
# Up to 256 positions one program per row won everywhere (3.5 µs against 5.4 for 2 splits at 128);
# beyond, 4 splits of at least 128 keys were best or within 1 % (batch 1 at 1024: 8.7 µs against
# 15.6 with one, 9.4 with 8; gpt2-xl batch 8 at 1024: 21.9 against 27.4 with one). The combine's
# chain of dependent loads grows with the splits, so more do not pay at these lengths.
ONE_SPLIT_MAX_LEN = 256
MAX_DECODE_SPLITS = 4
MIN_KEYS_PER_SPLIT = 128
# Above this many programs (rows x splits) per SM, more splits only queue: batch 64 stays at one.
MAX_PROGRAMS_PER_SM = 8


def decode_splits(rows: int, max_len: int, sms: int) -> int:
    """How many splits each of ``rows`` = B*H rows is cut into, for a cache of ``max_len`` slots:
    one up to ``ONE_SPLIT_MAX_LEN`` positions (written without partials: the kernel's ``SPLIT``
    off), else up to ``MAX_DECODE_SPLITS`` (a power of two) of at least ``MIN_KEYS_PER_SPLIT``
    keys of a full cache, while the launch stays within ``MAX_PROGRAMS_PER_SM``. Depends on shapes
    only, never on the lengths' values, so it is fixed for a given cache.
    """
    splits = 1
    if max_len <= ONE_SPLIT_MAX_LEN:
        return splits
    while (splits < MAX_DECODE_SPLITS and triton.cdiv(max_len, splits * 2) >= MIN_KEYS_PER_SPLIT
           and rows * splits * 2 <= MAX_PROGRAMS_PER_SM * sms):
        splits *= 2
    return splits


def _decode_attention_launch(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor,
                             scale: float | None, check_lens: bool) -> Tensor:
    _check_qkv(q, k_cache, v_cache)
    b, h, lq, d = q.shape
    if k_cache.shape[:2] != (b, h) or k_cache.shape[-1] != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"q has shape {list(q.shape)}, k_cache {list(k_cache.shape)}, v_cache "
                         f"{list(v_cache.shape)}: expected caches (B, H, max_len, D) matching q's B, H and D")
    if not 1 <= lq <= MAX_DECODE_QUERIES:
        raise ValueError(f"decode takes 1 to {MAX_DECODE_QUERIES} queries per row, got q_len = {lq}")
    check_tensor("cache_lens", cache_lens, dtypes=(torch.int32,), shape=(b,), device=q.device)
    max_len = k_cache.shape[2]
    if check_lens:  # a host sync: the runtime's decode loop turns it off
        lo, hi = int(cache_lens.min()), int(cache_lens.max())
        if lo < lq or hi > max_len:
            raise ValueError(f"cache_lens must be in [q_len, max_len] = [{lq}, {max_len}], got values in [{lo}, {hi}]")
    o = torch.empty_like(q, memory_format=torch.contiguous_format) if q.is_contiguous() else \
        torch.empty((b, lq, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    splits = decode_splits(b * h, max_len, sm_count(q.device))
    block_q, block_d = MAX_DECODE_QUERIES, max(16, triton.next_power_of_2(d))
    part_o = torch.empty((b * h, splits, block_q, block_d), dtype=torch.float32, device=q.device)
    part_ml = torch.empty((b * h, splits, 2, block_q), dtype=torch.float32, device=q.device)
    scale = d ** -0.5 if scale is None else scale
    block_n, warps = decode_settings(d, q.dtype)
    pdl = use_pdl(q.device)
    _decode_attn_fwd_kernel[(b * h, splits)](
        q, k_cache, v_cache, cache_lens, o, part_o, part_ml, arrival_counters(q.device, b * h),
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o.stride(0), o.stride(1), o.stride(2),
        h, lq, max_len, d, splits, scale * LOG2E, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(q.dtype), SPLIT=splits > 1, USE_PDL=pdl, num_warps=warps, num_stages=2,
        launch_pdl=pdl)
    return o


@kernel_op("decode_attention",
           inference_only="train with gpt2kernels.flash_attention")
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, scale: float | None = None,
                     check_lens: bool = True) -> Tensor:
    """Attention of each row's newest Lq queries over its valid cache prefix (split-KV).

    Args:
        q: (B, H, Lq, D), 1 <= Lq <= 16, the new tokens' queries (their keys and values are
            already in the cache). fp32/fp16/bf16, unit stride in D.
        k_cache, v_cache: (B, H, max_len, D) in q's dtype, unit stride in D (the static cache).
        cache_lens: int32 (B,) valid length per row including the Lq new tokens. Query i of row b
            sees keys ``j < cache_lens[b] - (Lq - 1 - i)``; slots past it are never read.
        check_lens: verify ``q_len <= cache_lens <= max_len`` (costs a host sync; pass False inside
            a decode loop or a CUDA graph, where the kernel still clamps reads to max_len).
    Returns:
        (B, H, Lq, D) in q's dtype.
    """
    return _decode_attention_launch(q, k_cache, v_cache, cache_lens, scale, check_lens)


@decode_attention.op.register_fake
def _(q, k_cache, v_cache, cache_lens, scale=None, check_lens=True):
    if q.is_contiguous():
        return torch.empty_like(q)
    b, h, lq, d = q.shape
    return q.new_empty((b, lq, h, d)).transpose(1, 2)


def flash_attention_ref(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) v. q (B, H, Tq, D); k, v (B, H, Tk, D); returns (B, H, Tq, D).

    The causal mask is aligned bottom-right when Tq < Tk: the last query sees every key.
    """
    tq, tk = q.shape[-2], k.shape[-2]
    if not causal or tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    rows = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
    mask = torch.arange(tk, device=q.device)[None, :] <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def decode_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor,
                         scale: float | None = None, check_lens: bool = True) -> Tensor:
    """Attention of a few new queries over each row's valid cache prefix, in plain PyTorch.

    Same arguments as ``decode_attention``. Slots past each length must hold finite values here
    (the Triton kernel never reads them). Returns (B, H, Lq, D).
    """
    lq, slots, d = q.shape[-2], k_cache.shape[-2], q.shape[-1]
    last_visible = cache_lens.view(-1, 1, 1, 1).long() - (lq - torch.arange(lq, device=q.device)).view(1, 1, lq, 1)
    mask = torch.arange(slots, device=q.device).view(1, 1, 1, slots) <= last_visible
    # Explicit math rather than SDPA: with a handful of queries it is several times faster on CPU.
    scores = torch.matmul(q, k_cache.transpose(-1, -2)).float() * (scale if scale is not None else d ** -0.5)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(probs.to(v_cache.dtype), v_cache)


def aot_launches() -> None:
    """Call both launchers the way GPT-2 does (q, k, v as views of the fused QKV projection, every
    size, fp16/bf16/fp32, decode with 1, 3 and 16 queries, batch 1 and 8), and at the other head
    dims on contiguous tensors. For ``gpt2kernels.aot``, which records the launches without running them."""
    from .aot import GPT2_SIZES

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        layouts = [(b, h, c // h, True) for c, h in GPT2_SIZES for b in (1, 8)]
        layouts += [(2, 4, d, False) for d in HEAD_DIMS if d != 64]
        for b, h, d, fused in layouts:
            for t, max_len in ((40, 64), (97, 1024)):
                q, k, v = _aot_qkv(b, h, t, d, dtype, fused)
                for causal in (True, False):
                    _flash_attention_launch(q, k, v, causal=causal, scale=None)
                cache = torch.empty((2, b, h, max_len, d), dtype=dtype)
                lens = torch.full((b,), t, dtype=torch.int32)
                for lq in (1, 3, MAX_DECODE_QUERIES):
                    q_new = _aot_qkv(b, h, lq, d, dtype, fused)[0]
                    _decode_attention_launch(q_new, cache[0], cache[1], lens, None, check_lens=False)


def _aot_qkv(b: int, h: int, t: int, d: int, dtype: torch.dtype, fused: bool) -> tuple[Tensor, Tensor, Tensor]:
    if fused:  # the model's layout: (B, T, 3, H, D) viewed as three (B, H, T, D)
        return tuple(torch.empty((b, t, 3, h, d), dtype=dtype).permute(2, 0, 3, 1, 4))
    return tuple(torch.empty((b, h, t, d), dtype=dtype) for _ in range(3))
