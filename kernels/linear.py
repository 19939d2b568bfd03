"""Linear layers with fused epilogues: ``y = act(x @ weight.T + bias) + residual``.

Two regimes, one kernel:
- decode (M <= 16 rows): 16-row tiles, narrow column blocks and split-K, so that even one row
  launches enough programs to stream the weight once at full bandwidth. With split-K each program
  writes an fp32 partial sum and a second small kernel reduces them and runs the epilogue.
- prefill (larger M): tensor-core tiles (fp16/bf16 in, fp32 accumulate) in grouped order for L2 reuse.
The epilogue adds the bias, applies GPT-2's tanh GELU and adds the residual in fp32 before the one
rounding to the output dtype. fp32 inputs use IEEE fp32 dot products (the correctness path, not TF32).
``weight`` is (N, K), the nn.Linear layout, with any strides.
Reference: Triton tutorial 03-matrix-multiplication; split-K as in CUTLASS / gpt-fast's int4 GEMV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._ops import NS, check_tensor, dot_precision, sm_count

ACTIVATIONS = (None, "gelu_tanh")
DECODE_MAX_ROWS = 16


@triton.jit
def _gelu_tanh(z):
    # tanh(u) = 2 * sigmoid(2u) - 1: libdevice.tanh fails in the interpreter, and this compiles to fast code.
    # so 0.5 * z * (1 + tanh(u)) = z * sigmoid(2u), with u = sqrt(2/pi) * (z + 0.044715 z^3).
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    return z * tl.sigmoid(2.0 * u)


@triton.jit
def _epilogue(acc, rm, rn, M, N, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym,
              HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """bias, activation, residual in fp32, then one rounding and a masked store of the tile."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:
        acc = _gelu_tanh(acc)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    rows = rm[:, None].to(tl.int64)
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + rows * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


# M is B*T in a prefill and changes with every prompt; its alignment buys nothing (it only masks
# rows), so only M == 1 (the batch-1 GEMV) gets its own variant, never M % 16 == 0.
@triton.jit(do_not_specialize_on_alignment=["M"])
def _linear_fwd_kernel(
    x_ptr,   # (M, K) input
    w_ptr,   # (N, K) weight, any strides
    b_ptr,   # (N,) bias (read when HAS_BIAS)
    r_ptr,   # (M, N) residual, last dim contiguous (read when HAS_RESIDUAL)
    y_ptr,   # (M, N) output, contiguous rows (written when SPLIT_K == 1)
    ws_ptr,  # (SPLIT_K, M, N) fp32 partial sums (written when SPLIT_K > 1)
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_ym,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row-tiles sweep the same weight columns while they are still in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K  # this split's share of K, whole blocks
    k0 = pid_k * k_span
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k0 + rk)[None, :] * stride_xk
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + (k0 + rk)[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_span, BLOCK_K):
        kk = k0 + k + rk
        a = tl.load(x_ptrs, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(w_ptrs, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if SPLIT_K == 1:
        _epilogue(acc, rm, rn, M, N, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym, HAS_BIAS, ACTIVATION, HAS_RESIDUAL)
    else:
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        offs = pid_k.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(ws_ptr + offs, acc, mask=mask)


@triton.jit(do_not_specialize_on_alignment=["M"])
def _splitk_reduce_kernel(
    ws_ptr,  # (SPLIT_K, M, N) fp32 partial sums
    b_ptr, r_ptr, y_ptr,  # as in _linear_fwd_kernel
    M, N, stride_rm, stride_ym,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    _epilogue(acc, rm, rn, M, N, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym, HAS_BIAS, ACTIVATION, HAS_RESIDUAL)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    group_m: int = 8


REDUCE_BLOCK = (16, 128, 4)  # (BLOCK_M, BLOCK_N, num_warps) of the split-K reduction



def gemm_config(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> GemmConfig:
    """Tile sizes for an (m, k) x (k, n) product, and split-K for decode-sized m on ``sms`` SMs."""
    wide = dtype == torch.float32  # fp32 tiles take twice the registers and shared memory
    if m <= DECODE_MAX_ROWS:
        cfg = GemmConfig(16, 64, 64 if wide else 128, 4, 3 if wide else 4)
        tiles, k_blocks = triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k)
        split, target = 1, 4 * sms  # a few programs per SM keep enough loads in flight
        while tiles * split * 2 <= target and k_blocks >= 4 * split * 2 and split < 16:
            split *= 2
        return GemmConfig(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, split)
    if wide:
        # fp32 is the correctness path. Under Triton 3.6, 64x64x32 spills on sm_80 at 4 warps (128-164
        # registers) and, with the GELU epilogue, on sm_90 at 8; BLOCK_K = 16 at 8 warps holds 80 and none.
        return GemmConfig(64, 64, 16, 8, 2)
    if m <= 64:
        return GemmConfig(64, 128, 64, 4, 4)
    return GemmConfig(128, 128, 64, 8, 3)


def _linear_launch(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
                   residual: Tensor | None) -> Tensor:
    check_tensor("x", x, last_dim_contiguous=False)
    if x.dim() < 1:
        raise ValueError("x must have at least one dim (..., K)")
    check_tensor("weight", weight, ndim=2, dtype=x.dtype, device=x.device, last_dim_contiguous=False)
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has shape {list(x.shape)} but weight has shape {list(weight.shape)}: "
                         f"x's last dim must equal weight's K = {k}")
    if bias is not None:
        check_tensor("bias", bias, shape=(n,), device=x.device)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    out_shape = (*x.shape[:-1], n)
    if residual is not None:
        check_tensor("residual", residual, shape=out_shape, dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return linear_ref(x, weight, bias, activation, residual)  # no product to compute
    y2 = y.view(m, n)
    r2 = residual.reshape(m, n) if residual is not None else y2
    b = bias if bias is not None else y2
    cfg = gemm_config(m, n, k, x.dtype, sm_count(x.device))
    ws = torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=x.device) if cfg.split_k > 1 else y2
    flags = dict(HAS_BIAS=bias is not None, ACTIVATION=int(activation == "gelu_tanh"), HAS_RESIDUAL=residual is not None)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    _linear_fwd_kernel[grid](
        x2, weight, b, r2, y2, ws, m, n, k, x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        r2.stride(0), y2.stride(0), **flags, SPLIT_K=cfg.split_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.split_k > 1:
        bm, bn, warps = REDUCE_BLOCK
        _splitk_reduce_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            ws, b, r2, y2, m, n, r2.stride(0), y2.stride(0), **flags, SPLIT_K=cfg.split_k,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return y



@torch.library.custom_op(f"{NS}::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
           residual: Tensor | None = None) -> Tensor:
    """``act(x @ weight.T + bias) + residual`` in one kernel (two with split-K).

    Args:
        x: (..., K), fp32/fp16/bf16, any strides.
        weight: (N, K) in x's dtype (the nn.Linear layout), any strides.
        bias: (N,) or None.
        activation: None or ``"gelu_tanh"`` (GPT-2's tanh approximation of GELU).
        residual: (..., N) in x's dtype, last dim contiguous, added after the activation; or None.
    Returns:
        y: (..., N) in x's dtype. Accumulation and the whole epilogue are fp32; one final rounding.
    """
    return _linear_launch(x, weight, bias, activation, residual)


@linear.register_fake
def _(x, weight, bias=None, activation=None, residual=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op(f"{NS}::gelu_mlp", mutates_args=())
def gelu_mlp(x: Tensor, fc_weight: Tensor, fc_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor,
             residual: Tensor | None = None) -> Tensor:
    """GPT-2's MLP ``proj(gelu_tanh(fc(x))) + residual`` as two fused linears.

    Args:
        x: (..., C); fc_weight: (F, C); fc_bias: (F,); proj_weight: (C, F); proj_bias: (C,);
        residual: (..., C) or None. All in x's dtype (fp32/fp16/bf16).
    Returns:
        (..., C) in x's dtype.
    """
    h = _linear_launch(x, fc_weight, fc_bias, "gelu_tanh", None)
    return _linear_launch(h, proj_weight, proj_bias, None, residual)


@gelu_mlp.register_fake
def _(x, fc_weight, fc_bias, proj_weight, proj_bias, residual=None):
    return x.new_empty((*x.shape[:-1], proj_weight.shape[0]))


def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
               residual: Tensor | None = None) -> Tensor:
    """``act(x @ weight.T + bias) + residual`` in plain PyTorch, in the input dtype.

    x (..., K); weight (N, K) (nn.Linear layout); bias (N,); residual (..., N); returns (..., N).
    ``activation`` is None or ``"gelu_tanh"`` (GPT-2's tanh approximation).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    y = F.linear(x, weight, bias)
    if activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        y = y + residual
    return y


def gelu_mlp_ref(x: Tensor, fc_weight: Tensor, fc_bias: Tensor, proj_weight: Tensor,
                 proj_bias: Tensor, residual: Tensor | None = None) -> Tensor:
    """GPT-2's MLP ``proj(gelu_tanh(fc(x))) + residual``. x (..., C); fc_weight (F, C); proj_weight (C, F)."""
    h = linear_ref(x, fc_weight, fc_bias, activation="gelu_tanh")
    return linear_ref(h, proj_weight, proj_bias, residual=residual)


# Row counts covering every config gemm_config picks and every way the JIT specialises M:
# decode 1 (M == 1) and 5, prefill up to 64 rows (40) and beyond (512).
AOT_ROWS = (1, 5, 40, 512)


def aot_launches() -> None:
    """Call the launcher for GPT-2's linears at every size: c_attn (bias), attention c_proj (bias,
    and bias + residual as the fused API offers it), c_fc (bias + GELU), MLP c_proj (bias, bias +
    residual) and lm_head (no bias, N = 50257), fp16/bf16/fp32, at ``AOT_ROWS`` rows.
    For ``kernels.aot``, which records the launches without running them."""
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
