"""gpt2kernels.decode_embed: a decode step's embedding lookup, which also advances each row's length."""

import pytest
import torch
from torch.library import opcheck

import gpt2kernels
from gpt2kernels._ops import NS

from .helpers import poison_empty

# The interpreter casts fp32 to bf16 by truncation (seen with Triton 3.9), not to nearest: bf16 on a GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _tables(v, p, c, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(v, c, generator=g).to(device, dtype), torch.randn(p, c, generator=g).to(device, dtype))


@pytest.mark.parametrize("b,c", [(1, 96), (3, 1600), (16, 769)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_embed(b, c, dtype, device, monkeypatch):
    wte, wpe = _tables(1000, 64, c, dtype, device, seed=b + c)
    g = torch.Generator().manual_seed(c)
    tokens = torch.randint(0, 1000, (b,), generator=g).to(device)
    lens = torch.randint(0, 64, (b,), generator=g, dtype=torch.int32).to(device)
    want = (wte[tokens].double() + wpe[lens.long()].double()).to(dtype)  # one rounding of the exact sum
    before = lens.clone()
    poison_empty(monkeypatch)
    got = gpt2kernels.decode_embed(tokens, lens, wte, wpe)
    assert torch.equal(got, want)
    assert torch.equal(lens, before + 1)


def test_reference_agrees_and_out_of_range_is_clamped(device):
    """A NaN row's flag (-1) or a length at the table's end never reads out of bounds."""
    wte, wpe = _tables(50, 8, 96, torch.float32, device)
    tokens = torch.tensor([-1, 49, 10**6], device=device)
    lens = torch.tensor([0, 8, 100], dtype=torch.int32, device=device)
    lens_ref = lens.clone()
    got = gpt2kernels.decode_embed(tokens, lens, wte, wpe)
    want = gpt2kernels.decode_embed_ref(tokens, lens_ref, wte, wpe)
    assert torch.equal(got, want) and torch.equal(lens, lens_ref)
    assert torch.equal(got[0], wte[0] + wpe[0]) and torch.equal(got[2], wte[49] + wpe[7])


def test_opcheck_and_bad_input(device):
    wte, wpe = _tables(50, 8, 96, torch.float32, device)
    tokens, lens = torch.tensor([1, 2], device=device), torch.tensor([3, 4], dtype=torch.int32, device=device)
    opcheck(getattr(torch.ops, NS).decode_embed.default, (tokens, lens, wte, wpe))
    with pytest.raises(ValueError, match="lens has dtype torch.int64"):
        gpt2kernels.decode_embed(tokens, lens.long(), wte, wpe)
    with pytest.raises(ValueError, match=r"lens has shape \[1\], expected \[2\]"):
        gpt2kernels.decode_embed(tokens, lens[:1], wte, wpe)
    with pytest.raises(ValueError, match=r"must be non-empty \(rows, C\) tables of one width"):
        gpt2kernels.decode_embed(tokens, lens, wte, wpe[:, :5])
