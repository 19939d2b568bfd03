"""The epilogue both linear kernels (the tiled one in linear.py, the batch-1 GEMV in gemv.py) run after
their products: scales, bias, GELU, residual or the KV-cache store, before the one rounding."""

import triton
import triton.language as tl

from .activations import gelu_tanh, gelu_tanh_grad


@triton.jit
def linear_epilogue(acc, rm, rn, M, N, s_ptr, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym,
                    kc_ptr, vc_ptr, lens_ptr, stride_cb, stride_ch, stride_ct, head_dim, INT8_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                    KV_CACHE: tl.constexpr):
    """int8 weights' column scales, bias, activation, residual in fp32 (ACTIVATION 2: the residual
    times the GELU's derivative instead, for the backward), then one rounding and masked
    stores of the tile: into y, or with KV_CACHE, columns [0, C) (the query) into y and [C, 3C)
    (key, value) into the caches."""
    if INT8_WEIGHT:
        acc *= tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(acc.dtype)[None, :]
    if ACTIVATION == 1:
        acc = gelu_tanh(acc)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    rows = rm[:, None].to(tl.int64)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows * stride_rm + rn[None, :], mask=mask, other=0.0).to(acc.dtype)
        if ACTIVATION == 2:  # the backward's recompute: "residual" is the GELU output's gradient
            acc = r * gelu_tanh_grad(acc)
        else:
            acc += r
    out = acc.to(y_ptr.dtype.element_ty)
    if KV_CACHE:
        c = N // 3
        part = rn // c  # 0 query, 1 key, 2 value
        col = rn - part * c
        pos = tl.load(lens_ptr + rm, mask=rm < M, other=1) - 1  # the new token's slot in each row
        at = rows * stride_cb + (col // head_dim)[None, :] * stride_ch + pos[:, None].to(tl.int64) * stride_ct \
            + (col % head_dim)[None, :]
        tl.store(y_ptr + rows * stride_ym + rn[None, :], out, mask=mask & (part == 0)[None, :])
        tl.store(kc_ptr + at, out, mask=mask & (part == 1)[None, :])
        tl.store(vc_ptr + at, out, mask=mask & (part == 2)[None, :])
    else:
        tl.store(y_ptr + rows * stride_ym + rn[None, :], out, mask=mask)
