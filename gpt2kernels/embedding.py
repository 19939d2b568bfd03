"""A decode step's input: token plus position embeddings, with the row's length advanced.

    x[b] = wte[tokens[b]] + wpe[cache_lens[b]];  cache_lens[b] += 1

The position of each row's new token is its current cache length, read on the device, so the step
has no host-side positions to build; advancing the length in the same kernel makes it the length
every later kernel of the step reads (the cache then holds the new token). One program per row,
which alone reads and writes that row's length. The sum is taken in fp32 and rounded once, which
equals the input dtype's own correctly rounded add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._ops import check_tensor, kernel_op, row_settings


@triton.jit
def _decode_embed_fwd_kernel(
    tokens_ptr,  # (B,) int64 token ids
    lens_ptr,    # (B,) int32 cache lengths: read as the position, then advanced by one
    wte_ptr,     # (V, C) token embeddings, unit C stride
    wpe_ptr,     # (P, C) position embeddings, unit C stride
    x_ptr,       # (B, C) output, contiguous
    V, P, C, stride_wte, stride_wpe,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    # Out-of-range ids or positions are clamped, never read out of bounds: a NaN row's flag (-1) may
    # reach the next step before the host sees it, and the runner keeps lengths within P.
    token = tl.minimum(tl.maximum(tl.load(tokens_ptr + row), 0), V - 1)
    length = tl.load(lens_ptr + row)
    pos = tl.minimum(tl.maximum(length, 0), P - 1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    e = tl.load(wte_ptr + token * stride_wte + cols, mask=mask, other=0.0).to(tl.float32)
    e += tl.load(wpe_ptr + pos * stride_wpe + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + row.to(tl.int64) * C + cols, e.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(lens_ptr + row, length + 1)


def _decode_embed_launch(tokens: Tensor, cache_lens: Tensor, wte: Tensor, wpe: Tensor) -> Tensor:
    check_tensor("wte", wte, ndim=2)
    check_tensor("wpe", wpe, ndim=2, dtype=wte.dtype, device=wte.device)
    c = wte.shape[1]
    if wpe.shape[1] != c or wte.shape[0] == 0 or wpe.shape[0] == 0:
        raise ValueError(f"wte {list(wte.shape)} and wpe {list(wpe.shape)} must be non-empty (rows, C) "
                         "tables of one width")
    check_tensor("tokens", tokens, dtypes=(torch.int64,), ndim=1, device=wte.device)
    check_tensor("cache_lens", cache_lens, dtypes=(torch.int32,), shape=tuple(tokens.shape), device=wte.device)
    if cache_lens.numel() > 1 and cache_lens.stride(0) != 1:
        raise ValueError(f"cache_lens must be contiguous, got strides {cache_lens.stride()}")
    x = torch.empty((tokens.shape[0], c), dtype=wte.dtype, device=wte.device)
    if tokens.shape[0] == 0:
        return x
    block, warps = row_settings(c)
    _decode_embed_fwd_kernel[(tokens.shape[0],)](
        tokens, cache_lens, wte, wpe, x, wte.shape[0], wpe.shape[0], c, wte.stride(0), wpe.stride(0),
        BLOCK_C=block, num_warps=warps)
    return x


@kernel_op("decode_embed", mutates_args=("cache_lens",),
           inference_only="it advances a decode step's cache lengths; train with torch.nn.Embedding")
def decode_embed(tokens: Tensor, cache_lens: Tensor, wte: Tensor, wpe: Tensor) -> Tensor:
    """Embed one new token per row at its cache length, and advance the length: one kernel.

    Args:
        tokens: int64 (B,) token ids; ids outside [0, V) are clamped (never read out of bounds).
        cache_lens: int32 (B,) contiguous, on wte's device: each row's cache length before the step, the
            new token's position (clamped to [0, P)). Incremented by one in place.
        wte: (V, C) token embeddings; wpe: (P, C) position embeddings in wte's dtype; unit C stride.
    Returns:
        x: (B, C) in wte's dtype, ``wte[tokens] + wpe[cache_lens]`` (summed in fp32, rounded once).
    """
    return _decode_embed_launch(tokens, cache_lens, wte, wpe)


@decode_embed.op.register_fake
def _(tokens, cache_lens, wte, wpe):
    return wte.new_empty((tokens.shape[0], wte.shape[1]))


def decode_embed_ref(tokens: Tensor, cache_lens: Tensor, wte: Tensor, wpe: Tensor) -> Tensor:
    """``decode_embed`` in plain PyTorch (same clamping), advancing ``cache_lens`` in place."""
    token = tokens.clamp(0, wte.shape[0] - 1)
    pos = cache_lens.long().clamp(0, wpe.shape[0] - 1)
    x = (wte[token].float() + wpe[pos].float()).to(wte.dtype)
    cache_lens += 1
    return x


def aot_launches() -> None:
    """Call the launcher at GPT-2's widths, fp16/bf16/fp32. For ``gpt2kernels.aot``, which records the
    launches without running them."""
    from .aot import GPT2_SIZES, GPT2_VOCAB

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for c, _ in GPT2_SIZES:
            _decode_embed_launch(torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int32),
                                 torch.empty((GPT2_VOCAB, c), dtype=dtype), torch.empty((1024, c), dtype=dtype))
