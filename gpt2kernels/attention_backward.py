"""FlashAttention-2's backward for ``flash_attention``, registered as its op's autograd.

The forward saves only each query's log-sum-exp (base 2, fp32) beside q, k, v and o; the backward
recomputes the probabilities block by block from it, never holding the (Tq, Tk) matrix:

    delta_i = sum_d o_id * do_id                              (one small kernel)
    p_ij = 2^(s_ij - lse_i),  dp = do v^T,  ds = p * (dp - delta)
    dv = p^T do,  dk = scale * ds^T q                         (a program per key block, over the queries)
    dq = scale * ds k                                         (a program per query block, over the keys)

Two passes over the blocks instead of atomics on dq: every gradient is written by exactly one
program, in a fixed order (deterministic). The causal mask is aligned bottom-right as in the forward,
and each program skips the blocks the mask hides entirely.
References: FlashAttention-2 (Dao, 2023), §3.1.2; the Triton fused-attention tutorial (06).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .attention import HEAD_DIMS, LOG2E, flash_attention_with_lse
from ._ops import acc_dtype, dot_precision, kernel_op, tl_acc


@triton.jit(do_not_specialize=["Tq"])
def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt,
                           H, Tq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    mask = (rm[:, None] < Tq) & (rd[None, :] < D)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + rm[:, None] * stride_ot + rd[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + b * stride_db + h * stride_dh + rm[:, None] * stride_dt + rd[None, :], mask=mask, other=0.0)
    tl.store(delta_ptr + bh.to(tl.int64) * Tq + rm, tl.sum(o.to(ACC) * do.to(ACC), axis=1), mask=rm < Tq)


@triton.jit(do_not_specialize=["Tq", "Tk"])
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # (B, H, T, D), unit D stride, any other strides
    lse_ptr, delta_ptr,           # (B*H, Tq) ACC
    dk_ptr, dv_ptr,               # (B, H, Tk, D), k's and v's strides
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_db, stride_dh, stride_dt, stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    H, Tq, Tk, D, scale, qk_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rn = start_n + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    kv_mask = (rn[:, None] < Tk) & d_ok[None, :]
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + rn[:, None] * stride_kt + rd[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + rn[:, None] * stride_vt + rd[None, :], mask=kv_mask, other=0.0)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_db + h * stride_dh
    stats = bh.to(tl.int64) * Tq
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    offset = Tk - Tq
    # Query i sees key j when j <= i + offset: the first block with a query seeing this key block.
    lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M if CAUSAL else 0
    for start_m in range(lo, Tq, BLOCK_M):
        qm = start_m + rm
        q_mask = (qm[:, None] < Tq) & d_ok[None, :]
        q = tl.load(q_base + qm[:, None] * stride_qt + rd[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + qm[:, None] * stride_dt + rd[None, :], mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + stats + qm, mask=qm < Tq, other=0.0)
        delta = tl.load(delta_ptr + stats + qm, mask=qm < Tq, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        visible = (rn[:, None] < Tk) & (qm[None, :] < Tq)
        if CAUSAL:
            visible = visible & (rn[:, None] <= qm[None, :] + offset)
        p_t = tl.where(visible, tl.exp2(s_t - lse[None, :]), 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    tl.store(dk_ptr + b * stride_dkb + h * stride_dkh + rn[:, None] * stride_dkt + rd[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + b * stride_dvb + h * stride_dvh + rn[:, None] * stride_dvt + rd[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["Tq", "Tk"])
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,
    dq_ptr,  # (B, H, Tq, D), q's strides
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_db, stride_dh, stride_dt, stride_dqb, stride_dqh, stride_dqt,
    H, Tq, Tk, D, scale, qk_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rm = start_m + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    q_mask = (rm[:, None] < Tq) & d_ok[None, :]
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rm[:, None] * stride_qt + rd[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_ptr + b * stride_db + h * stride_dh + rm[:, None] * stride_dt + rd[None, :], mask=q_mask,
                 other=0.0)
    stats = bh.to(tl.int64) * Tq
    lse = tl.load(lse_ptr + stats + rm, mask=rm < Tq, other=0.0)
    delta = tl.load(delta_ptr + stats + rm, mask=rm < Tq, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    offset = Tk - Tq
    end = tl.minimum(Tk, start_m + BLOCK_M + offset) if CAUSAL else Tk
    for start_n in range(0, end, BLOCK_N):
        kn = start_n + rn
        kv_mask = (kn[:, None] < Tk) & d_ok[None, :]
        k = tl.load(k_base + kn[:, None] * stride_kt + rd[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + kn[:, None] * stride_vt + rd[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = (kn[None, :] < Tk) & (rm[:, None] < Tq)
        if CAUSAL:
            visible = visible & (kn[None, :] <= rm[:, None] + offset)
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + rm[:, None] * stride_dqt + rd[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


def backward_settings(d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of both backward kernels: the dk/dv kernel's
    programs own BLOCK_N keys and stream BLOCK_M queries, the dq kernel's the other way round."""
    if dtype.itemsize >= 4:
        return (16, 32, 8, 1) if d <= 64 else (16, 16, 8, 1)
    if d <= 64:
        return 32, 64, 4, 2
    return 32, 32, 8, 2


@kernel_op("flash_attention_backward")
def flash_attention_backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, grad_o: Tensor,
                             causal: bool, scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of ``flash_attention``, from its inputs, its output o and its lse
    (``flash_attention_with_lse``). Shapes and dtypes as q, k, v, contiguous; grad_o: o's shape, any strides."""
    return _launch(q, k, v, o, lse, grad_o, causal, scale)


def _launch(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, grad_o: Tensor, causal: bool,
            scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    b, h, tq, d = q.shape
    tk = k.shape[2]
    do = grad_o if grad_o.stride(-1) == 1 else grad_o.contiguous()
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    if dq.numel() == 0 or tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    scale = d ** -0.5 if scale is None else scale
    block_m, block_n, warps, stages = backward_settings(d, q.dtype)
    block_d = max(16, triton.next_power_of_2(d))
    acc = tl_acc(q.dtype)
    delta = torch.empty((b * h, tq), dtype=acc_dtype(q.dtype), device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(tq, 64), b * h)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        h, tq, d, BLOCK_M=64, BLOCK_D=block_d, ACC=acc, num_warps=4)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    common = dict(CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                  DOT_PRECISION=dot_precision(q.dtype), ACC=acc, num_warps=warps, num_stages=stages)
    _attn_bwd_dkdv_kernel[(triton.cdiv(tk, block_n), b * h)](
        q, k, v, do, lse, delta, dk, dv, *strides, *dk.stride()[:3], *dv.stride()[:3],
        h, tq, tk, d, scale, scale * LOG2E, **common)
    # The dq kernel owns BLOCK_N queries per program (its tile's long side), streaming BLOCK_M keys.
    _attn_bwd_dq_kernel[(triton.cdiv(tq, block_n), b * h)](
        q, k, v, do, lse, delta, dq, *strides, *dq.stride()[:3],
        h, tq, tk, d, scale, scale * LOG2E, **{**common, "BLOCK_M": block_n, "BLOCK_N": block_m})
    return dq, dk, dv


@flash_attention_backward.op.register_fake
def _(q, k, v, o, lse, grad_o, causal, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    ctx.causal, ctx.scale = causal, scale
    ctx.save_for_backward(q, k, v, *output)


def _grads(ctx, grad_o, _grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    return (*flash_attention_backward(q, k, v, o, lse, grad_o, ctx.causal, ctx.scale), None, None)


flash_attention_with_lse.op.register_autograd(_grads, setup_context=_setup)


def aot_launches() -> None:
    """The backward at the shapes ``attention.aot_launches`` runs the forward (q, k, v as views of a
    fused QKV projection at head dim 64, contiguous at the other head dims), causal and not,
    fp16/bf16/fp32. For ``gpt2kernels.aot``, which records the launches without running them."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        layouts = [(2, 12, 64, True)] + [(2, 4, d, False) for d in HEAD_DIMS if d != 64]
        for b, h, d, fused in layouts:
            for t in (40, 1024):
                if fused:
                    q, k, v = torch.empty((b, t, 3, h, d), dtype=dtype).permute(2, 0, 3, 1, 4)
                else:
                    q, k, v = (torch.empty((b, h, t, d), dtype=dtype) for _ in range(3))
                o = torch.empty((b, t, h, d), dtype=dtype).transpose(1, 2)
                lse = torch.empty((b, h, t), dtype=torch.float32)
                for causal in (True, False):
                    _launch(q, k, v, o, lse, torch.empty_like(o), causal, None)
