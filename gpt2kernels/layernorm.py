"""LayerNorm, optionally fused with the residual add before it.

    s = x + residual            (add_layer_norm only; written out, it is the next residual stream)
    y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias

One program normalises one row held entirely in registers: x (and the residual) are read once,
y (and s) written once, mean and variance accumulated in fp32 in two passes over the registers
(no E[x^2] - E[x]^2 cancellation, so a large mean costs no precision in fp16).
Reference: the Triton tutorial 05-layer-norm; PyTorch's ``F.layer_norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._ops import check_tensor, kernel_op, row_settings

MAX_N = 65536  # one row must fit in registers: 65536 fp32 over 32 warps is 64 per thread


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,  # (M, N) input rows, last dim contiguous
    r_ptr,  # (M, N) residual rows (read only when HAS_RESIDUAL)
    w_ptr,  # (N,) weight
    b_ptr,  # (N,) bias
    y_ptr,  # (M, N) normalised output
    s_ptr,  # (M, N) x + residual (written only when HAS_RESIDUAL)
    stride_x, stride_r, stride_y, stride_s,  # row strides, in elements
    N, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 beyond 2**31 elements
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(s_ptr + row * stride_s + cols, x.to(s_ptr.dtype.element_ty), mask=mask)
    mean = tl.sum(x, axis=0) / N
    centred = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (centred * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)


def _rows(name: str, t: Tensor) -> Tensor:
    """``t`` as (M, N) rows; a view when the leading dims allow it."""
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dim, got a scalar")
    return t.reshape(-1, t.shape[-1])


def _layer_norm_launch(x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor,
                       eps: float) -> tuple[Tensor, Tensor | None]:
    check_tensor("x", x)
    n = x.shape[-1]
    if not 1 <= n <= MAX_N:
        raise ValueError(f"x's last dim must be in [1, {MAX_N}], got {n}")
    for name, t in (("weight", weight), ("bias", bias)):
        check_tensor(name, t, shape=(n,), device=x.device)
    if residual is not None:
        check_tensor("residual", residual, shape=tuple(x.shape), device=x.device, dtype=x.dtype)
    x2 = _rows("x", x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return y, (torch.empty_like(y) if residual is not None else None)
    r2 = _rows("residual", residual) if residual is not None else x2
    s = torch.empty_like(y) if residual is not None else y
    block, warps = row_settings(n)
    _layer_norm_fwd_kernel[(x2.shape[0],)](
        x2, r2, weight, bias, y, s, x2.stride(0), r2.stride(0), n, n, n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block, num_warps=warps)
    return y, (s if residual is not None else None)


@kernel_op("layer_norm")
def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim.

    Args:
        x: (..., N), fp32/fp16/bf16, last dim contiguous (rows may be strided), 1 <= N <= 65536.
        weight, bias: (N,), any float dtype, on x's device.
        eps: added to the variance.
    Returns:
        y: x's shape and dtype, contiguous. Statistics are computed in fp32.
    """
    return _layer_norm_launch(x, None, weight, bias, eps)[0]


@layer_norm.op.register_fake
def _(x, weight, bias, eps=1e-5):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@kernel_op("add_layer_norm")
def add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor,
                   eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Residual add fused with the LayerNorm after it: ``s = x + residual; y = LayerNorm(s)``.

    Args:
        x, residual: (..., N), same shape and dtype (fp32/fp16/bf16), last dim contiguous.
        weight, bias: (N,), on x's device.
    Returns:
        (y, s), both x's shape and dtype. s is rounded from the fp32 sum, and y is computed from
        the fp32 sum (not from the rounded s).
    """
    y, s = _layer_norm_launch(x, residual, weight, bias, eps)
    return y, s


@add_layer_norm.op.register_fake
def _(x, residual, weight, bias, eps=1e-5):
    like = torch.empty_like(x, memory_format=torch.contiguous_format)
    return like, torch.empty_like(like)


def layer_norm_ref(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Eager LayerNorm over the last dim, statistics in fp32 (fp64 for fp64 input); returns x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    y = F.layer_norm(x.to(acc), x.shape[-1:], weight.to(acc), bias.to(acc), eps)
    return y.to(x.dtype)


def add_layer_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor,
                       eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Eager ``s = x + residual`` (in fp32 or wider) and ``y = LayerNorm(s)``; returns (y, s) in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    s = x.to(acc) + residual.to(acc)
    y = F.layer_norm(s, s.shape[-1:], weight.to(acc), bias.to(acc), eps)
    return y.to(x.dtype), s.to(x.dtype)


def aot_launches() -> None:
    """Call the launcher at GPT-2's widths (and 4096, 8192), fp16/bf16/fp32, with and without the
    residual. For ``gpt2kernels.aot``, which records the launches without running them."""
    from .aot import GPT2_SIZES

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for n in [c for c, _ in GPT2_SIZES] + [4096, 8192]:
            x = torch.empty((5, n), dtype=dtype)
            w = torch.empty(n, dtype=dtype)
            for residual in (None, torch.empty_like(x)):
                _layer_norm_launch(x, residual, w, w, 1e-5)
