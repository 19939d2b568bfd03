"""Linear layers with fused epilogues: ``act(x @ weight.T + bias) + residual``.

Only the eager reference lives here for now; the Triton GEMV/GEMM kernels plug in beside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "gelu_tanh")


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
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


def gelu_mlp_ref(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor, proj_weight: torch.Tensor,
                 proj_bias: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """GPT-2's MLP ``proj(gelu_tanh(fc(x))) + residual``. x (..., C); fc_weight (F, C); proj_weight (C, F)."""
    h = linear_ref(x, fc_weight, fc_bias, activation="gelu_tanh")
    return linear_ref(h, proj_weight, proj_bias, residual=residual)
