"""Weight-only int8: symmetric per-output-channel quantisation of a linear's (N, K) weight.

``weight[n, k] ~= q[n, k] * scale[n]`` with ``q`` int8 in [-127, 127] and ``scale[n] = max_k |weight[n, k]| / 127``
(fp32), so the largest weight of each row is exact and every other is off by at most ``scale[n] / 2``.
-128 is never used: the range stays symmetric, so negating a weight never saturates.
The linear kernels (``gpt2kernels.linear`` and its fused forms) take ``q`` as the weight and ``scale`` as
``weight_scale``: they widen q to the activations' dtype in registers (int8 is exact in fp16 and bf16)
and multiply each output column by its scale in the epilogue, before the bias.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._ops import FLOAT_DTYPES, check_tensor

INT8_MAX = 127


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Quantise a weight per output channel (row).

    Args:
        weight: (N, K) fp32/fp16/bf16, the nn.Linear layout, any strides.
    Returns:
        q: (N, K) int8, contiguous; scale: (N,) fp32. A row of zeros gets scale 1 (and q = 0).
    """
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=False)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight holds NaN or infinite values, which int8 cannot represent")
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    # A few rows at a time, so that the fp32 copy never costs more than ~64 MB (gpt2-xl's lm_head is 80M weights).
    rows = max(1, (1 << 24) // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        w = weight[start:start + rows].float()
        s = w.abs().amax(dim=1) / INT8_MAX
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[start:start + rows] = torch.round(w / s[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        scale[start:start + rows] = s
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q * scale[:, None]`` in fp32, rounded once to ``dtype``. q (N, K) int8, scale (N,) fp32 -> (N, K)."""
    check_tensor("q", q, ndim=2, dtypes=(torch.int8,), last_dim_contiguous=False)
    check_tensor("scale", scale, shape=(q.shape[0],), dtypes=(torch.float32,), device=q.device)
    return (q.float() * scale[:, None]).to(dtype)
