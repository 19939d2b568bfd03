"""The backward passes' GEMM: ``c = a @ b`` on tensor cores, any strides, with the GELU fused on either side.

    c = gelu?(a) @ gelu?(b) * gelu'(z)?

- ``gelu_a`` / ``gelu_b``: that operand is a pre-activation, and the GELU is applied to its tiles as
  they are loaded, so that ``dW = dy^T @ gelu(z)`` (or its transpose, ``gelu(z)^T @ dy``) never
  needs ``gelu(z)`` written out.
- ``gelu_grad_at=z``: the epilogue multiplies by the GELU's derivative at z, so that
  ``dz = (dy @ W) * gelu'(z)`` is one kernel and the gradient of the GELU's output is never written.

Transposes are strides (``a.t()``), never copies. fp16/bf16 operands accumulate in fp32, fp32 in
IEEE fp32 (not TF32), fp64 in fp64 (gradcheck). One program per output tile, in grouped order (tiles
sharing b's columns run together while those are in L2). Reference: Triton tutorial 03.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .activations import gelu_tanh, gelu_tanh_grad
from ._ops import TRAIN_DTYPES, check_tensor, dot_precision, kernel_op, tl_acc


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` over an (M, N) output in grouped order: GROUP_M
    row tiles sweep the same columns of the right operand while those are still in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit(do_not_specialize_on_alignment=["M", "N", "K"])
def _matmul_kernel(
    a_ptr,  # (M, K) any strides
    b_ptr,  # (K, N) any strides; a pre-activation when B_GELU (a: when A_GELU)
    z_ptr,  # (M, N) any strides: where the GELU's derivative is taken (read when GELU_GRAD)
    c_ptr,  # (M, N) output, any strides
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_zm, stride_zn, stride_cm, stride_cn,
    A_GELU: tl.constexpr, B_GELU: tl.constexpr, GELU_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + rk[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptrs, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if A_GELU:  # rounded to the operand dtype, as the forward's stored activation was
            a = gelu_tanh(a.to(ACC)).to(a_ptr.dtype.element_ty)
        if B_GELU:
            b = gelu_tanh(b.to(ACC)).to(b_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    rows = rm[:, None].to(tl.int64)
    cols = rn[None, :].to(tl.int64)
    if GELU_GRAD:
        z = tl.load(z_ptr + rows * stride_zm + cols * stride_zn, mask=mask, other=0.0).to(ACC)
        acc = acc * gelu_tanh_grad(z)
    tl.store(c_ptr + rows * stride_cm + cols * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


def matmul_config(m: int, n: int, dtype: torch.dtype, gelu: bool = False) -> MatmulConfig:
    """Tiles for an (m, k) x (k, n) GEMM, chosen so that no variant spills registers on sm_80 or
    sm_90 under Triton 3.6 or 3.9 (gpt2kernels.aot). The GELU on an operand's tiles holds a second
    copy of them in fp32: at large M it takes 128x64x16 tiles (on sm_80, 128x128x64 spilled 76 bytes
    under 3.6; with the GELU on a column-major left operand 128x128x32 spilled 64-100 under 3.6 and
    128x128x16 8 under 3.9; 64x64x32 and 64x128x16 at 4 warps spilled 8 under 3.9), and at fp32
    twice the warps (4 spilled 24 bytes on sm_90). The derivative epilogue holds z's tile beside the
    accumulator, so small GEMMs take 64x64 tiles (64x128 spilled at 4 and 8 warps)."""
    if dtype.itemsize >= 4:
        return MatmulConfig(32, 64, 16, 8 if gelu else 4, 2)
    if m <= 64 or n <= 64:
        return MatmulConfig(64, 64, 64, 4, 3)
    return MatmulConfig(128, 64, 16, 8, 3) if gelu else MatmulConfig(128, 128, 64, 8, 3)


@kernel_op("matmul")
def matmul(a: Tensor, b: Tensor, gelu_a: bool = False, gelu_b: bool = False,
           gelu_grad_at: Tensor | None = None) -> Tensor:
    """``gelu?(a) @ gelu?(b) * gelu'(gelu_grad_at)?`` in one kernel.

    Args:
        a: (M, K), b: (K, N), fp32/fp16/bf16/fp64, one dtype, any strides (transposes are free).
        gelu_a, gelu_b: apply GPT-2's tanh GELU to that operand's elements first.
        gelu_grad_at: (M, N) in a's dtype, any strides, or None: multiply the product by the GELU's
            derivative at it.
    Returns:
        (M, N) in a's dtype, contiguous (``matmul(b.t(), a.t()).t()`` gives the transposed layout).
    """
    return matmul_launch(a, b, gelu_a, gelu_b, gelu_grad_at)


def matmul_launch(a: Tensor, b: Tensor, gelu_a: bool = False, gelu_b: bool = False,
                  gelu_grad_at: Tensor | None = None) -> Tensor:
    """``matmul``'s checks and launch, outside the op (for ``gpt2kernels.aot``, which records launches)."""
    check_tensor("a", a, ndim=2, dtypes=TRAIN_DTYPES, last_dim_contiguous=False)
    check_tensor("b", b, ndim=2, dtype=a.dtype, device=a.device, dtypes=None, last_dim_contiguous=False)
    (m, k), n = a.shape, b.shape[1]
    if b.shape[0] != k:
        raise ValueError(f"a has shape {list(a.shape)} and b {list(b.shape)}: b's first dim must be a's K = {k}")
    if gelu_grad_at is not None:
        check_tensor("gelu_grad_at", gelu_grad_at, shape=(m, n), dtype=a.dtype, device=a.device, dtypes=None,
                     last_dim_contiguous=False)
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    z = gelu_grad_at if gelu_grad_at is not None else out
    cfg = matmul_config(m, n, a.dtype, gelu_a or gelu_b)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _matmul_kernel[grid](
        a, b, z, out, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), z.stride(0), z.stride(1),
        out.stride(0), out.stride(1), A_GELU=gelu_a, B_GELU=gelu_b, GELU_GRAD=gelu_grad_at is not None,
        ACC=tl_acc(a.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        DOT_PRECISION=dot_precision(a.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


@matmul.op.register_fake
def _(a, b, gelu_a=False, gelu_b=False, gelu_grad_at=None):
    return a.new_empty((a.shape[0], b.shape[1]))


def gelu_tanh_grad_ref(z: Tensor) -> Tensor:
    """d gelu_tanh(z) / dz in plain PyTorch (by autograd through ``F.gelu(approximate="tanh")``), z's dtype."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_()
        (g,) = torch.autograd.grad(torch.nn.functional.gelu(zz, approximate="tanh").sum(), zz)
    return g


def matmul_ref(a: Tensor, b: Tensor, gelu_a: bool = False, gelu_b: bool = False,
               gelu_grad_at: Tensor | None = None) -> Tensor:
    """``matmul`` in plain PyTorch, in a's dtype."""
    if gelu_a:
        a = torch.nn.functional.gelu(a, approximate="tanh")
    if gelu_b:
        b = torch.nn.functional.gelu(b, approximate="tanh")
    c = a @ b
    if gelu_grad_at is not None:
        c = c * gelu_tanh_grad_ref(gelu_grad_at)
    return c
