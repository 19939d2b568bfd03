"""Next-token sampling: temperature, then top-k, then top-p over the renormalised rest.

Semantics (HF's ``generate``, written once here and matched by every implementation):
- ``temperature == 0`` or ``top_k == 1``: argmax, the first index winning ties.
- logits are divided by the temperature; ``top_k > 0`` keeps the tokens whose scaled logit is
  >= the k-th largest (ties at the boundary are kept); ``top_k = 0`` disables it.
- ``top_p < 1`` sorts the survivors by probability (descending, stable) and keeps a token when the
  mass strictly before it is < ``top_p``; the top token is always kept; ``top_p = 1`` disables it.
- one token is drawn from the renormalised survivors with one uniform number per row, keyed by
  ``(seed, offset, row)``: rows are independent and a draw reproduces exactly.
- a row holding NaN, or only -inf, is flagged with token -1; the other rows are untouched.
"""

from __future__ import annotations

import math
from numbers import Number

import torch

Param = float | int | torch.Tensor


def check_sampling_params(temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0) -> None:
    """Raise ValueError for a temperature that is negative or not finite, ``top_k < 0`` or ``top_p`` outside (0, 1]."""
    def values(name, v):
        if isinstance(v, torch.Tensor):
            return v.detach().double().cpu().flatten().tolist()
        if not isinstance(v, Number) or isinstance(v, bool):
            raise ValueError(f"{name} must be a number or a tensor, got {type(v).__name__}")
        return [float(v)]

    for t in values("temperature", temperature):
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {t}")
    for k in values("top_k", top_k):
        if k < 0 or k != int(k):
            raise ValueError(f"top_k must be an integer >= 0, got {k}")
    for p in values("top_p", top_p):
        if not 0 < p <= 1:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {p}")


def uniforms(seed: int | torch.Tensor, offset: int | torch.Tensor, rows: int) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row, a pure function of (seed, offset, row)."""
    seed, offset = int(seed), int(offset)
    key = (seed * 0x9E3779B97F4A7C15 + offset * 0xBF58476D1CE4E5B9) % (1 << 63)
    return torch.rand(rows, generator=torch.Generator().manual_seed(key), dtype=torch.float64)


def _per_row(v: Param, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=dtype).expand(rows)
    return torch.full((rows,), v, dtype=dtype, device=device)


CANDIDATES = 1024  # sort only this many top tokens when that provably holds every survivor


def _sorted_candidates(scaled: torch.Tensor, k_eff: torch.Tensor, p: torch.Tensor,
                       top_k_binds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, token ids), each (B, n), descending with ties by ascending id, holding every token
    that top-k/top-p can keep. A full sort costs ~6 ms per 50257-wide row on CPU; top-n is much less."""
    rows, vocab = scaled.shape
    if not bool(top_k_binds.any()) and bool((p >= 1).all()):
        return scaled, torch.arange(vocab, device=scaled.device).expand(rows, vocab)  # keeps all: no order needed
    n = min(vocab, max(CANDIDATES, int(torch.where(top_k_binds, k_eff, 0).max())))
    if n < vocab:
        vals, ids = torch.topk(scaled, n, dim=-1)
        by_id = torch.argsort(ids, dim=-1)
        vals, ids = vals.gather(1, by_id), ids.gather(1, by_id)
        by_val = torch.argsort(vals, dim=-1, descending=True, stable=True)
        vals, ids = vals.gather(1, by_val), ids.gather(1, by_val)
        kth = vals.gather(1, (k_eff.clamp(max=n) - 1)[:, None])
        ties_inside = (scaled >= kth).sum(-1) <= n  # every token tied with the k-th is a candidate
        lse = torch.logsumexp(scaled.double(), dim=-1, keepdim=True)
        mass_reaches_p = torch.exp(vals.double() - lse).sum(-1) >= p  # the first non-candidate is cut by top-p
        if bool(torch.where(top_k_binds, ties_inside, mass_reaches_p).all()):
            return vals, ids
    return torch.sort(scaled, dim=-1, descending=True, stable=True)


def sample_ref(logits: torch.Tensor, temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0,
               seed: int | torch.Tensor = 0, offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Draw one token per row. logits (B, V) fp32/fp16/bf16, rows may be strided.

    temperature, top_k, top_p: numbers or per-row tensors (B,). Returns int64 (B,) on the logits'
    device; -1 flags a row of NaN or only -inf.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, V), got {list(logits.shape)}")
    check_sampling_params(temperature, top_k, top_p)
    rows, vocab = logits.shape
    dev = logits.device
    x = logits.float()
    bad = torch.isnan(x).any(-1) | torch.isneginf(x).all(-1)
    greedy_tokens = x.argmax(-1)
    temp = _per_row(temperature, rows, torch.float32, dev)
    k = _per_row(top_k, rows, torch.int64, dev)
    p = _per_row(top_p, rows, torch.float64, dev)
    greedy = (temp == 0) | (k == 1)
    if bool(greedy.all()):
        return torch.where(bad, -1, greedy_tokens)

    scaled = x / torch.where(greedy, 1.0, temp)[:, None]
    k_eff = torch.where(k > 0, k.clamp(max=vocab), vocab)
    binds = k_eff < vocab
    vals, order = _sorted_candidates(scaled, k_eff, p, binds)
    kth = vals.gather(1, (k_eff.clamp(max=vals.shape[1]) - 1)[:, None])
    vals = torch.where(binds[:, None] & (vals < kth), -math.inf, vals.double())
    # Probabilities over the whole vocabulary, or over the top-k survivors where top-k binds.
    lse = torch.where(binds, torch.logsumexp(vals, -1), torch.logsumexp(scaled.double(), -1))
    probs = torch.exp(vals - lse[:, None])
    before = torch.cumsum(probs, dim=-1) - probs
    keep = (before < p[:, None]) | (p[:, None] >= 1)
    keep[:, 0] = True
    probs = torch.where(keep, probs, 0.0)
    cdf = torch.cumsum(probs, dim=-1)
    u = uniforms(seed, offset, rows).to(dev)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    last = (probs > 0).cumsum(-1).argmax(-1, keepdim=True)  # the last token with probability > 0
    tokens = order.gather(1, torch.minimum(pick, last)).squeeze(1)
    tokens = torch.where(greedy, greedy_tokens, tokens)
    return torch.where(bad, -1, tokens)
