"""The fused int8 CPU decode step: a quantised eager model's whole decode step in one C++ call.

On CPU at batch 1 the op-by-op step spent about as long dispatching its ~150 PyTorch ops as
streaming its weights; ``gpt2kernels.cpu_decode.Int8Decoder`` runs embedding, blocks, ln_f and
(with ``int8-all``) the lm_head in one call over weights it packs once here, at load. The model's
``decode`` takes it whenever the model has one (``GPT2.cpu_step``); prefill and scoring keep the
op-by-op path (fbgemm's GEMM, faster on many rows).

It needs the compiled extension and fp32 activations (int8's CPU default); ``GPT2ENGINE_CPU_STEP=0``
turns it off (the op-by-op step, for comparisons).
"""

from __future__ import annotations

import os

import torch

from gpt2kernels import cpu_decode

from .cache import KVCache

LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def enabled() -> bool:
    """Whether loads may build the fused step (not turned off by ``GPT2ENGINE_CPU_STEP=0``)."""
    return os.environ.get("GPT2ENGINE_CPU_STEP", "1") != "0"


class CpuInt8Step:
    """A model's decode step in one call; ``head``: whether it computes the (int8) lm_head too."""

    def __init__(self, decoder: cpu_decode.Int8Decoder, head: bool):
        self.decoder = decoder
        self.head = head

    @property
    def isa(self) -> str:
        return self.decoder.isa

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append ``tokens`` (B,) int64 for slots [0, B) and return fp32 (B, vocab) logits, or with
        no head (B, C) hidden states after ln_f."""
        out = torch.empty(tokens.shape[0], self.decoder.width)
        return self.decoder.step(tokens, cache.cache_lens, cache.k, cache.v, out)


def build(model, int8: dict[str, tuple[torch.Tensor, torch.Tensor]], head: tuple[torch.Tensor, torch.Tensor] | None,
          isa: str | None = None) -> CpuInt8Step | None:
    """The fused step of a model quantised on CPU, or None where it cannot run (no extension, or
    activations other than fp32, which the step computes in).

    int8: ``h.{i}.{linear}`` (``LINEARS``) -> (int8 (N, K) weight, fp32 (N,) scale); head: the
    lm_head's (int8 (vocab, C), fp32 (vocab,)) or None (``int8``: the float head stays in PyTorch).
    """
    if not enabled() or model.dtype != torch.float32 or not cpu_decode.available():
        return None
    blocks = []
    for i, blk in enumerate(model.h):
        block = {"ln_1.weight": blk.ln_1.weight, "ln_1.bias": blk.ln_1.bias,
                 "ln_2.weight": blk.ln_2.weight, "ln_2.bias": blk.ln_2.bias}
        for name in LINEARS:
            q, scale = int8[f"h.{i}.{name}"]
            block[name] = (q, scale, blk.get_submodule(name).bias)
        blocks.append(block)
    decoder = cpu_decode.Int8Decoder(model.wte.weight, model.wpe.weight, blocks, (model.ln_f.weight, model.ln_f.bias),
                                     head, model.config.n_head, model.config.layer_norm_epsilon, isa)
    return CpuInt8Step(decoder, head is not None)
