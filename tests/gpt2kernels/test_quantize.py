"""Weight-only int8: quantisation bounds, and every linear kernel with an int8 weight against its reference."""

import pytest
import torch
from torch.library import opcheck

import gpt2kernels
from gpt2kernels._ops import NS
from gpt2kernels.linear import DECODE_TUNED_INT8, gemm_config, linear_ref
from gpt2kernels.quantize import dequantize_int8, quantize_int8

from .helpers import assert_close_to, poison_empty

# bf16 tl.dot is wrong in the Triton interpreter (GPU_READINESS.md): bf16 runs on a GPU only.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
# The reference dequantises to float64, the kernel multiplies the int8 product by the scale in fp32:
# the same tolerances as the float kernels (tests/gpt2kernels/test_linear.py).
TOLS = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# (M, K, N): one row with split-K (K = 1600), widths 4231 and 1600, a prefill tile (33 rows), odd sizes.
SHAPES = [(1, 1600, 200), (3, 200, 1600), (1, 97, 4231), (2, 4231, 96), (33, 96, 200)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(1, 1), (97, 769), (5, 4231)])
def test_quantisation_error_is_at_most_half_a_step(n, k, dtype):
    g = torch.Generator().manual_seed(n * k)
    w = (torch.randn(n, k, generator=g) * torch.logspace(-4, 1, n)[:, None]).to(dtype)  # rows of very different size
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == (n, k) and scale.dtype == torch.float32 and scale.shape == (n,)
    assert q.abs().max() <= 127
    w32 = w.float()
    assert torch.equal(q.abs().amax(dim=1), torch.full((n,), 127, dtype=torch.int8))  # each row's largest is exact
    err = (dequantize_int8(q, scale).double() - w32.double()).abs()
    fp32_rounding = 2 * 2**-24 * w32.double().abs()  # of w / scale and of q * scale
    assert (err <= scale.double()[:, None] / 2 + fp32_rounding).all()
    torch.testing.assert_close(scale, w32.abs().amax(dim=1) / 127)


def test_quantisation_of_zero_rows_strided_views_and_bad_weights():
    w = torch.randn(6, 10)
    w[2] = 0
    q, scale = quantize_int8(w.t().contiguous().t())  # input-major layout
    assert scale[2] == 1 and not q[2].any()
    torch.testing.assert_close(quantize_int8(w)[0], q, atol=0, rtol=0)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_int8(w)
    with pytest.raises(ValueError, match="weight must have 2 dims"):
        quantize_int8(torch.randn(3))
    with pytest.raises(ValueError, match="q has dtype torch.float32"):
        dequantize_int8(torch.randn(2, 3), torch.ones(2))


def _int8_inputs(m, k, n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    q, scale = quantize_int8(torch.randn(n, k, generator=g) / k**0.5)
    b = (0.5 * torch.randn(n, generator=g)).to(device, dtype)
    r = torch.randn(m, n, generator=g).to(device, dtype)
    return x, q.to(device), scale.to(device), b, r


def _oracle(x, q, scale, b=None, act=None, r=None):
    """float64: the dequantised weight times x (the issue's reference, to fp32 rounding)."""
    return linear_ref(x.double(), q, b.double() if b is not None else None, act,
                      r.double() if r is not None else None, weight_scale=scale)


@pytest.mark.parametrize("epilogue", ["plain", "bias+gelu+residual"])
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear(m, k, n, dtype, epilogue, device, monkeypatch):
    x, q, scale, b, r = _int8_inputs(m, k, n, dtype, device, seed=m * k + n)
    b, act, r = (b, "gelu_tanh", r) if epilogue != "plain" else (None, None, None)
    want = _oracle(x, q, scale, b, act, r)
    poison_empty(monkeypatch)
    assert_close_to(gpt2kernels.linear(x, q, b, act, r, weight_scale=scale), want, TOLS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_fused_ops(dtype, device, monkeypatch):
    """ln_linear (LayerNorm prologue), ln_qkv_append (cache epilogue) and gelu_mlp with int8 weights."""
    g = torch.Generator().manual_seed(3)
    b, h, d, max_len = 3, 2, 32, 9
    c = h * d
    x = (1.5 + 2 * torch.randn(b, c, generator=g)).to(device, dtype)
    ln_w = (1 + 0.2 * torch.randn(c, generator=g)).to(device, dtype)
    ln_b = (0.2 * torch.randn(c, generator=g)).to(device, dtype)
    q_fc, s_fc = (t.to(device) for t in quantize_int8(torch.randn(4 * c, c, generator=g) / c**0.5))
    q_pr, s_pr = (t.to(device) for t in quantize_int8(torch.randn(c, 4 * c, generator=g) / (4 * c)**0.5))
    q_qkv, s_qkv = (t.to(device) for t in quantize_int8(torch.randn(3 * c, c, generator=g) / c**0.5))
    b_fc, b_pr, b_qkv = ((0.1 * torch.randn(n, generator=g)).to(device, dtype) for n in (4 * c, c, 3 * c))
    normed = gpt2kernels.layer_norm_ref(x.double(), ln_w.double(), ln_b.double(), 1e-5).to(dtype).double()
    poison_empty(monkeypatch)
    assert_close_to(gpt2kernels.ln_linear(x, ln_w, ln_b, q_fc, b_fc, "gelu_tanh", weight_scale=s_fc),
                    linear_ref(normed, q_fc, b_fc.double(), "gelu_tanh", weight_scale=s_fc), TOLS[dtype])
    mlp = gpt2kernels.gelu_mlp(x, q_fc, b_fc, q_pr, b_pr, x, fc_scale=s_fc, proj_scale=s_pr)
    want = gpt2kernels.gelu_mlp_ref(x.double(), q_fc, b_fc.double(), q_pr, b_pr.double(), x.double(), s_fc, s_pr)
    assert_close_to(mlp, want, (4 * TOLS[dtype][0], 4 * TOLS[dtype][1]))  # the hidden layer is rounded to dtype
    store = torch.full((2, b, h, max_len, d), float("nan"), dtype=dtype, device=device)
    lens = torch.tensor([1, 5, 9], dtype=torch.int32, device=device)
    query = gpt2kernels.ln_qkv_append(x, ln_w, ln_b, q_qkv, b_qkv, store[0], store[1], lens, weight_scale=s_qkv)
    want = linear_ref(normed, q_qkv, b_qkv.double(), weight_scale=s_qkv).view(b, 3, h, d)
    assert_close_to(query, want[:, 0].reshape(b, c), TOLS[dtype])
    rows, pos = torch.arange(b, device=device), lens.long() - 1
    assert_close_to(store[0][rows, :, pos], want[:, 1], TOLS[dtype])
    assert_close_to(store[1][rows, :, pos], want[:, 2], TOLS[dtype])
    assert store.isnan().sum() == store.numel() - 2 * b * c  # nothing else written


def test_int8_split_k_decode_is_exercised_and_deterministic(device):
    x, q, scale, b, _ = _int8_inputs(12, 1600, 200, torch.float16, device, seed=9)  # 12 rows: the tiled kernel
    assert gemm_config(12, 200, 1600, torch.float16, sms=132, int8_weight=True).split_k > 1
    first = gpt2kernels.linear(x, q, b, "gelu_tanh", weight_scale=scale)
    assert all(torch.equal(first, gpt2kernels.linear(x, q, b, "gelu_tanh", weight_scale=scale)) for _ in range(2))


def _int8_op_cases(device):
    """Int8-weight arguments of every op that takes a weight scale, by op name."""
    x, q, scale, b, r = _int8_inputs(3, 80, 96, torch.float32, device, seed=5)
    ln = (torch.ones(80, device=device), torch.zeros(80, device=device))
    q_proj, s_proj = (t.to(device) for t in quantize_int8(torch.randn(80, 96) / 96**0.5))
    h, d = 2, 16  # C = 32: the QKV projection has 96 outputs
    xq, qq, sq, bq, _ = _int8_inputs(2, 32, 96, torch.float32, device, seed=6)
    store = torch.zeros(2, 3, h, 9, d, device=device)
    lens = torch.tensor([3, 7], dtype=torch.int32, device=device)
    ln32 = (torch.ones(32, device=device), torch.zeros(32, device=device))
    return {
        "linear": (x, q, b, "gelu_tanh", r, scale),
        "ln_linear": (x, *ln, q, b, None, 1e-5, scale),
        "ln_linear_argmax": (x, *ln, q, torch.zeros(3, dtype=torch.int64, device=device), b, 1e-5, scale),
        "gelu_mlp": (x, q, b, q_proj, ln[1], x.clone(), scale, s_proj),
        "ln_qkv_append": (xq, *ln32, qq, bq, store[0, :2], store[1, :2], lens, 1e-5, sq),
    }


def test_int8_opcheck_of_every_op_with_a_weight_scale(device):
    """The fakes (torch.compile's shape rules) of int8 calls: a fake lacking the scale broke
    torch.compile of an int8 triton step. The op list comes from the signatures, so a new op
    with a scale must join the cases."""
    import inspect

    def takes_a_weight_scale(fn):
        return any(p.endswith("scale") and p != "scale" for p in inspect.signature(fn).parameters)

    with_scale = {name for name in gpt2kernels.__all__ if hasattr(getattr(gpt2kernels, name), "op")
                  and takes_a_weight_scale(getattr(gpt2kernels, name))}
    cases = _int8_op_cases(device)
    assert with_scale == set(cases)
    for name, args in cases.items():
        opcheck(getattr(torch.ops, NS).__getattr__(name).default, args)


@pytest.mark.parametrize("call,match", [
    (lambda x, q, s, w: gpt2kernels.linear(x, q), "weight is int8 but weight_scale is None"),
    (lambda x, q, s, w: gpt2kernels.linear(x, w, weight_scale=s), "weight_scale was given but weight has dtype"),
    (lambda x, q, s, w: gpt2kernels.linear(x, q, weight_scale=s[:-1]),
     r"weight_scale has shape \[95\], expected \[96\]"),
    (lambda x, q, s, w: gpt2kernels.linear(x, q, weight_scale=s.half()), "weight_scale has dtype torch.float16"),
    (lambda x, q, s, w: gpt2kernels.linear(x, q.to(torch.uint8), weight_scale=s),
     "weight has dtype torch.uint8, expected torch.float32"),
])
def test_int8_bad_input(call, match, device):
    x, q, scale, _, _ = _int8_inputs(3, 80, 96, torch.float32, device, seed=6)
    with pytest.raises(ValueError, match=match):
        call(x, q, scale, torch.randn(96, 80, device=device))


@pytest.mark.parametrize("c", [768, 1024, 1280, 1600])
@pytest.mark.parametrize("m", [1, 8])
def test_int8_decode_launches_fill_an_h100(c, m):
    """The CPU proxy of decode bandwidth for int8 weights: every decode projection the rule sizes
    launches at least 1.4 programs per SM of an H100 (132 SMs), BLOCK_K is one 128-byte line of an
    int8 row (128) or what DECODE_TUNED_INT8 measured, and no K split is left without work."""
    for n, k in [(3 * c, c), (c, c), (4 * c, c), (c, 4 * c), (50257, c)]:
        for dtype in (torch.float16, torch.bfloat16):
            cfg = gemm_config(m, n, k, dtype, sms=132, int8_weight=True)
            tuned = DECODE_TUNED_INT8.get((n, k))
            if tuned:
                assert (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.split_k) == tuned
            else:
                assert cfg.block_k == 128 and -(-n // cfg.block_n) * cfg.split_k >= 1.4 * 132, (n, k, cfg)
            k_blocks = -(-k // cfg.block_k)
            assert (cfg.split_k - 1) * -(-k_blocks // cfg.split_k) < k_blocks, (n, k, cfg)
