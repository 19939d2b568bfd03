"""kernels.linear / gelu_mlp against a float64 reference, decode (split-K) and prefill paths."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import kernels
from kernels._ops import NS

from .helpers import assert_close_to, poison_empty
from kernels.linear import gelu_mlp_ref, gemm_config, linear_ref

# (M, K, N): one row, split-K (K = 1600 at M = 1), odd K and N, both regimes (M <= 16 and above).
SHAPES = [(1, 80, 96), (1, 1600, 200), (3, 200, 1600), (16, 96, 80), (33, 96, 200), (300, 200, 96)]
EPILOGUES = {"plain": (False, None, False), "bias": (True, None, False), "bias+gelu": (True, "gelu_tanh", False),
             "bias+gelu+residual": (True, "gelu_tanh", True), "residual": (False, None, True)}
# bf16 tl.dot is wrong in the Triton interpreter (GPU_READINESS.md): bf16 runs on a GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
TOLS = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _inputs(m, k, n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = 0.5 * torch.randn(n, generator=g)
    r = torch.randn(m, n, generator=g)
    return [t.to(device, dtype) for t in (x, w, b, r)]


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(m, k, n, dtype, epilogue, device, monkeypatch):
    has_bias, act, has_res = EPILOGUES[epilogue]
    x, w, b, r = _inputs(m, k, n, dtype, device, seed=m * k + n)
    b, r = (b if has_bias else None), (r if has_res else None)
    want = linear_ref(x.double(), w.double(), b.double() if b is not None else None, act,
                      r.double() if r is not None else None)
    poison_empty(monkeypatch)
    assert_close_to(kernels.linear(x, w, b, act, r), want, TOLS[dtype])


def test_split_k_is_exercised():
    assert gemm_config(1, 200, 1600, torch.float16, sms=132).split_k > 1
    assert gemm_config(300, 96, 200, torch.float16, sms=132).split_k == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_mlp(dtype, device, monkeypatch):
    g = torch.Generator().manual_seed(1)
    c, f = 96, 384
    x = torch.randn(2, 5, c, generator=g).to(device, dtype)
    fc_w, proj_w = (torch.randn(f, c, generator=g) / c**0.5).to(device, dtype), (torch.randn(c, f, generator=g) / f**0.5).to(device, dtype)
    fc_b, proj_b, r = (0.1 * torch.randn(f, generator=g)).to(device, dtype), (0.1 * torch.randn(c, generator=g)).to(device, dtype), torch.randn(2, 5, c, generator=g).to(device, dtype)
    want = gelu_mlp_ref(*(t.double() for t in (x, fc_w, fc_b, proj_w, proj_b, r)))
    poison_empty(monkeypatch)
    got = kernels.gelu_mlp(x, fc_w, fc_b, proj_w, proj_b, r)
    assert got.shape == (2, 5, c)
    assert_close_to(got, want, TOLS[dtype])


def test_strided_inputs_and_weight_layouts(device):
    """x with strided rows, and the input-major weight layout the CPU fp32 path keeps."""
    x, w, b, r = _inputs(7, 200, 96, torch.float32, device, seed=3)
    x_wide = torch.randn(7, 300, device=device)
    x_wide[:, 50:250] = x
    w_input_major = w.t().contiguous().t()
    want = linear_ref(x.double(), w.double(), b.double())
    assert_close_to(kernels.linear(x_wide[:, 50:250], w_input_major, b), want, TOLS[torch.float32])


def test_deterministic(device):
    x, w, b, r = _inputs(1, 1600, 200, torch.float16, device, seed=4)
    first = kernels.linear(x, w, b, "gelu_tanh")
    assert all(torch.equal(first, kernels.linear(x, w, b, "gelu_tanh")) for _ in range(3))


def test_gelu_is_gpt2_tanh_approximation(device):
    x = torch.linspace(-6, 6, 97, device=device)[:, None]
    eye = torch.ones(1, 1, device=device)
    got = kernels.linear(x, eye, None, "gelu_tanh")
    torch.testing.assert_close(got, F.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-5)


def test_opcheck(device):
    x, w, b, r = _inputs(3, 80, 96, torch.float32, device, seed=5)
    opcheck(getattr(torch.ops, NS).linear.default, (x, w, b, "gelu_tanh", r))
    opcheck(getattr(torch.ops, NS).linear.default, (x, w))


@pytest.mark.parametrize("call,match", [
    (lambda x, w, b, r: kernels.linear(x, w[:, :-1]), r"x has shape \[3, 80\] but weight has shape \[96, 79\]"),
    (lambda x, w, b, r: kernels.linear(x, w, b[:-1]), r"bias has shape \[95\], expected \[96\]"),
    (lambda x, w, b, r: kernels.linear(x, w, b, None, r[:, :5]), r"residual has shape \[3, 5\], expected \[3, 96\]"),
    (lambda x, w, b, r: kernels.linear(x, w.half()), "weight has dtype torch.float16, expected torch.float32"),
    (lambda x, w, b, r: kernels.linear(x.long(), w.long()), "x has dtype torch.int64"),
    (lambda x, w, b, r: kernels.linear(x, w, b, "relu"), "activation must be one of"),
    (lambda x, w, b, r: kernels.linear(x, w[None]), "weight must have 2 dims"),
])
def test_bad_input(call, match, device):
    x, w, b, r = _inputs(3, 80, 96, torch.float32, device, seed=6)
    with pytest.raises(ValueError, match=match):
        call(x, w, b, r)
