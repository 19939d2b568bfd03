"""Causal attention: prefill over a whole prompt and decode over a static KV cache.

Only the eager references live here for now; the Triton flash kernels plug in beside them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flash_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v. q (B, H, Tq, D); k, v (B, H, Tk, D); returns (B, H, Tq, D).

    The causal mask is aligned bottom-right when Tq < Tk: the last query sees every key.
    """
    tq, tk = q.shape[-2], k.shape[-2]
    if not causal or tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    rows = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
    mask = torch.arange(tk, device=q.device)[None, :] <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention of a few new queries over each row's valid cache prefix.

    q (B, H, Lq, D) holds the newest Lq tokens of each row, already written to the cache;
    k_cache, v_cache (B, H, L, D); cache_lens int (B,) = valid length per row including the
    new tokens. Query i of row b sees keys ``j < cache_lens[b] - (Lq - 1 - i)``.
    Slots past each length must hold finite values here (the Triton kernel never reads them).
    Returns (B, H, Lq, D).
    """
    lq, slots, d = q.shape[-2], k_cache.shape[-2], q.shape[-1]
    last_visible = cache_lens.view(-1, 1, 1, 1).long() - (lq - torch.arange(lq, device=q.device)).view(1, 1, lq, 1)
    mask = torch.arange(slots, device=q.device).view(1, 1, 1, slots) <= last_visible
    # Explicit math rather than SDPA: with a handful of queries it is several times faster on CPU.
    scores = torch.matmul(q, k_cache.transpose(-1, -2)).float() * (scale if scale is not None else d ** -0.5)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(probs.to(v_cache.dtype), v_cache)
