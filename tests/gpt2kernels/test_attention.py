"""gpt2kernels.flash_attention / decode_attention against a float64 reference with an explicit mask."""

import math

import pytest
import torch
from torch.library import opcheck

import gpt2kernels
from gpt2kernels._ops import NS

from .helpers import assert_close_to, poison_empty

# interpreter: no bf16 tl.dot
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _reference(q, k, v, visible):
    """float64 softmax(q k^T / sqrt(D) + mask) v with an explicit boolean mask (B or 1, 1, Tq, Tk)."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~visible, -math.inf), -1) @ v


def _causal_mask(tq, tk, device):
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return (j <= i + tk - tq)[None, None]


def _rand(shape, dtype, device, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@pytest.mark.parametrize("t", [1, 2, 17, 77, 130])
@pytest.mark.parametrize("d", [32, 64, 80])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_causal(t, d, dtype, device, monkeypatch):
    q, k, v = (_rand((2, 3, t, d), dtype, device, seed=t * d + i) for i in range(3))
    want = _reference(q, k, v, _causal_mask(t, t, device))
    poison_empty(monkeypatch)
    assert_close_to(gpt2kernels.flash_attention(q, k, v, causal=True), want, TOL[dtype])


@pytest.mark.parametrize("tq,tk", [(1, 50), (5, 77), (33, 130)])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_fewer_queries_than_keys(tq, tk, causal, device):
    dtype = torch.float16
    q = _rand((1, 2, tq, 64), dtype, device, 1)
    k, v = _rand((1, 2, tk, 64), dtype, device, 2), _rand((1, 2, tk, 64), dtype, device, 3)
    mask = _causal_mask(tq, tk, device) if causal else torch.ones(1, 1, tq, tk, dtype=torch.bool, device=device)
    assert_close_to(gpt2kernels.flash_attention(q, k, v, causal=causal), _reference(q, k, v, mask), TOL[dtype])


def test_prefill_on_strided_views_of_fused_qkv(device):
    """The runtime's layout: q, k, v are permuted views of one (B, T, 3, H, D) projection."""
    b, t, h, d = 2, 19, 3, 32
    qkv = _rand((b, t, 3 * h * d), torch.float16, device, 4)
    q, k, v = qkv.view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)
    o = gpt2kernels.flash_attention(q, k, v)
    assert_close_to(o, _reference(q, k, v, _causal_mask(t, t, device)), TOL[torch.float16])
    assert o.transpose(1, 2).is_contiguous()  # so the caller's reshape to (B, T, H * D) is free


def _decode_case(lens, lq, d, dtype, device, max_len=64, seed=0):
    b, h = len(lens), 2
    q = _rand((b, h, lq, d), dtype, device, seed)
    k = _rand((b, h, max_len, d), dtype, device, seed + 1)
    v = _rand((b, h, max_len, d), dtype, device, seed + 2)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    slot = torch.arange(max_len, device=device)
    last_key = lens_t.view(-1, 1, 1, 1) - lq + torch.arange(lq, device=device).view(1, 1, lq, 1)
    visible = slot.view(1, 1, 1, -1) <= last_key  # (B, 1, Lq, max_len)
    want = _reference(q, k, v, visible)
    for cache in (k, v):  # poison every slot at or past each row's length: it must never be read
        cache.masked_fill_((slot[None, :] >= lens_t[:, None])[:, None, :, None], float("nan"))
    return q, k, v, lens_t, want


@pytest.mark.parametrize("lens", [[1], [50, 1, 64], [7, 64, 33, 2]])
@pytest.mark.parametrize("d", [32, 64, 80])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_ragged_lengths_never_reads_past_them(lens, d, dtype, device, monkeypatch):
    q, k, v, lens_t, want = _decode_case(lens, 1, d, dtype, device, seed=sum(lens) + d)
    poison_empty(monkeypatch)
    assert_close_to(gpt2kernels.decode_attention(q, k, v, lens_t), want, TOL[dtype])


@pytest.mark.parametrize("lq", [2, 5])
def test_decode_several_queries_causal_inside(lq, device):
    q, k, v, lens_t, want = _decode_case([9, 40, 64], lq, 64, torch.float16, device, seed=lq)
    assert_close_to(gpt2kernels.decode_attention(q, k, v, lens_t), want, TOL[torch.float16])


def test_decode_many_splits(device):
    """A long cache with B*H = 2 is cut into splits; all but the first empty for the short row. The
    row's last split to finish combines them, the same bits every run, and re-arms its counter.
    (The other tests' caches are short: one split, written without partials.)"""
    from gpt2kernels._ops import arrival_counters

    q, k, v, lens_t, want = _decode_case([1000, 3], 1, 64, torch.float16, device, max_len=1024)
    assert gpt2kernels.attention.decode_splits(2 * 2, 1024, 132) == 4
    first = gpt2kernels.decode_attention(q, k, v, lens_t)
    assert_close_to(first, want, TOL[torch.float16])
    assert torch.equal(first, gpt2kernels.decode_attention(q, k, v, lens_t))
    assert not arrival_counters(device, 4096).any()


def test_decode_split_rule_is_the_measured_one():
    """One program per row up to 256 positions, then 4 splits (the best on an H200 at 512-1024
    positions, batch 1 and 8); batch 64 of gpt2 stays at one (its rows alone fill the GPU)."""
    splits = gpt2kernels.attention.decode_splits
    assert [splits(12, n, 132) for n in (64, 256, 512, 768, 1024)] == [1, 1, 4, 4, 4]
    assert splits(8 * 25, 1024, 132) == 4 and splits(64 * 12, 1024, 132) == 1


def test_decode_equals_prefill_last_row(device):
    t, d = 37, 64
    q, k, v = (_rand((1, 4, t, d), torch.float32, device, 20 + i) for i in range(3))
    full = gpt2kernels.flash_attention(q, k, v)
    lens = torch.tensor([t], dtype=torch.int32, device=device)
    step = gpt2kernels.decode_attention(q[:, :, -1:], k, v, lens)
    torch.testing.assert_close(step, full[:, :, -1:], atol=1e-5, rtol=1e-5)


def test_deterministic(device):
    q, k, v, lens_t, _ = _decode_case([50, 64], 1, 64, torch.float16, device)
    first = gpt2kernels.decode_attention(q, k, v, lens_t)
    assert all(torch.equal(first, gpt2kernels.decode_attention(q, k, v, lens_t)) for _ in range(3))


def test_opcheck(device):
    q, k, v = (_rand((1, 2, 5, 32), torch.float32, device, i) for i in range(3))
    opcheck(getattr(torch.ops, NS).flash_attention.default, (q, k, v, True, None))
    lens = torch.tensor([5], dtype=torch.int32, device=device)
    opcheck(getattr(torch.ops, NS).decode_attention.default, (q[:, :, -1:], k, v, lens, None, False))


@pytest.mark.parametrize("call,match", [
    (lambda q, k, v, lens: gpt2kernels.flash_attention(q, k[:, :1], v), r"k \[2, 1, 8, 32\]"),
    (lambda q, k, v, lens: gpt2kernels.flash_attention(q[..., :0], k[..., :0], v[..., :0]), "head dim D = 0"),
    (lambda q, k, v, lens: gpt2kernels.flash_attention(_rand((2, 2, 8, 256), torch.float32, "cpu", 0).to(q.device),
                                                _rand((2, 2, 8, 256), torch.float32, "cpu", 1).to(q.device),
                                                _rand((2, 2, 8, 256), torch.float32, "cpu", 2).to(q.device)),
     "D = 256"),
    (lambda q, k, v, lens: gpt2kernels.flash_attention(q, k[:, :, :4], v[:, :, :4]), "Tq <= Tk"),
    (lambda q, k, v, lens: gpt2kernels.flash_attention(q, k.half(), v), "k has dtype torch.float16"),
    (lambda q, k, v, lens: gpt2kernels.decode_attention(q[:, :, :1], k, v, lens + 1),
     r"cache_lens must be in .* = \[1, 8\]"),
    (lambda q, k, v, lens: gpt2kernels.decode_attention(q[:, :, :1], k, v, lens * 0),
     r"cache_lens must be in .* = \[1, 8\]"),
    (lambda q, k, v, lens: gpt2kernels.decode_attention(q[:, :, :1], k, v, lens.long()),
     "cache_lens has dtype torch.int64"),
    (lambda q, k, v, lens: gpt2kernels.decode_attention(q[:, :, :1], k, v, lens[:1]),
     r"cache_lens has shape \[1\], expected \[2\]"),
    (lambda q, k, v, lens: gpt2kernels.decode_attention(torch.cat([q] * 3, 2), k, v, lens), "1 to 16 queries"),
])
def test_bad_input(call, match, device):
    q, k, v = (_rand((2, 2, 8, 32), torch.float32, device, i) for i in range(3))
    lens = torch.tensor([8, 8], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=match):
        call(q, k, v, lens)
