"""LayerNorm, optionally fused with the residual add before it: ``s = x + r; y = LayerNorm(s)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim, statistics in fp32. x (..., N); weight, bias (N,); returns x's dtype."""
    y = F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps)
    return y.to(x.dtype)


def add_layer_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (in fp32) and ``y = LayerNorm(s)``; returns (y, s) in x's dtype."""
    s = x.float() + residual.float()
    y = F.layer_norm(s, s.shape[-1:], weight.float(), bias.float(), eps)
    return y.to(x.dtype), s.to(x.dtype)
