"""Static KV cache: buffers allocated once per generation, never reallocated or moved."""

from __future__ import annotations

import torch

from .config import GPT2Config


class StaticKVCache:
    """Keys and values of every layer, plus each row's valid length.

    k, v: (n_layer, B, H, max_len, D) in the model dtype. lens: int32 (B,) on the model device,
    the number of valid slots per row; slots past it may hold anything and are never attended.
    """

    def __init__(self, config: GPT2Config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (config.n_layer, batch, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.rows = torch.arange(batch, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]
