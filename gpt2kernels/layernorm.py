"""LayerNorm, optionally fused with the residual add before it.

    s = x + residual            (add_layer_norm only; written out, it is the next residual stream)
    y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias

One program normalises one row held entirely in registers: x (and the residual) are read once,
y (and s) written once, mean and variance accumulated in fp32 in two passes over the registers
(no E[x^2] - E[x]^2 cancellation, so a large mean costs no precision in fp16).

Backward (registered as both ops' autograd): each program takes a contiguous run of rows,
recomputes their mean and 1/std from the saved input (one row read, no saved statistics), writes
dx (plus the incoming gradient of s, for add_layer_norm, which is also the residual's gradient) and
accumulates its rows' dweight and dbias partials in fp32 registers. The partials, one row per
program, are summed in program order afterwards: two stages, no float atomics, deterministic.
Reference: the Triton tutorial 05-layer-norm; Liger-Kernel's LayerNorm; PyTorch's ``F.layer_norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._ops import TRAIN_DTYPES, acc_dtype, check_tensor, kernel_op, row_settings, sm_count, tl_acc

MAX_N = 65536  # one row must fit in registers: 65536 fp32 over 32 warps is 64 per thread


@triton.jit
def centre_and_scale(x, mask, n, eps):
    """A row held in registers, x (BLOCK,) in its accumulation dtype with ``mask`` its n valid
    elements: (x - mean, zero where masked; 1 / sqrt(var + eps)), in two passes (no E[x^2] -
    E[x]^2 cancellation). LayerNorm's forward and backward and the batch-1 GEMV's prologue use it."""
    mean = tl.sum(x, axis=0) / n
    centred = tl.where(mask, x - mean, 0.0)
    return centred, 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n + eps)


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
    ACC: tl.constexpr,  # fp32; fp64 for fp64 input (gradcheck)
):
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 beyond 2**31 elements
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
    if HAS_RESIDUAL:
        x += tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(ACC)
        tl.store(s_ptr + row * stride_s + cols, x.to(s_ptr.dtype.element_ty), mask=mask)
    centred, rstd = centre_and_scale(x, mask, N, eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(ACC)
    tl.store(y_ptr + row * stride_y + cols, (centred * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "rows_per_program"])
def _layer_norm_bwd_kernel(
    x_ptr,    # (M, N) the normalised input: x, or s = x + residual
    dy_ptr,   # (M, N) gradient of y
    ds_ptr,   # (M, N) gradient of s, added to dx (read only when HAS_DS)
    w_ptr,    # (N,) weight
    dx_ptr,   # (M, N) gradient of x (and of the residual), contiguous
    dw_ptr,   # (programs, N) ACC partial sums of dweight, one row per program
    db_ptr,   # (programs, N) ACC partial sums of dbias
    stride_x, stride_dy, stride_ds,
    M, N, eps, rows_per_program,
    HAS_DS: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(ACC)
    dw = tl.zeros((BLOCK_N,), dtype=ACC)
    db = tl.zeros((BLOCK_N,), dtype=ACC)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        mask = in_row & (cols * 0 + row < M)  # a vector: the interpreter takes no scalar in a mask
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
        centred, rstd = centre_and_scale(x, mask, N, eps)
        xhat = centred * rstd
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(ACC)
        dw += dy * xhat
        db += dy
        g = dy * w  # gradient of xhat
        dx = (g - xhat * (tl.sum(g * xhat, axis=0) / N) - tl.sum(g, axis=0) / N) * rstd
        if HAS_DS:
            dx += tl.load(ds_ptr + row * stride_ds + cols, mask=mask, other=0.0).to(ACC)
        tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * N + cols, dw, mask=in_row)
    tl.store(db_ptr + pid * N + cols, db, mask=in_row)


def _rows(name: str, t: Tensor) -> Tensor:
    """``t`` as (M, N) rows; a view when the leading dims allow it."""
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dim, got a scalar")
    return t.reshape(-1, t.shape[-1])


def _layer_norm_launch(x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor,
                       eps: float) -> tuple[Tensor, Tensor | None]:
    check_tensor("x", x, dtypes=TRAIN_DTYPES)
    n = x.shape[-1]
    if not 1 <= n <= MAX_N:
        raise ValueError(f"x's last dim must be in [1, {MAX_N}], got {n}")
    for name, t in (("weight", weight), ("bias", bias)):
        check_tensor(name, t, shape=(n,), device=x.device, dtypes=TRAIN_DTYPES)
    if residual is not None:
        check_tensor("residual", residual, shape=tuple(x.shape), device=x.device, dtype=x.dtype, dtypes=None)
    x2 = _rows("x", x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return y, (torch.empty_like(y) if residual is not None else None)
    r2 = _rows("residual", residual) if residual is not None else x2
    s = torch.empty_like(y) if residual is not None else y
    block, warps = row_settings(n)
    _layer_norm_fwd_kernel[(x2.shape[0],)](
        x2, r2, weight, bias, y, s, x2.stride(0), r2.stride(0), n, n, n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block, ACC=tl_acc(x.dtype), num_warps=warps)
    return y, (s if residual is not None else None)


# Backward programs per SM: each program's fp32 dweight/dbias partials cost a row of memory and of
# the final sum, and it needs rows enough to hide the loads' latency (Liger-Kernel launches one
# program per SM; two let one program load while the other reduces).
BWD_PROGRAMS_PER_SM = 2


@kernel_op("layer_norm_backward")
def layer_norm_backward(x: Tensor, weight: Tensor, grad_y: Tensor, grad_s: Tensor | None,
                        eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``y = LayerNorm(x)`` (and of ``s``, when add_layer_norm's ``s`` was used).

    Args:
        x: (..., N) the normalised input (add_layer_norm's s), fp16/bf16/fp32/fp64.
        weight: (N,) LayerNorm weight; grad_y: x's shape, any dtype; grad_s: x's shape or None.
    Returns:
        (dx, dweight, dbias): dx in x's shape and dtype (``grad_s`` added; for add_layer_norm it is
        also the residual's gradient), dweight and dbias (N,) in weight's dtype.
    """
    return _layer_norm_backward_launch(x, weight, grad_y, grad_s, eps)


def _layer_norm_backward_launch(x: Tensor, weight: Tensor, grad_y: Tensor, grad_s: Tensor | None,
                                eps: float) -> tuple[Tensor, Tensor, Tensor]:
    n = x.shape[-1]
    x2 = _rows("x", x)
    m = x2.shape[0]
    dy = _rows("grad_y", grad_y.to(x.dtype)).contiguous()
    ds = _rows("grad_s", grad_s.to(x.dtype)).contiguous() if grad_s is not None else dy
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if m == 0:
        return dx, weight.new_zeros(n), weight.new_zeros(n)
    programs = min(m, BWD_PROGRAMS_PER_SM * sm_count(x.device))
    dw = torch.empty((programs, n), dtype=acc_dtype(x.dtype), device=x.device)
    db = torch.empty_like(dw)
    block, warps = row_settings(n)
    # The backward holds five row vectors (x, dy, w and two partials) to the forward's three: at 32
    # warps (64 registers a thread) an 8192-wide row spilled on sm_90 (Triton 3.6); 16 warps hold it.
    warps = min(warps, 16)
    _layer_norm_bwd_kernel[(programs,)](
        x2, dy, ds, weight, dx, dw, db, x2.stride(0), dy.stride(0), ds.stride(0), m, n, eps,
        triton.cdiv(m, programs), HAS_DS=grad_s is not None, BLOCK_N=block, ACC=tl_acc(x.dtype),
        num_warps=warps)
    return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)


@layer_norm_backward.op.register_fake
def _(x, weight, grad_y, grad_s, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight), \
        torch.empty_like(weight)


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


def _layer_norm_setup(ctx, inputs, output):
    x, weight, _, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(x, weight)


def _layer_norm_grads(ctx, grad_y):
    x, weight = ctx.saved_tensors
    dx, dw, db = layer_norm_backward(x, weight, grad_y, None, ctx.eps)
    return dx, dw, db, None


layer_norm.op.register_autograd(_layer_norm_grads, setup_context=_layer_norm_setup)


def _add_layer_norm_setup(ctx, inputs, output):
    ctx.eps = inputs[4]
    ctx.save_for_backward(output[1], inputs[2])  # s, the normalised sum, and the weight


def _add_layer_norm_grads(ctx, grad_y, grad_s):
    s, weight = ctx.saved_tensors
    if grad_y is None:  # y unused: only s flows on
        grad_y = torch.zeros_like(s)
    ds, dw, db = layer_norm_backward(s, weight, grad_y, grad_s, ctx.eps)
    return ds, ds, dw, db, None


add_layer_norm.op.register_autograd(_add_layer_norm_grads, setup_context=_add_layer_norm_setup)


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
    """Call the launchers at GPT-2's widths (and 4096, 8192), fp16/bf16/fp32, with and without the
    residual (the backward: with and without s's gradient). For ``gpt2kernels.aot``, which records
    the launches without running them."""
    from .aot import GPT2_SIZES

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for n in [c for c, _ in GPT2_SIZES] + [4096, 8192]:
            x = torch.empty((5, n), dtype=dtype)
            w = torch.empty(n, dtype=dtype)
            for residual in (None, torch.empty_like(x)):
                _layer_norm_launch(x, residual, w, w, 1e-5)
                _layer_norm_backward_launch(x, w, torch.empty_like(x), residual, 1e-5)
