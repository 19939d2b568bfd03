"""Repetition, presence and frequency penalties on a decode step's logits, in one kernel.

For row r and token j, with ``count = counts[r, j]`` (after counting the row's last token):

    x = logits[r, j]                                                   (in fp32)
    if prompt_mask[r, j] or count > 0:  x = x * rep if x < 0 else x / rep     (HF's repetition_penalty)
    x = x - (count * frequency + (count > 0) * presence)                 (OpenAI's penalties)

``counts`` holds how often each token was generated so far. The kernel first counts
``last_tokens[r]`` (the token the step's input is, i.e. the one sampled last; -1: none) into it,
so no separate kernel keeps the counts: a decode step calls it once, before the sampler, and only
when some row of the batch has penalties. One program per (row, block of 1024 tokens): a row's
last token is counted by the one program whose block holds it, before that program reads it.
Exactly the reference's arithmetic: correctly rounded division, no fused multiply-adds.
"""

from __future__ import annotations

import math
from numbers import Number

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._ops import check_tensor, kernel_op
from .sampling import SAMPLING_CONTROLS, SamplingControl

BLOCK_V = 1024  # 50 programs a row at GPT-2's vocabulary: a decode batch of 1 already fills 50 SMs
WARPS = 4       # 8 tokens a thread: an elementwise pass over fp32 rows needs no more

# The penalties' per-row controls, in ``apply_penalties``' order (see ``SAMPLING_CONTROLS``).
PENALTY_CONTROLS = (
    SamplingControl("repetition_penalty", torch.float32, 1.0, 1.0, "(0, inf)",
                    "HF's: > 1 discourages tokens of the prompt and output; 1 disables"),
    SamplingControl("presence_penalty", torch.float32, 0.0, 0.0, "[-2, 2]",
                    "OpenAI's, in [-2, 2]: subtracted once from every token already generated"),
    SamplingControl("frequency_penalty", torch.float32, 0.0, 0.0, "[-2, 2]",
                    "OpenAI's, in [-2, 2]: subtracted per occurrence of a generated token"),
)
# Every per-row control, in the order a decode step applies them (sampling controls, then penalties).
CONTROLS = SAMPLING_CONTROLS + PENALTY_CONTROLS


def check_penalties(repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                    frequency_penalty: float = 0.0) -> None:
    """Raise ValueError for a repetition penalty that is not finite and > 0, or a presence or
    frequency penalty outside [-2, 2] (OpenAI's range)."""
    for name, v in (("repetition_penalty", repetition_penalty), ("presence_penalty", presence_penalty),
                    ("frequency_penalty", frequency_penalty)):
        if not isinstance(v, Number) or isinstance(v, bool):
            raise ValueError(f"{name} must be a number, got {type(v).__name__}")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be finite and > 0, got {repetition_penalty}")
    for name, v in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not -2 <= v <= 2:
            raise ValueError(f"{name} must be in [-2, 2], got {v}")


@triton.jit
def _apply_penalties_fwd_kernel(
    logits_ptr,       # (B, V) logits, unit V stride
    counts_ptr,       # (B, V) int32 output counts, unit V stride; the last token is added here
    mask_ptr,         # (B, V) bool (read as int8) prompt tokens, unit V stride
    last_ptr,         # (B,) int64 each row's last sampled token, -1 for none
    rep_ptr, pres_ptr, freq_ptr,  # (B,) float32 penalties
    out_ptr,          # (B, V) float32 output, contiguous
    V, stride_logits, stride_counts, stride_mask,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < V
    last = tl.load(last_ptr + row)
    counts = tl.load(counts_ptr + row * stride_counts + cols, mask=inside, other=0)
    just_sampled = cols == last  # at most one column in one program of the row
    counts += just_sampled.to(tl.int32)
    tl.store(counts_ptr + row * stride_counts + cols, counts, mask=inside & just_sampled)
    x = tl.load(logits_ptr + row * stride_logits + cols, mask=inside, other=0.0).to(tl.float32)
    in_prompt = tl.load(mask_ptr + row * stride_mask + cols, mask=inside, other=0) != 0
    rep = tl.load(rep_ptr + row)
    generated = counts > 0
    penalised = tl.where(x < 0, x * rep, tl.math.div_rn(x, rep))
    x = tl.where(in_prompt | generated, penalised, x)
    c = counts.to(tl.float32)
    x = x - (c * tl.load(freq_ptr + row) + generated.to(tl.float32) * tl.load(pres_ptr + row))
    tl.store(out_ptr + row * V + cols, x, mask=inside)


def _apply_penalties_launch(logits: Tensor, counts: Tensor, prompt_mask: Tensor, last_tokens: Tensor,
                            repetition: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
    check_tensor("logits", logits, ndim=2)
    b, v = logits.shape
    dev = logits.device
    check_tensor("counts", counts, dtypes=(torch.int32,), shape=(b, v), device=dev)
    check_tensor("prompt_mask", prompt_mask, dtypes=(torch.bool,), shape=(b, v), device=dev)
    check_tensor("last_tokens", last_tokens, dtypes=(torch.int64,), shape=(b,), device=dev)
    for name, t in (("repetition", repetition), ("presence", presence), ("frequency", frequency)):
        check_tensor(name, t, dtypes=(torch.float32,), shape=(b,), device=dev)
    out = torch.empty((b, v), dtype=torch.float32, device=dev)
    if b == 0 or v == 0:
        return out
    # enable_fp_fusion=False: no fused multiply-add, so the sums round as the reference's do.
    _apply_penalties_fwd_kernel[(b, triton.cdiv(v, BLOCK_V))](
        logits, counts, prompt_mask.view(torch.int8), last_tokens, repetition, presence, frequency, out,
        v, logits.stride(0), counts.stride(0), prompt_mask.stride(0),
        BLOCK=BLOCK_V, num_warps=WARPS, enable_fp_fusion=False)
    return out


@kernel_op("apply_penalties", mutates_args=("counts",))
def apply_penalties(logits: Tensor, counts: Tensor, prompt_mask: Tensor, last_tokens: Tensor,
                    repetition: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
    """Count each row's last token, then penalise the logits (see the module docstring): one kernel.

    Args:
        logits: (B, V) fp32/fp16/bf16, unit stride along V.
        counts: int32 (B, V), how often each token was generated; ``last_tokens`` is added in place.
        prompt_mask: bool (B, V), the row's prompt tokens (only the repetition penalty reads it).
        last_tokens: int64 (B,), the token each row sampled last, -1 where there is none to count.
        repetition, presence, frequency: float32 (B,) penalties; 1, 0, 0 leave a row unchanged.
    Returns:
        float32 (B, V) penalised logits. Every tensor on one device; no host sync.
    """
    return _apply_penalties_launch(logits, counts, prompt_mask, last_tokens, repetition, presence, frequency)


@apply_penalties.op.register_fake
def _(logits, counts, prompt_mask, last_tokens, repetition, presence, frequency):
    return logits.new_empty(logits.shape, dtype=torch.float32)


def apply_penalties_ref(logits: Tensor, counts: Tensor, prompt_mask: Tensor, last_tokens: Tensor,
                        repetition: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
    """``apply_penalties`` in plain PyTorch (a scatter and a few elementwise ops; no host sync)."""
    counts.scatter_add_(1, last_tokens.clamp(min=0)[:, None], (last_tokens >= 0).to(counts.dtype)[:, None])
    x = logits.float()
    generated = counts > 0
    rep = repetition[:, None]
    x = torch.where(prompt_mask | generated, torch.where(x < 0, x * rep, x / rep), x)
    c = counts.float()
    return x - (c * frequency[:, None] + generated.float() * presence[:, None])


def aot_launches() -> None:
    """The launcher at GPT-2's vocabulary, fp16/bf16/fp32 logits, batch 1 and 5. For ``gpt2kernels.aot``."""
    from .aot import GPT2_VOCAB

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for b in (1, 5):
            _apply_penalties_launch(
                torch.empty(b, GPT2_VOCAB, dtype=dtype), torch.zeros(b, GPT2_VOCAB, dtype=torch.int32),
                torch.zeros(b, GPT2_VOCAB, dtype=torch.bool), torch.zeros(b, dtype=torch.int64),
                *(torch.ones(b) for _ in range(3)))
