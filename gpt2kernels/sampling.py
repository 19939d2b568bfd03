"""Next-token sampling: penalties, then temperature, top-k, top-p over the renormalised rest, and min-p.

Semantics (HF's ``generate``, written once here and matched by every implementation):
- penalties (``gpt2kernels.penalties``, before everything else, as HF's logits processors and OpenAI's
  API order them): HF's ``repetition_penalty`` divides the positive logits and multiplies the
  negative ones of every token seen in the prompt or the output; OpenAI's ``frequency_penalty``
  and ``presence_penalty`` subtract ``frequency * count + presence`` from each token generated
  ``count > 0`` times so far.
- ``temperature == 0`` or ``top_k == 1``: argmax, the first index winning ties. So is a row whose
  largest scaled logit (fp32 ``max / temperature``) is not finite: a +inf logit (the first one
  wins), or a temperature so small that the division overflows (its limit is greedy).
- logits are divided by the temperature; ``top_k > 0`` keeps the tokens whose scaled logit is
  >= the k-th largest (ties at the boundary are kept); ``top_k = 0`` disables it.
- ``top_p < 1`` sorts the survivors by probability (descending, stable) and keeps a token when the
  mass strictly before it is < ``top_p``; the top token is always kept; ``top_p = 1`` disables it.
  Among tokens of exactly equal probability straddling the boundary, the lower ids come first and
  are kept; HF's ascending sort keeps the higher ids instead. Only exact ties differ.
- ``min_p > 0`` then also drops every token whose probability is below ``min_p`` times the top
  token's, i.e. whose weight ``exp(scaled - max scaled)`` (float64) is ``< min_p`` (HF's order:
  temperature, top-k, top-p, min-p); ``min_p = 0`` disables it.
- one token is drawn from the renormalised survivors, walked in vocabulary order, with one uniform
  number per row from Philox keyed by the row's seed at counter = the row's offset. A batch run
  gives each row its own ``(seed, offset)`` (a request's seed and the index of the token within
  the request), so a row's draw never depends on its position or its neighbours; a scalar seed
  ``s`` gives row ``r`` the seed ``s + r``. A draw reproduces exactly, and every implementation
  draws the same token from the same input.
- a row holding NaN, or only -inf, is flagged with token -1; the other rows are untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Number

import numpy as np
import torch

from . import _extension
from .sampling_split import sample_split, sample_split_, split_launches, split_max_rows

Param = float | int | torch.Tensor


@dataclass(frozen=True)
class SamplingControl:
    """One sampling control: its name (as ``sample`` and OpenAI's API spell it), the dtype of its
    per-row tensor, the value that turns it off (every entry point's default), the value a free or
    padding row of a decode batch holds (the cheapest valid one), its valid values as an interval
    (for messages; the check itself is ``check_sampling_params`` / ``check_penalties``) and a line of help."""
    name: str
    dtype: torch.dtype
    off: float | int
    free: float | int
    interval: str
    help: str


# Every per-row control the samplers read, in the order of the compiled ops' schema (csrc/, checked
# by a test), of ``sample_unchecked`` and of ``sample_next_``. A new control is a row here, a
# check in ``check_sampling_params`` and its arithmetic in the samplers.
SAMPLING_CONTROLS = (
    SamplingControl("temperature", torch.float32, 1.0, 0.0, "[0, inf)", "0 means greedy"),
    SamplingControl("top_k", torch.int64, 0, 0, "[0, 2^63)", "keep the k likeliest tokens; 0 disables"),
    SamplingControl("top_p", torch.float64, 1.0, 1.0, "(0, 1]", "nucleus mass in (0, 1]; 1 disables"),
    SamplingControl("min_p", torch.float64, 0.0, 0.0, "[0, 1]",
                    "drop tokens below this fraction of the top token's probability; 0 disables"),
)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
INT64_MAX = 2**63 - 1


def check_sampling_params(temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0, min_p: Param = 0.0) -> None:
    """Raise ValueError for a temperature that is negative or not finite, ``top_k < 0``, ``top_p``
    outside (0, 1] or ``min_p`` outside [0, 1]."""
    def values(name, v):
        if isinstance(v, torch.Tensor):
            return v.detach().double().cpu().flatten().tolist()
        if not isinstance(v, Number) or isinstance(v, bool):
            raise ValueError(f"{name} must be a number or a tensor, got {type(v).__name__}")
        return [v if isinstance(v, int) else float(v)]  # an int stays exact (and is shown as given)

    for t in values("temperature", temperature):
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {t}")
        if t > FLOAT32_MAX:  # the samplers divide in fp32
            raise ValueError(f"temperature must be at most {FLOAT32_MAX:.4g} (fp32's largest), got {t}")
    for k in values("top_k", top_k):
        if not 0 <= k <= INT64_MAX or k != int(k):  # also rejects NaN and inf
            raise ValueError(f"top_k must be an integer in [0, 2^63), got {k}")
    for p in values("top_p", top_p):
        if not 0 < p <= 1:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {p}")
    for m in values("min_p", min_p):
        if not 0 <= m <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {m}")


def _mulhilo(a: int, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.uint64(a) * b.astype(np.uint64)
    return (p >> np.uint64(32)).astype(np.uint32), (p & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def uniforms(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row: Philox4x32-10 keyed by ``seed[r]``, counter ``(offset[r], 0)``.

    seed, offset: int64 (B,), read as unsigned 64-bit. Bit-identical to ``philox_uniform`` in
    csrc/philox.h, so the reference and the compiled samplers draw the same token from the same logits.
    """
    seeds = seed.detach().cpu().numpy().astype(np.int64).view(np.uint64)
    offsets = offset.detach().cpu().numpy().astype(np.int64).view(np.uint64)
    low = lambda v: (v & np.uint64(0xFFFFFFFF)).astype(np.uint32)  # noqa: E731
    high = lambda v: (v >> np.uint64(32)).astype(np.uint32)  # noqa: E731
    zeros = np.zeros(len(seeds), np.uint32)
    c = [low(offsets), high(offsets), zeros, zeros]
    k0, k1 = low(seeds), high(seeds)
    for _ in range(10):
        hi0, lo0 = _mulhilo(0xD2511F53, c[0])
        hi1, lo1 = _mulhilo(0xCD9E8D57, c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = k0 + np.uint32(0x9E3779B9), k1 + np.uint32(0xBB67AE85)  # uint32 arithmetic wraps
    bits = ((c[0] >> np.uint32(5)).astype(np.uint64) << np.uint64(26)) | (c[1] >> np.uint32(6)).astype(np.uint64)
    return torch.from_numpy(bits.astype(np.float64) / 2.0**53)


def as_int64(v: int) -> int:
    """An integer read modulo 2^64, as the int64 that holds the same bits."""
    v %= 1 << 64
    return v - (1 << 64) if v >= 1 << 63 else v


def row_seeds(seed: int | torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """int64 (rows,): a (B,) tensor as it is; an int or a one-value tensor ``s`` as ``s + r`` for row r."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() not in (1, rows):
            raise ValueError(f"seed must be an int or an int64 tensor of 1 or {rows} values, "
                             f"got {seed.dtype} {list(seed.shape)}")
        if seed.numel() == rows and seed.dim() == 1:
            return seed.to(device)
        return seed.reshape(()).to(device) + torch.arange(rows, dtype=torch.int64, device=device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or an int64 tensor, got {type(seed).__name__}")
    return torch.tensor([as_int64(seed + r) for r in range(rows)], dtype=torch.int64, device=device)


def row_offsets(offset: int | torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """int64 (rows,): a (B,) tensor as it is, an int or a one-value tensor broadcast to every row."""
    if isinstance(offset, torch.Tensor):
        if offset.dtype != torch.int64 or offset.numel() not in (1, rows):
            raise ValueError(f"offset must be an int or an int64 tensor of 1 or {rows} values, "
                             f"got {offset.dtype} {list(offset.shape)}")
    elif isinstance(offset, bool) or not isinstance(offset, int):
        raise ValueError(f"offset must be an int or an int64 tensor, got {type(offset).__name__}")
    else:
        offset = as_int64(offset)
    return _row_tensor(offset, rows, torch.int64, device)


def row_parameters(rows: int, device: torch.device, temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0,
                   min_p: Param = 0.0) -> tuple[torch.Tensor, ...]:
    """The per-row controls ``sample_unchecked`` takes, in ``SAMPLING_CONTROLS``' order and dtypes,
    each (rows,) on ``device``, from numbers or 1- or rows-value tensors. Unchecked: values are
    checked by ``check_sampling_params``."""
    return tuple(_row_tensor(v, rows, control.dtype, device)
                 for v, control in zip((temperature, top_k, top_p, min_p), SAMPLING_CONTROLS))


def _row_tensor(v: Param, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        if v.numel() not in (1, rows):
            raise ValueError(f"a per-row sampling parameter must have 1 or {rows} values, got shape {list(v.shape)}")
        return v.to(device=device, dtype=dtype).reshape(-1).expand(rows).contiguous()
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


def greedy_ref(logits: torch.Tensor) -> torch.Tensor:
    """Each row's greedy token as every sampler picks it: the first index of the row's maximum, or -1
    for a row holding NaN or only -inf. logits (B, V) float; returns int64 (B,) on their device."""
    bad = torch.isnan(logits).any(-1) | torch.isneginf(logits).all(-1)
    return torch.where(bad, -1, logits.argmax(-1))


def sample_ref(logits: torch.Tensor, temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0,
               seed: int | torch.Tensor = 0, offset: int | torch.Tensor = 0, min_p: Param = 0.0) -> torch.Tensor:
    """Draw one token per row. logits (B, V) fp32/fp16/bf16, rows may be strided.

    temperature, top_k, top_p, min_p: numbers or per-row tensors (B,). seed, offset: see ``sample``.
    Returns int64 (B,) on the logits' device; -1 flags a row of NaN or only -inf.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, V), got {list(logits.shape)}")
    check_sampling_params(temperature, top_k, top_p, min_p)
    rows, vocab = logits.shape
    dev = logits.device
    x = logits.float()
    greedy_tokens = greedy_ref(x)
    bad = greedy_tokens < 0
    temp = _row_tensor(temperature, rows, torch.float32, dev)
    k = _row_tensor(top_k, rows, torch.int64, dev)
    p = _row_tensor(top_p, rows, torch.float64, dev)
    scaled = x / torch.where(temp == 0, 1.0, temp)[:, None]
    greedy = (temp == 0) | (k == 1) | ~torch.isfinite(scaled.max(-1).values)
    if bool(greedy.all()):
        return greedy_tokens

    scaled = torch.where(greedy[:, None], 0.0, scaled)  # greedy rows take argmax; keep inf out of the sums
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
    top = scaled.max(-1, keepdim=True).values.double()
    keep &= torch.exp(vals - top) >= _row_tensor(min_p, rows, torch.float64, dev)[:, None]
    probs = torch.where(keep, probs, 0.0)
    # The draw walks the kept tokens in vocabulary order, as the compiled samplers do.
    by_id = torch.argsort(order, dim=-1)
    order, probs = order.gather(1, by_id), probs.gather(1, by_id)
    cdf = torch.cumsum(probs, dim=-1)
    u = uniforms(row_seeds(seed, rows, dev), row_offsets(offset, rows, dev)).to(dev)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    last = (probs > 0).cumsum(-1).argmax(-1, keepdim=True)  # the last token with probability > 0
    tokens = order.gather(1, torch.minimum(pick, last)).squeeze(1)
    tokens = torch.where(greedy, greedy_tokens, tokens)
    return torch.where(bad, -1, tokens)


def load_extension() -> bool:
    """Load (building once if needed) the compiled sampler now, rather than at the first ``sample``.

    Returns False when it cannot be built; ``sample`` then uses ``sample_ref``.
    """
    return _extension.load()


def prepare_sampler(device: torch.device) -> None:
    """Load the compiled sampler and check it has a kernel for ``device`` (RuntimeError if not):
    what ``sample`` checks every call and ``sample_unchecked`` never does, done once before a loop."""
    if load_extension():
        _extension.check_device(torch.device(device))


def sample(logits: torch.Tensor, temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0,
           seed: int | torch.Tensor = 0, offset: int | torch.Tensor = 0, min_p: Param = 0.0) -> torch.Tensor:
    """Draw one token per row with the compiled sampler: C++ on CPU; on a GPU the split Triton
    sampler (``gpt2kernels.sampling_split``: many programs per row) below as many rows as the GPU
    has SMs, the CUDA one (a thread block per row) from there on.

    Args:
        logits: (B, V) fp32/fp16/bf16, any V >= 1; rows may be strided, even expanded (stride 0).
        temperature, top_k, top_p: numbers, or per-row tensors (B,). 0 temperature or top_k 1 is
            argmax; top_k 0 and top_p 1 disable those filters. Checked before any kernel runs.
        seed: an int or one-value int64 tensor ``s`` (row r draws with seed ``s + r``), or an int64
            (B,) tensor of per-row seeds (a request's own seed, wherever its row is).
        offset: an int or one-value int64 tensor for every row, or int64 (B,) per row: the index of
            the token being drawn within its request. Ints are read modulo 2^64.
        min_p: a number or per-row tensor (B,) in [0, 1]; 0 disables it.
    Returns:
        int64 (B,) on the logits' device; -1 flags a row of NaN or only -inf (other rows untouched).

    Semantics and random numbers are those of ``sample_ref``: same inputs, same tokens.
    Falls back to ``sample_ref`` (with one warning) where the extension cannot be compiled at all;
    raises RuntimeError when it was built without a kernel for the logits' device (a CPU-only
    build, made where nvcc was not found, asked to sample CUDA logits).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a tensor of shape (B, V), got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits has dtype {logits.dtype}, supported: fp32, fp16, bf16")
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one column")
    check_sampling_params(temperature, top_k, top_p, min_p)
    if not load_extension():
        return sample_ref(logits, temperature, top_k, top_p, seed, offset, min_p)
    rows, dev = logits.shape[0], logits.device
    _extension.check_device(dev)
    return sample_unchecked(logits, *row_parameters(rows, dev, temperature, top_k, top_p, min_p),
                            row_seeds(seed, rows, dev), row_offsets(offset, rows, dev))


def _splits(logits: torch.Tensor) -> bool:
    """Whether a batch is small enough for the split sampler (CUDA, fewer rows than the GPU has SMs)."""
    return logits.is_cuda and logits.shape[0] < split_max_rows(logits.device)


def sampler_launches(rows: int, device: torch.device) -> int:
    """Kernels one ``sample_unchecked`` / ``sample_next_`` of ``rows`` rows launches on ``device``:
    the split sampler's stats, rounds and draw on a GPU below its SM count, else one."""
    device = torch.device(device)
    if device.type == "cuda" and rows < split_max_rows(device):
        return split_launches()
    return 1


def sample_unchecked(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``sample`` for a decode loop or a CUDA graph: no checks, no allocation beside the output, no host sync.

    Every parameter is a per-row tensor on the logits' device, already valid (``check_sampling_params``),
    in ``SAMPLING_CONTROLS``' order and dtypes (temperature float32, top_k int64, top_p and min_p
    float64), then seed and offset int64, each (B,). Returns int64 (B,). Where the compiled sampler
    cannot be built, this is ``sample_ref`` (which syncs).
    """
    if _splits(logits):
        return sample_split(logits, temperature, top_k, top_p, min_p, seed, offset)
    return sample_blockwise(logits, temperature, top_k, top_p, min_p, seed, offset)


def sample_blockwise(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``sample_unchecked`` on the compiled sampler whatever the batch size: one thread block per row
    on a GPU (what batches from the SM count up get), the C++ sampler on CPU. Same arguments and
    result as ``sample_unchecked``; for benchmarks and tests that compare the two GPU samplers."""
    if _extension.SAMPLE_OP is None and not load_extension():
        return sample_ref(logits, temperature, top_k, top_p, seed, offset, min_p)
    return _extension.SAMPLE_OP(logits, temperature, top_k, top_p, min_p, seed, offset)


def sample_next_(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor, out: torch.Tensor) -> None:
    """A decode step's sampling as one kernel: ``out[r]`` = row r's token drawn at ``offset[r]``,
    then ``offset[r] += 1`` (the index of the request's next token), both in place.

    Unchecked, like ``sample_unchecked`` (the same per-row parameters, in the same order); ``offset``
    and ``out`` must be contiguous int64 (B,) tensors on the logits' device (the compiled op raises
    otherwise). Where the compiled sampler cannot be built, this is ``sample_ref`` plus two in-place
    updates (and syncs).
    """
    if _splits(logits):
        sample_split_(logits, temperature, top_k, top_p, min_p, seed, offset, out)
        return
    if _extension.SAMPLE_NEXT_OP is None and not load_extension():
        out.copy_(sample_ref(logits, temperature, top_k, top_p, seed, offset, min_p))
        offset += 1
        return
    _extension.SAMPLE_NEXT_OP(logits, temperature, top_k, top_p, min_p, seed, offset, out)
