"""gpt2kernels.ln_linear_argmax: a greedy step's lm_head picks each row's token in its epilogue.

The tokens must be what the sampler picks at temperature 0 (``greedy_ref``: the first index of the
maximum, -1 for a row of NaN or only -inf) whichever kernel runs: the batch-1 GEMV, the tiled
decode tiles with and without split-K, and a 64-row tile.
"""

import importlib

import pytest
import torch
from torch.library import opcheck

import gpt2kernels
from gpt2kernels._ops import NS, arrival_counters
from gpt2kernels.gemv import gemv_applies, gemv_config
from gpt2kernels.linear import gemm_config
from gpt2kernels.sampling import greedy_ref

from .helpers import poison_empty

# (M, N, K): the GEMV over gpt2's vocabulary (fp16 only: 7-14 s interpreted) and an odd width; tiled
# decode tiles with split-K (3 rows, K = 1600) and without (5 rows); 17 rows (a 64-row tile).
SHAPES = [(1, 4231, 96), (3, 200, 1600), (5, 4231, 96), (17, 1000, 64)]
# bf16 (8-bit mantissas: many exact ties after rounding) in the GEMV only: the tiled kernel's bf16 tl.dot is
# wrong in the interpreter (GPU_READINESS.md).
CASES = [(*s, d) for s in SHAPES for d in (torch.float32, torch.float16)] + [(1, 50257, 64, torch.float16),
                                                                              (1, 4231, 96, torch.bfloat16)]


def _inputs(m, n, k, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = 1.0 + torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    ln_w, ln_b = 1 + 0.3 * torch.randn(k, generator=g), 0.3 * torch.randn(k, generator=g)
    bias = 0.1 * torch.randn(n, generator=g)
    return [t.to(device, dtype) for t in (x, w, ln_w, ln_b, bias)]


def _garbage(m, device):
    return torch.full((m,), -7, dtype=torch.int64, device=device)


@pytest.mark.parametrize("m,n,k,dtype", CASES)
def test_tokens_are_the_greedy_samplers(m, n, k, dtype, device, monkeypatch):
    x, w, ln_w, ln_b, bias = _inputs(m, n, k, dtype, device, seed=m + n + k)
    tokens = _garbage(m, device)
    poison_empty(monkeypatch)  # the partials start as NaN: one left unwritten would flag its row -1
    logits = gpt2kernels.ln_linear_argmax(x, ln_w, ln_b, w, tokens, bias)
    assert torch.equal(logits, gpt2kernels.ln_linear(x, ln_w, ln_b, w, bias))  # the same kernel's logits
    assert torch.equal(tokens, greedy_ref(logits)) and bool((tokens >= 0).all())
    assert torch.equal(tokens, gpt2kernels.sample(logits, temperature=0.0))  # the compiled sampler agrees
    ref_tokens = _garbage(m, device)
    gpt2kernels.ln_linear_argmax_ref(x.double(), ln_w.double(), ln_b.double(), w.double(), ref_tokens, bias.double())
    # Against float64 only where the rounded maximum is not a near-tie.
    top2 = logits.float().topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * torch.finfo(dtype).eps * top2[:, 0].abs()
    assert torch.equal(tokens[clear], ref_tokens[clear])


def test_every_kernel_path_is_exercised():
    assert gemv_applies(1, 96, torch.float32, norm=True)
    assert gemm_config(3, 200, 1600, torch.float32, sms=132).split_k > 1
    assert gemm_config(5, 4231, 96, torch.float32, sms=132).split_k == 1
    assert gemm_config(17, 1000, 64, torch.float16, sms=132).block_m == 64


@pytest.mark.parametrize("m", [1, 5])
def test_partials_reduced_in_several_steps(m, device, monkeypatch):
    """The last program walks the partials in column order, a block at a time (at gpt2's lm_head: 7
    steps in the GEMV): here in blocks of 16, so at least 4 steps for the GEMV's programs and the
    tiled kernel's column tiles, with the maximum placed in a late block and tied in an early one."""
    n, k = 4231, 96
    monkeypatch.setattr(importlib.import_module("gpt2kernels.gemv"), "ARGMAX_REDUCE", 16)
    monkeypatch.setattr(importlib.import_module("gpt2kernels.linear"), "ARGMAX_PARTIALS", 16 * 16)
    block_n = gemv_config(n, k, torch.float32, 132)[0] if m == 1 else gemm_config(m, n, k, torch.float32, 132).block_n
    assert -(-n // block_n) > 4 * 16
    x, w, ln_w, ln_b, bias = _inputs(m, n, k, torch.float32, device, seed=9)
    tokens = _garbage(m, device)
    logits = gpt2kernels.ln_linear_argmax(x, ln_w, ln_b, w, tokens, bias)
    assert torch.equal(tokens, greedy_ref(logits))
    w[[4000, 100]], bias[[4000, 100]] = 0.0, 50.0
    gpt2kernels.ln_linear_argmax(x, ln_w, ln_b, w, tokens, bias)
    assert tokens.tolist() == [100] * m
    bias[100] = 49.0
    gpt2kernels.ln_linear_argmax(x, ln_w, ln_b, w, tokens, bias)
    assert tokens.tolist() == [4000] * m


@pytest.mark.parametrize("m,n,k", [(1, 4231, 96), (3, 200, 1600), (5, 4231, 96)])
def test_ties_nan_and_infinities(m, n, k, device):
    """Exact ties (equal biases on zero weight rows, within one program's columns and across
    programs) go to the lowest id; a row holding NaN, or only -inf, gets -1 and leaves the other
    rows alone; +inf wins."""
    x, w, ln_w, ln_b, bias = _inputs(m, n, k, torch.float32, device, seed=n)
    w[[n - 1, 8, 7, n // 2]] = 0.0
    bias[[n - 1, 8, 7, n // 2]] = 50.0  # far above every other logit: four tied maxima
    tokens = _garbage(m, device)
    gpt2kernels.ln_linear_argmax(x, ln_w, ln_b, w, tokens, bias)
    assert tokens.tolist() == [7] * m
    if m > 1:
        x[1, 3] = float("nan")  # row 1's LayerNorm, so all its logits, are NaN
    gpt2kernels.ln_linear_argmax(x, ln_w, ln_b, w, tokens, bias)
    assert tokens.tolist() == ([7, -1] + [7] * (m - 2) if m > 1 else [7])
    bias[n // 2] = float("inf")
    gpt2kernels.ln_linear_argmax(x, ln_w, ln_b, w, tokens, bias)
    assert tokens.tolist() == ([n // 2, -1] + [n // 2] * (m - 2) if m > 1 else [n // 2])
    tokens = _garbage(m, device)
    gpt2kernels.ln_linear_argmax(x, ln_w, ln_b, w, tokens, torch.full_like(bias, float("-inf")))
    assert tokens.tolist() == [-1] * m
    w[5, 0] = float("nan")  # one NaN logit in every row
    gpt2kernels.ln_linear_argmax(x, ln_w, ln_b, w, tokens, bias)
    assert tokens.tolist() == [-1] * m


def test_counters_are_left_at_zero_for_the_next_launch(device):
    """Each launch re-arms the arrival counters it used: the next greedy launch (and any split-K
    linear sharing them) finds them at zero, so a replayed CUDA graph picks again."""
    counters = arrival_counters(device, 4096)
    for m, n, k in [(1, 4231, 96), (3, 200, 1600)]:
        x, w, ln_w, ln_b, bias = _inputs(m, n, k, torch.float32, device, seed=1)
        for i in range(2):
            tokens = _garbage(m, device)
            x[:, 0] += i  # other inputs, other tokens: nothing carried over
            logits = gpt2kernels.ln_linear_argmax(x, ln_w, ln_b, w, tokens, bias)
            assert torch.equal(tokens, greedy_ref(logits))
            assert not counters.any()


@pytest.mark.parametrize("m", [1, 3])
def test_strided_inputs(m, device):
    """x a strided view, the weight in HF's Conv1D layout seen transposed ((N, K) with strides (1, N))."""
    x, w, ln_w, ln_b, bias = _inputs(m, 300, 96, torch.float32, device, seed=8)
    x_strided = torch.stack([x, torch.full_like(x, float("nan"))], dim=2)[:, :, 0]  # every other element
    w_conv1d = w.t().contiguous().t()
    assert not x_strided.is_contiguous() and w_conv1d.stride() == (1, 300)
    tokens = _garbage(m, device)
    logits = gpt2kernels.ln_linear_argmax(x_strided, ln_w, ln_b, w_conv1d, tokens, bias)
    assert torch.equal(tokens, greedy_ref(logits))
    torch.testing.assert_close(logits, gpt2kernels.ln_linear_ref(x, ln_w, ln_b, w, bias), atol=2e-5, rtol=2e-5)


def test_int8_weights(device):
    x, w, ln_w, ln_b, _ = _inputs(1, 4231, 96, torch.float16, device, seed=4)
    q, scale = gpt2kernels.quantize_int8(w.float())
    tokens = _garbage(1, device)
    logits = gpt2kernels.ln_linear_argmax(x, ln_w, ln_b, q, tokens, weight_scale=scale)
    assert torch.equal(logits, gpt2kernels.ln_linear(x, ln_w, ln_b, q, weight_scale=scale))
    assert torch.equal(tokens, greedy_ref(logits))


def test_bad_tokens_buffer_is_named(device):
    x, w, ln_w, ln_b, _ = _inputs(2, 40, 32, torch.float32, device, seed=2)
    for tokens, match in [(torch.zeros(2, dtype=torch.int32, device=device), "tokens has dtype torch.int32"),
                          (torch.zeros(3, dtype=torch.int64, device=device), r"tokens has shape \[3\]"),
                          (torch.zeros(4, dtype=torch.int64, device=device)[::2], "tokens must be contiguous")]:
        with pytest.raises(ValueError, match=match):
            gpt2kernels.ln_linear_argmax(x, ln_w, ln_b, w, tokens)
    with pytest.raises(ValueError, match="one row per token"):
        gpt2kernels.ln_linear_argmax(x[None], ln_w, ln_b, w, torch.zeros(2, dtype=torch.int64, device=device))


def test_opcheck_and_no_gradient(device):
    x, w, ln_w, ln_b, bias = _inputs(1, 40, 32, torch.float32, device, seed=3)
    tokens = _garbage(1, device)
    opcheck(getattr(torch.ops, NS).ln_linear_argmax.default, (x, ln_w, ln_b, w, tokens, bias))
    with pytest.raises(RuntimeError, match="ln_linear_argmax is inference-only"):
        gpt2kernels.ln_linear_argmax(x, ln_w, ln_b, w.requires_grad_(), tokens)
