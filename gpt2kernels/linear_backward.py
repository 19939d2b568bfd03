"""The backward passes of ``linear`` and ``gelu_mlp``, registered as their ops' autograd.

Neither op saves its GELU's pre-activation z or its output h = gelu(z): they save only their
inputs, and the backward recomputes z with one forward GEMM (activation checkpointing of the MLP's
inside). For an MLP of width F that keeps 2F values per token out of memory between the forward and
the backward (eager PyTorch saves both z and h), for a GEMM the size of the forward's first:
a training step's GEMMs go from 6 to 7 per MLP. Everything else is fused where the forward's
epilogue was:

    gelu_mlp, y = proj(gelu(fc(x))) + residual:
        z  = x @ Wf^T + bf                       recompute (the forward kernel, no epilogue)
        dz = (dy @ Wp) * gelu'(z)                one GEMM, the derivative in its epilogue
        dWp = dy^T @ gelu(z)                     one GEMM, the GELU in its loads of z
        dWf = dz^T @ x,  dx = dz @ Wf,  dbf = sum(dz),  dbp = sum(dy),  dresidual = dy
    linear with the GELU:
        dz = dy * gelu'(x @ W^T + b)             one kernel: the forward GEMM, the derivative in its epilogue
        dW = dz^T @ x,  dx = dz @ W,  db = sum(dz)

Weight gradients take the weight's layout (the GEMM is run transposed for a transposed weight), so
a patch that passes HF Conv1D's ``weight.t()`` gets its gradient back with no copy. Bias gradients
are column sums in fp32 (torch's, deterministic).
int8 weights are inference-only: their backward raises.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._ops import acc_dtype
from .linear import gelu_mlp, linear, linear_gelu_grad
from .matmul import matmul, matmul_launch


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _no_int8(op: str, *scales: Tensor | None) -> None:
    if any(s is not None for s in scales):
        raise RuntimeError(f"gpt2kernels.{op} with int8 weights is inference-only and has no backward: "
                           "train with fp32/fp16/bf16 weights and quantise afterwards")


def _needs(ctx, n: int) -> list[bool]:
    """ctx.needs_input_grad for the op's first n inputs; trailing arguments left at their defaults
    are not among the inputs autograd sees."""
    return [*ctx.needs_input_grad, *[False] * n][:n]


def _trim(ctx, grads: tuple) -> tuple:
    """One gradient per input autograd saw (see ``_needs``)."""
    return grads[:len(ctx.needs_input_grad)]


def _weight_grad(dz: Tensor, x: Tensor, weight: Tensor, gelu_x: bool = False, mm=matmul) -> Tensor:
    """dz^T @ gelu?(x), (N, K), laid out as ``weight`` is: [in, out] weights (HF Conv1D's, passed as
    ``weight.t()``) get (x^T @ dz)^T, a transposed view of a contiguous [in, out] result."""
    if weight.stride(0) == 1 and weight.stride(1) != 1:
        return mm(x.t(), dz, gelu_a=gelu_x).t()
    return mm(dz.t(), x, gelu_b=gelu_x)


def _column_sum(g: Tensor, like: Tensor) -> Tensor:
    return g.sum(0, dtype=acc_dtype(g.dtype)).to(like.dtype)


def _linear_setup(ctx, inputs, output):
    x, weight, bias, activation, residual, weight_scale = inputs
    ctx.activation, ctx.int8 = activation, weight_scale
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.save_for_backward(x, weight, bias)


def _linear_grads(ctx, grad_y):
    _no_int8("linear", ctx.int8)
    x, weight, bias = ctx.saved_tensors
    need_x, need_w, need_b = _needs(ctx, 3)
    grad_y = grad_y.contiguous()
    dz = linear_gelu_grad(x, weight, bias, grad_y) if ctx.activation == "gelu_tanh" else grad_y
    dz2, x2 = _rows(dz), _rows(x)
    dx = matmul(dz2, weight).view(x.shape) if need_x else None
    dw = _weight_grad(dz2, x2, weight) if need_w else None
    db = _column_sum(dz2, bias) if need_b and ctx.has_bias else None
    return _trim(ctx, (dx, dw, db, None, grad_y if ctx.has_residual else None, None))


linear.op.register_autograd(_linear_grads, setup_context=_linear_setup)


def _gelu_mlp_setup(ctx, inputs, output):
    x, fc_weight, fc_bias, proj_weight, _, residual, fc_scale, proj_scale = inputs
    ctx.int8 = (fc_scale, proj_scale)
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, fc_weight, fc_bias, proj_weight)


def _gelu_mlp_grads(ctx, grad_y):
    _no_int8("gelu_mlp", *ctx.int8)
    x, fc_weight, fc_bias, proj_weight = ctx.saved_tensors
    need_x, need_fw, need_fb, need_pw, need_pb = _needs(ctx, 5)
    dy, x2 = _rows(grad_y.contiguous()), _rows(x)
    z = _rows(linear(x, fc_weight, fc_bias))
    dz = matmul(dy, proj_weight, gelu_grad_at=z)
    d_proj_w = _weight_grad(dy, z, proj_weight, gelu_x=True) if need_pw else None
    del z
    d_proj_b = _column_sum(dy, proj_weight) if need_pb else None
    d_fc_w = _weight_grad(dz, x2, fc_weight) if need_fw else None
    d_fc_b = _column_sum(dz, fc_bias) if need_fb else None
    dx = matmul(dz, fc_weight).view(x.shape) if need_x else None
    return _trim(ctx, (dx, d_fc_w, d_fc_b, d_proj_w, d_proj_b, grad_y if ctx.has_residual else None, None, None))


gelu_mlp.op.register_autograd(_gelu_mlp_grads, setup_context=_gelu_mlp_setup)


def aot_launches() -> None:
    """The backward's kernels as a training step of GPT-2 runs them: every GEMM of the MLP's and of a
    linear's backward, weights in nn.Linear's layout and in HF Conv1D's (``weight.t()``), at 40 and
    8192 rows (both tile configs), fp16/bf16/fp32. Widths do not change the variant (all are multiples
    of 16), so gpt2's stands for all. For ``gpt2kernels.aot``, which records the launches without running them."""
    c = 768
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for conv1d in (False, True):
            def weight(n, k):
                return torch.empty((k, n), dtype=dtype).t() if conv1d else torch.empty((n, k), dtype=dtype)

            fc_w, proj_w, attn_w = weight(4 * c, c), weight(c, 4 * c), weight(3 * c, c)
            for m in (40, 8192):
                x, dy = torch.empty((m, c), dtype=dtype), torch.empty((m, c), dtype=dtype)
                z = torch.empty((m, 4 * c), dtype=dtype)
                dz = matmul_launch(dy, proj_w, gelu_grad_at=z)
                _weight_grad(dy, z, proj_w, gelu_x=True, mm=matmul_launch)
                _weight_grad(dz, x, fc_w, mm=matmul_launch)
                matmul_launch(dz, fc_w)
                d_qkv = torch.empty((m, 3 * c), dtype=dtype)
                matmul_launch(d_qkv, attn_w)
                _weight_grad(d_qkv, x, attn_w, mm=matmul_launch)
