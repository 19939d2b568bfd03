"""gpt2kernels.layer_norm / add_layer_norm against a float64 reference."""

import pytest
import torch
from torch.library import opcheck

import gpt2kernels
from gpt2kernels._ops import NS

from .helpers import assert_close_to, poison_empty
from gpt2kernels.layernorm import _layer_norm_launch, add_layer_norm_ref, layer_norm_ref

WIDTHS = [1, 7, 768, 1023, 1600, 4231]
ROWS = [1, 3, 37]  # one row, and primes
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _inputs(m, n, dtype, device, seed, mean=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (mean + scale * torch.randn(m, n, generator=g)).to(device, dtype)
    r = (0.5 * torch.randn(m, n, generator=g)).to(device, dtype)
    w = (1 + 0.3 * torch.randn(n, generator=g)).to(device, dtype)
    b = (0.3 * torch.randn(n, generator=g)).to(device, dtype)
    return x, r, w, b


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", list(TOL))
def test_layer_norm(m, n, dtype, device, monkeypatch):
    x, _, w, b = _inputs(m, n, dtype, device, seed=m * n)
    want = layer_norm_ref(x.double(), w.double(), b.double())
    poison_empty(monkeypatch)
    assert_close_to(gpt2kernels.layer_norm(x, w, b, 1e-5), want, TOL[dtype])


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", list(TOL))
def test_add_layer_norm(m, n, dtype, device, monkeypatch):
    x, r, w, b = _inputs(m, n, dtype, device, seed=m + n)
    want_y, want_s = add_layer_norm_ref(x.double(), r.double(), w.double(), b.double())
    poison_empty(monkeypatch)
    y, s = gpt2kernels.add_layer_norm(x, r, w, b, 1e-5)
    assert_close_to(s, want_s, TOL[dtype])
    assert_close_to(y, want_y, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_mean_keeps_precision(dtype, device):
    """mean -2.3, scale 4 (and x100): naive E[x^2] - E[x]^2 in low precision would fail this."""
    for scale in (4.0, 400.0):
        x, r, w, b = _inputs(5, 1600, dtype, device, seed=1, mean=-2.3 * scale / 4, scale=scale)
        assert_close_to(gpt2kernels.layer_norm(x, w, b), layer_norm_ref(x.double(), w.double(), b.double()), TOL[dtype])
        y, _ = gpt2kernels.add_layer_norm(x, r, w, b)
        assert_close_to(y, add_layer_norm_ref(x.double(), r.double(), w.double(), b.double())[0], TOL[dtype])


def test_strided_rows_and_3d(device):
    base, rbase, w, b = _inputs(12, 2 * 769, torch.float16, device, seed=2)
    x, r = base[:, 5:774], rbase[::1, 100:869]  # rows strided by 1538, last dim contiguous
    assert not x.is_contiguous()
    y, s = gpt2kernels.add_layer_norm(x, r, w[:769].contiguous(), b[:769].contiguous())
    want_y, want_s = add_layer_norm_ref(x.double(), r.double(), w[:769].double(), b[:769].double())
    assert_close_to(y, want_y, TOL[torch.float16])
    assert_close_to(s, want_s, TOL[torch.float16])
    x3 = base[:, :768].reshape(3, 4, 768)
    y3 = gpt2kernels.layer_norm(x3, w[:768].contiguous(), b[:768].contiguous())
    assert y3.shape == (3, 4, 768)
    assert_close_to(y3, layer_norm_ref(x3.double(), w[:768].double(), b[:768].double()), TOL[torch.float16])


def test_deterministic(device):
    x, r, w, b = _inputs(17, 1600, torch.float16, device, seed=3)
    first = gpt2kernels.add_layer_norm(x, r, w, b)
    for _ in range(3):
        again = gpt2kernels.add_layer_norm(x, r, w, b)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_opcheck_and_torch_ops(device):
    x, r, w, b = _inputs(3, 97, torch.float32, device, seed=4)
    opcheck(getattr(torch.ops, NS).layer_norm.default, (x, w, b, 1e-5))
    opcheck(getattr(torch.ops, NS).add_layer_norm.default, (x, r, w, b, 1e-5))


def test_torch_compile_traces_through(device):
    x, r, w, b = _inputs(4, 64, torch.float32, device, seed=5)

    def block(x, r):
        y, s = gpt2kernels.add_layer_norm(x, r, w, b, 1e-5)
        return gpt2kernels.layer_norm(y * 2, w, b, 1e-5) + s

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    torch.testing.assert_close(compiled(x, r), block(x, r))


@pytest.mark.parametrize("call,match", [
    (lambda x, r, w, b: gpt2kernels.layer_norm(x, w[:-1], b), r"weight has shape \[63\], expected \[64\]"),
    (lambda x, r, w, b: gpt2kernels.layer_norm(x, w, b.repeat(2)), r"bias has shape \[128\], expected \[64\]"),
    (lambda x, r, w, b: gpt2kernels.layer_norm(x.to(torch.int32), w, b), "x has dtype torch.int32"),
    (lambda x, r, w, b: gpt2kernels.add_layer_norm(x, r[:2], w, b),
     r"residual has shape \[2, 64\], expected \[4, 64\]"),
    (lambda x, r, w, b: gpt2kernels.add_layer_norm(x, r.half(), w, b), "residual has dtype torch.float16"),
    (lambda x, r, w, b: gpt2kernels.layer_norm(x.t(), w, b), "contiguous in its last dim"),
    # A mixed-device call dispatches on the "highest" device; the launcher must refuse it.
    (lambda x, r, w, b: _layer_norm_launch(x, None, w.to("meta"), b, 1e-5), "weight is on meta"),
])
def test_bad_input(call, match, device):
    x, r, w, b = _inputs(4, 64, torch.float32, device, seed=6)
    with pytest.raises(ValueError, match=match):
        call(x, r, w, b)


@pytest.mark.gpu
def test_cpu_gpu_mix_is_refused():
    x, r, w, b = _inputs(4, 64, torch.float16, "cuda", seed=7)
    with pytest.raises(ValueError, match="weight is on cpu"):
        gpt2kernels.layer_norm(x, w.cpu(), b)
    with pytest.raises(ValueError, match="residual is on cpu"):
        gpt2kernels.add_layer_norm(x, r.cpu(), w, b)
