"""Static KV cache addressed by slots: allocated once, reused across calls, never moved.

A prefill stores a prompt through ``write_prompt``; a decode step's kernels write the new token's
key and value themselves (``Ops.ln_qkv_append``, into the views ``layer`` gives) and advance the
lengths (``Ops.decode_embed``).
"""

from __future__ import annotations

import torch

from .config import GPT2Config


class KVCache:
    """Keys and values of every layer for ``slots`` sequences of up to ``max_len`` tokens each.

    k, v: (n_layer, slots, H, max_len, D) in the model dtype. cache_lens: int32 (slots,) on the model
    device, the number of valid positions per slot; positions past it may hold anything and are
    never attended. A batch of B rows runs on slots [0, B) unless a prefill names other slots.
    """

    def __init__(self, config: GPT2Config, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (config.n_layer, slots, config.n_head, max_len, config.head_dim)
        # zeros, not empty: the eager attention reads every position (masked), so they must be finite
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_lens = torch.zeros(slots, dtype=torch.int32, device=device)

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values."""
        return self.k.nbytes + self.v.nbytes

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def fits(self, slots: int, max_len: int) -> bool:
        return slots <= self.slots and max_len <= self.max_len

    def write_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | None = None) -> None:
        """Store a right-padded prompt's keys and values at positions [0, T).

        k, v: (B, H, T, D). slots: int64 (B,) target slots on the device, or None for [0, B).
        """
        t = k.shape[2]
        if slots is None:
            self.k[layer, :k.shape[0], :, :t] = k
            self.v[layer, :k.shape[0], :, :t] = v
        else:
            self.k[layer, slots, :, :t] = k
            self.v[layer, slots, :, :t] = v

    def set_lengths(self, prompt_lens: torch.Tensor, slots: torch.Tensor | None = None) -> None:
        """prompt_lens int32 (B,) on the device for slots [0, B), or for ``slots`` (int64 (B,))."""
        if slots is None:
            self.cache_lens[:prompt_lens.shape[0]] = prompt_lens
        else:
            self.cache_lens[slots] = prompt_lens

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy positions [0, length) and the lengths of slots ``src`` into slots ``dst`` (int64 (N,)
        on the device): a prompt prefilled once, shared by several requests."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
        self.cache_lens[dst] = self.cache_lens[src]

    def layer(self, layer: int, rows: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of slots [0, rows): views (rows, H, length, D) of positions [0, length) (default:
        all), the layout a decode step writes the new token into and attends over (bounded by ``cache_lens``)."""
        return self.k[layer, :rows, :, :length], self.v[layer, :rows, :, :length]
