"""The one table that decides which implementation runs each op of the model.

``eager`` is plain PyTorch (the reference, and the CPU path); ``triton`` swaps in our fused
kernels op by op. Nothing else in the runtime knows which backend runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import gpt2kernels

from .quantize import PackedInt8Linear


# Below this many rows, CPU fp16 GEMV beats fp32; above it, fp16 GEMM is many times slower than
# upcasting to fp32 (no native fp16 FMA on AVX-512 CPUs; 4x at 32 rows, 5x at 512, measured here).
CPU_FP16_GEMV_MAX_ROWS = 16


def eager_linear(x, weight, bias=None, activation=None, residual=None, weight_scale=None):
    """``gpt2kernels.linear_ref``, upcast to fp32 for fp16 GEMMs on CPU, where that is faster; a
    ``PackedInt8Linear`` weight (int8 on CPU) runs on PyTorch's quantised engine."""
    if isinstance(weight, PackedInt8Linear):
        return weight(x, bias, activation, residual)
    if x.device.type == "cpu" and x.dtype == torch.float16 and x.numel() > CPU_FP16_GEMV_MAX_ROWS * x.shape[-1]:
        r = residual.float() if residual is not None else None
        b = bias.float() if bias is not None else None
        w = weight.float() if weight.is_floating_point() else weight
        return gpt2kernels.linear_ref(x.float(), w, b, activation, r, weight_scale).to(x.dtype)
    return gpt2kernels.linear_ref(x, weight, bias, activation, residual, weight_scale)


def eager_ln_linear(x, ln_weight, ln_bias, weight, bias=None, activation=None, eps=1e-5, weight_scale=None):
    """``gpt2kernels.ln_linear_ref`` with ``eager_linear``'s CPU rules."""
    return eager_linear(gpt2kernels.layer_norm_ref(x, ln_weight, ln_bias, eps), weight, bias, activation,
                        weight_scale=weight_scale)


def eager_ln_qkv_append(x, ln_weight, ln_bias, weight, bias, k_cache, v_cache, cache_lens, eps=1e-5,
                        weight_scale=None):
    """``gpt2kernels.ln_qkv_append_ref`` with ``eager_linear``'s CPU rules."""
    qkv = eager_ln_linear(x, ln_weight, ln_bias, weight, bias, None, eps, weight_scale)
    if _cpu_eager(x) and x.shape[0] == 1:  # batch 1 on CPU: two slice writes, no index tensors to build
        c, (h, d), pos = x.shape[1], (k_cache.shape[1], k_cache.shape[3]), int(cache_lens[0]) - 1
        k_cache[0, :, pos] = qkv[0, c:2 * c].view(h, d)
        v_cache[0, :, pos] = qkv[0, 2 * c:].view(h, d)
        return qkv[:, :c]
    return gpt2kernels.qkv_append_ref(qkv, k_cache, v_cache, cache_lens)


def _cpu_eager(x: torch.Tensor) -> bool:
    """On CPU and not being traced by torch.compile: where reading a length on the host costs
    nothing (on a GPU it is a sync; in a traced step, a graph break)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _cpu_fp16(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float16


def eager_attention(q, k, v, causal=True):
    """``gpt2kernels.flash_attention_ref``; fp16 on CPU computed in fp32, 2-3x faster there."""
    if _cpu_fp16(q):
        return gpt2kernels.flash_attention_ref(q.float(), k.float(), v.float(), causal).to(q.dtype)
    return gpt2kernels.flash_attention_ref(q, k, v, causal)


def eager_decode_attention(q, k_cache, v_cache, cache_lens):
    """``gpt2kernels.decode_attention_ref``; fp16 on CPU computed in fp32: fp16 batched matmuls there
    were 14x slower when called from a thread other than the main one (the server's engine loop).

    On CPU, when every row has the same length (batch 1, or prompts of one length), SDPA over
    exactly that prefix instead: no mask to build or apply, 2.6x faster at batch 1 and 1.6x at
    batch 8 (gpt2's 12 heads at 160 positions on the 2-core EPYC). Reading the lengths costs no
    sync there: they are host memory."""
    if _cpu_eager(q) and q.shape[-2] == 1:
        host_lens = cache_lens.tolist()
        if host_lens and min(host_lens) == max(host_lens) and 0 < host_lens[0] <= k_cache.shape[-2]:
            k, v = k_cache[:, :, :host_lens[0]], v_cache[:, :, :host_lens[0]]
            if _cpu_fp16(q):
                return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
            return F.scaled_dot_product_attention(q, k, v)
    if _cpu_fp16(q):
        return gpt2kernels.decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), cache_lens).to(q.dtype)
    return gpt2kernels.decode_attention_ref(q, k_cache, v_cache, cache_lens)


def _lm_head_logprobs(impl, hidden, weight, targets):
    return -impl(hidden, weight, targets, reduction="none")


def eager_target_logprobs(hidden, weight, targets):
    """log p(target) per row through ``gpt2kernels.linear_cross_entropy_ref``; fp16 on CPU computed in fp32."""
    if _cpu_fp16(hidden):
        hidden, weight = hidden.float(), weight.float()
    return _lm_head_logprobs(gpt2kernels.linear_cross_entropy_ref, hidden, weight, targets)


def eager_gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, residual=None, fc_scale=None, proj_scale=None):
    h = eager_linear(x, fc_weight, fc_bias, activation="gelu_tanh", weight_scale=fc_scale)
    return eager_linear(h, proj_weight, proj_bias, residual=residual, weight_scale=proj_scale)


@dataclass(frozen=True)
class Ops:
    layer_norm: Callable        # (x, w, b, eps) -> y
    add_layer_norm: Callable    # (x, residual, w, b, eps) -> (y, x + residual)
    # Every linear takes its weight's int8 scales (weight_scale, fc_scale, proj_scale: None for float weights).
    linear: Callable            # (x, w, b, activation=None, residual=None, weight_scale=None) -> y
    gelu_mlp: Callable          # (x, fc_w, fc_b, proj_w, proj_b, residual=None, fc_scale=None, proj_scale=None) -> y
    attention: Callable         # (q, k, v, causal=True) -> o, prefill
    # decode: one new token per row
    decode_embed: Callable      # (tokens, cache_lens, wte, wpe) -> x, and cache_lens += 1
    # (x, ln_w, ln_b, w, b, k_cache, v_cache, cache_lens, eps, weight_scale) -> q; writes k, v
    ln_qkv_append: Callable
    ln_linear: Callable         # (x, ln_w, ln_b, w, b, activation, eps, weight_scale) -> y
    # A greedy step's ln_f + lm_head, also writing each row's argmax into tokens: (x, ln_w, ln_b, w,
    # tokens, b, eps, weight_scale) -> logits. None where the backend has no fused one (the runner samples).
    ln_linear_argmax: Callable | None
    decode_attention: Callable  # (q, k_cache, v_cache, cache_lens) -> o
    # before the sampler, in steps whose batch has penalties
    apply_penalties: Callable   # (logits, counts, prompt_mask, last_tokens, rep, pres, freq) -> fp32 logits
    # scoring: the lm_head and log-softmax fused, never (N, vocab) at once
    target_logprobs: Callable   # (hidden (N, C), lm_head (V, C), targets (N,)) -> fp32 (N,) log p, 0 at -100


EAGER = Ops(
    layer_norm=gpt2kernels.layer_norm_ref,
    add_layer_norm=gpt2kernels.add_layer_norm_ref,
    linear=eager_linear,
    gelu_mlp=eager_gelu_mlp,
    attention=eager_attention,
    decode_embed=gpt2kernels.decode_embed_ref,
    ln_qkv_append=eager_ln_qkv_append,
    ln_linear=eager_ln_linear,
    ln_linear_argmax=None,  # the reference keeps the sampler's greedy pass
    decode_attention=eager_decode_attention,
    apply_penalties=gpt2kernels.apply_penalties_ref,
    target_logprobs=eager_target_logprobs,
)

TRITON = Ops(
    layer_norm=gpt2kernels.layer_norm,
    add_layer_norm=gpt2kernels.add_layer_norm,
    linear=gpt2kernels.linear,
    gelu_mlp=gpt2kernels.gelu_mlp,
    attention=gpt2kernels.flash_attention,
    decode_embed=gpt2kernels.decode_embed,
    ln_qkv_append=gpt2kernels.ln_qkv_append,
    ln_linear=gpt2kernels.ln_linear,
    ln_linear_argmax=gpt2kernels.ln_linear_argmax,
    # The cache guarantees q_len <= cache_lens <= max_len: skip the check's host sync.
    decode_attention=functools.partial(gpt2kernels.decode_attention, check_lens=False),
    apply_penalties=gpt2kernels.apply_penalties,
    target_logprobs=functools.partial(_lm_head_logprobs, gpt2kernels.linear_cross_entropy),
)

BACKENDS: dict[str, Ops] = {"eager": EAGER, "triton": TRITON}


def get_backend(name: str) -> Ops:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]
