"""GPT-2 (pre-LN transformer) whose every op goes through the backend's ``Ops`` table.

Prefill and ``forward``: the residual stream is carried beside the normalised activations so that
every residual add is fused with the LayerNorm that follows it (``add_layer_norm``): embeddings ->
ln_1 -> attention -> add+ln_2 -> MLP -> add+ln_1 of the next layer ... -> add+ln_f -> lm_head
(tied to ``wte``). Decode (a few rows, bandwidth- and launch-bound): each LayerNorm runs in the
prologue of the projection after it and each residual add in the epilogue of the one before it,
five kernels a layer (``decode``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .backends import Ops
from .cache import KVCache
from .config import GPT2Config
from .quantize import dequantize

# attend(layer, q, k, v) -> o, all (B, H, T, D)
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Params(nn.Module):
    """Uninitialised parameters (``weight`` and optionally ``bias``) that the ops table computes with.

    Nothing is initialised here: every value comes from a checkpoint through a strict
    ``load_state_dict`` (which also avoids torch's init kernels, slow to trace on the meta device).
    ``scale`` is None, or after ``engine.model.quantize`` the (out,) fp32 scales of an int8 ``weight``.
    """

    def __init__(self, weight_shape: tuple[int, ...], bias_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(weight_shape), requires_grad=False)
        if bias_size is not None:
            self.bias = nn.Parameter(torch.empty(bias_size), requires_grad=False)
        self.register_buffer("scale", None)


def linear(in_features: int, out_features: int) -> Params:
    return Params((out_features, in_features), out_features)  # nn.Linear layout


def layer_norm(width: int) -> Params:
    return Params((width,), width)


class Attention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_attn = linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = linear(config.n_embd, config.n_embd)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = linear(config.n_embd, config.mlp_width)
        self.c_proj = linear(config.mlp_width, config.n_embd)


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = layer_norm(config.n_embd)
        self.attn = Attention(config)
        self.ln_2 = layer_norm(config.n_embd)
        self.mlp = MLP(config)


def decode_layer(ops: Ops, blk: Block, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 cache_lens: torch.Tensor, n_head: int, eps: float) -> torch.Tensor:
    """One block of a decode step in five ops (five kernels on the triton backend).

    x: (B, C) residual stream; k_cache, v_cache: (B, H, max_len, D) views of this layer's cache;
    cache_lens: int32 (B,) lengths including the new token, whose key and value are stored at cache_lens - 1.
    Returns the residual stream after the block, (B, C).
    """
    b, c = x.shape
    attn, mlp = blk.attn, blk.mlp
    q = ops.ln_qkv_append(x, blk.ln_1.weight, blk.ln_1.bias, attn.c_attn.weight, attn.c_attn.bias,
                          k_cache, v_cache, cache_lens, eps, weight_scale=attn.c_attn.scale)
    o = ops.decode_attention(q.view(b, 1, n_head, c // n_head).transpose(1, 2), k_cache, v_cache, cache_lens)
    x = ops.linear(o.transpose(1, 2).reshape(b, c), attn.c_proj.weight, attn.c_proj.bias, residual=x,
                   weight_scale=attn.c_proj.scale)
    h = ops.ln_linear(x, blk.ln_2.weight, blk.ln_2.bias, mlp.c_fc.weight, mlp.c_fc.bias, "gelu_tanh", eps,
                      weight_scale=mlp.c_fc.scale)
    return ops.linear(h, mlp.c_proj.weight, mlp.c_proj.bias, residual=x, weight_scale=mlp.c_proj.scale)


class GPT2(nn.Module):
    """GPT-2 language model. Parameters are named as HF's, with linear weights stored [out, in]."""

    def __init__(self, config: GPT2Config, ops: Ops):
        super().__init__()
        self.config = config
        self.ops = ops
        self.wte = Params((config.vocab_size, config.n_embd))
        self.wpe = Params((config.n_positions, config.n_embd))
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = layer_norm(config.n_embd)
        self.lm_head_weight: torch.Tensor | None = None  # (vocab, C); None means wte itself (tied)
        self.lm_head_scale: torch.Tensor | None = None   # (vocab,) fp32 when lm_head_weight is int8
        self.cpu_step = None  # int8 on CPU: the whole decode step in one call (engine.model.cpu_step)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def _layers(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Hidden states after ln_f. input_ids (B, T) int64; positions (B, T) or (T,). Returns (B, T, C)."""
        ops, cfg, eps = self.ops, self.config, self.config.layer_norm_epsilon
        resid = self.wte.weight[input_ids] + self.wpe.weight[positions]
        b, t, c = resid.shape
        h = ops.layer_norm(resid, self.h[0].ln_1.weight, self.h[0].ln_1.bias, eps)
        next_norms = [blk.ln_1 for blk in self.h[1:]] + [self.ln_f]
        for i, (blk, next_norm) in enumerate(zip(self.h, next_norms)):
            attn, mlp = blk.attn, blk.mlp
            qkv = ops.linear(h, attn.c_attn.weight, attn.c_attn.bias, weight_scale=attn.c_attn.scale)
            q, k, v = qkv.view(b, t, 3, cfg.n_head, cfg.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
            o = attend(i, q, k, v).transpose(1, 2).reshape(b, t, c)
            a = ops.linear(o, attn.c_proj.weight, attn.c_proj.bias, weight_scale=attn.c_proj.scale)
            h, resid = ops.add_layer_norm(a, resid, blk.ln_2.weight, blk.ln_2.bias, eps)
            m = ops.gelu_mlp(h, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias,
                             fc_scale=mlp.c_fc.scale, proj_scale=mlp.c_proj.scale)
            h, resid = ops.add_layer_norm(m, resid, next_norm.weight, next_norm.bias, eps)
        return h

    def _lm_head_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head_weight is None else self.lm_head_weight

    def _lm_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(h, self._lm_head_weight(), weight_scale=self.lm_head_scale)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of every position, no cache. input_ids (B, T) int64 -> (B, T, vocab) in the model dtype."""
        return self._lm_head(self._hidden_states(input_ids))

    def _hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Every position's hidden state after ln_f, no cache. (B, T) int64 -> (B, T, C)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self._layers(input_ids, positions, lambda i, q, k, v: self.ops.attention(q, k, v, causal=True))

    @torch.inference_mode()
    def target_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets[b, t] | input_ids[b, :t + 1]) at every position, no cache; the lm_head and the
        log-softmax run fused (``ops.target_logprobs``), never holding (B, T, vocab) logits.

        input_ids, targets: (B, T) int64; a target of -100 is not scored. Returns fp32 (B, T), 0 there.
        """
        b, t = input_ids.shape
        h = self._hidden_states(input_ids).reshape(b * t, -1)
        return self.ops.target_logprobs(h, self._float_lm_head(), targets.reshape(-1)).view(b, t)

    @torch.inference_mode()
    def prompt_logprobs(self, ids: torch.Tensor, top: int = 0, chunk: int = 256
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """How likely one prompt is, token by token: ``ids`` (T,) int64, T <= n_positions.

        Returns fp32 (T - 1,) log p(ids[t] | ids[:t]) for t = 1 .. T - 1 and, with ``top`` > 0, the
        ``top`` likeliest tokens' log p (fp32) and ids (int64) at each of those positions, (T - 1,
        top) each, likeliest first (empty with ``top`` 0). With ``top`` 0 the lm_head and the
        log-softmax run fused (``target_logprobs``); otherwise on ``chunk`` positions' logits at a
        time, never (T, vocab) of them.
        """
        h = self._hidden_states(ids[None])[0, :-1]
        targets = ids[1:]
        if top == 0:
            empty = torch.zeros(len(targets), 0)
            return self.ops.target_logprobs(h, self._float_lm_head(), targets).float().cpu(), empty, empty.long()
        parts = []
        for start in range(0, len(targets), chunk):
            lp = torch.log_softmax(self._lm_head(h[start:start + chunk]).float(), dim=-1)
            values, top_ids = lp.topk(top, dim=-1)
            parts.append((lp.gather(1, targets[start:start + chunk, None])[:, 0], values, top_ids))
        if not parts:
            return torch.zeros(0), torch.zeros(0, top), torch.zeros(0, top, dtype=torch.int64)
        return tuple(torch.cat([p[i] for p in parts]).cpu() for i in range(3))

    def _float_lm_head(self) -> torch.Tensor:
        """The lm_head in the model dtype: a quantised one (``int8-all``) dequantised for this call."""
        weight = self._lm_head_weight()  # a tensor, or on CPU a PackedInt8Linear (not a tensor, has a dtype)
        return weight if weight.dtype.is_floating_point else dequantize(weight, self.lm_head_scale, self.dtype)

    @torch.no_grad()  # not inference_mode: its tensors cannot be mutated by a torch.compile'd step
    def prefill(self, input_ids: torch.Tensor, prompt_lens: torch.Tensor, cache: KVCache,
                slots: torch.Tensor | None = None) -> torch.Tensor:
        """Run right-padded prompts, fill their cache slots, return each row's next-token logits.

        input_ids (B, T) int64, row b real up to prompt_lens[b] and padded after; prompt_lens int32 (B,) on
        the model device; slots int64 (B,) on the device, or None for slots [0, B). Writes positions
        [0, T) of those slots and sets their lengths. Returns (B, vocab) in the model dtype.
        """
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device)

        def attend(i, q, k, v):
            cache.write_prompt(i, k, v, slots)
            return self.ops.attention(q, k, v, causal=True)

        h = self._layers(input_ids, positions, attend)
        cache.set_lengths(prompt_lens, slots)
        return self._lm_head(h[torch.arange(b, device=h.device), prompt_lens.long() - 1])

    @property
    def fuses_greedy(self) -> bool:
        """Whether ``decode`` can pick greedy tokens in its lm_head kernel (``greedy_into``)."""
        return self.cpu_step is None and self.ops.ln_linear_argmax is not None

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: KVCache, kv_len: int | None = None,
               greedy_into: torch.Tensor | None = None) -> torch.Tensor:
        """One step for slots [0, B): append ``tokens`` (B,) int64 at each slot's length, return logits (B, vocab).

        kv_len: attend over (and write into) only the cache's first ``kv_len`` positions, which must
        hold every slot's new length; None: the whole cache.
        greedy_into: int64 (B,) (``tokens`` itself in a decode loop) that the lm_head kernel fills
        with each row's greedy token (``gpt2kernels.ln_linear_argmax``: the sampler's argmax, -1 for
        a row of NaN), where ``fuses_greedy``; None: only the logits.

        Five ops a layer, each one kernel on the triton backend: LayerNorm + QKV projection + cache
        write; attention; c_proj + residual; LayerNorm + c_fc + GELU; MLP c_proj + residual. Around
        them: the embedding (which advances the slots' lengths) and ln_f + lm_head. Attention reads
        the whole static cache bounded by each slot's length on the device, so every step launches
        the same kernels on the same shapes with no host sync (a CUDA graph can replay it);
        positions past a length are never attended.

        A model quantised on CPU runs the whole step in one C++ call instead (``cpu_step``).
        """
        if greedy_into is not None and not self.fuses_greedy:
            raise ValueError("greedy_into needs a model whose lm_head kernel picks greedy tokens (fuses_greedy)")
        if self.cpu_step is not None:
            out = self.cpu_step(tokens, cache)
            return out if self.cpu_step.head else self._lm_head(out)
        ops, cfg, eps = self.ops, self.config, self.config.layer_norm_epsilon
        b = tokens.shape[0]
        cache_lens = cache.cache_lens[:b]
        x = ops.decode_embed(tokens, cache_lens, self.wte.weight, self.wpe.weight)  # now counting the new token
        for i, blk in enumerate(self.h):
            x = decode_layer(ops, blk, x, *cache.layer(i, b, kv_len), cache_lens, cfg.n_head, eps)
        if greedy_into is not None:
            return ops.ln_linear_argmax(x, self.ln_f.weight, self.ln_f.bias, self._lm_head_weight(), greedy_into,
                                        None, eps, weight_scale=self.lm_head_scale)
        return ops.ln_linear(x, self.ln_f.weight, self.ln_f.bias, self._lm_head_weight(), None, None, eps,
                             weight_scale=self.lm_head_scale)
