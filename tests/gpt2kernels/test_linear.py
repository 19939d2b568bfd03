"""gpt2kernels.linear / gelu_mlp against a float64 reference: the GEMV (1-8 rows), the tiled decode
path (9-16 rows, split-K) and prefill. The GEMV's own checks are in test_gemv.py."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import gpt2kernels
from gpt2kernels._ops import NS

from .helpers import assert_close_to, poison_empty
from gpt2kernels.linear import DECODE_TUNED, gelu_mlp_ref, gemm_config, linear_ref

# (M, K, N): one row, the GEMV at K = 1600, odd K and N, the tiled decode tiles with split-K (12 rows,
# K = 1600) and without (16), prefill tiles (33, 300).
SHAPES = [(1, 80, 96), (1, 1600, 200), (3, 200, 1600), (12, 1600, 200), (16, 96, 80), (33, 96, 200), (300, 200, 96)]
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
    assert_close_to(gpt2kernels.linear(x, w, b, act, r), want, TOLS[dtype])


def test_split_k_is_exercised():
    assert gemm_config(12, 200, 1600, torch.float16, sms=132).split_k > 1
    assert gemm_config(300, 96, 200, torch.float16, sms=132).split_k == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_mlp(dtype, device, monkeypatch):
    g = torch.Generator().manual_seed(1)
    c, f = 96, 384
    x = torch.randn(2, 5, c, generator=g).to(device, dtype)
    fc_w = (torch.randn(f, c, generator=g) / c**0.5).to(device, dtype)
    proj_w = (torch.randn(c, f, generator=g) / f**0.5).to(device, dtype)
    fc_b = (0.1 * torch.randn(f, generator=g)).to(device, dtype)
    proj_b = (0.1 * torch.randn(c, generator=g)).to(device, dtype)
    r = torch.randn(2, 5, c, generator=g).to(device, dtype)
    want = gelu_mlp_ref(*(t.double() for t in (x, fc_w, fc_b, proj_w, proj_b, r)))
    poison_empty(monkeypatch)
    got = gpt2kernels.gelu_mlp(x, fc_w, fc_b, proj_w, proj_b, r)
    assert got.shape == (2, 5, c)
    assert_close_to(got, want, TOLS[dtype])


def test_strided_inputs_and_weight_layouts(device):
    """x with strided rows, and the input-major weight layout the CPU fp32 path keeps."""
    x, w, b, r = _inputs(7, 200, 96, torch.float32, device, seed=3)
    x_wide = torch.randn(7, 300, device=device)
    x_wide[:, 50:250] = x
    w_input_major = w.t().contiguous().t()
    want = linear_ref(x.double(), w.double(), b.double())
    assert_close_to(gpt2kernels.linear(x_wide[:, 50:250], w_input_major, b), want, TOLS[torch.float32])


def test_deterministic(device):
    x, w, b, r = _inputs(1, 1600, 200, torch.float16, device, seed=4)
    first = gpt2kernels.linear(x, w, b, "gelu_tanh")
    assert all(torch.equal(first, gpt2kernels.linear(x, w, b, "gelu_tanh")) for _ in range(3))


def test_gelu_is_gpt2_tanh_approximation(device):
    x = torch.linspace(-6, 6, 97, device=device)[:, None]
    eye = torch.ones(1, 1, device=device)
    got = gpt2kernels.linear(x, eye, None, "gelu_tanh")
    torch.testing.assert_close(got, F.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-5)


def test_opcheck(device):
    x, w, b, r = _inputs(3, 80, 96, torch.float32, device, seed=5)
    opcheck(getattr(torch.ops, NS).linear.default, (x, w, b, "gelu_tanh", r))
    opcheck(getattr(torch.ops, NS).linear.default, (x, w))


@pytest.mark.parametrize("call,match", [
    (lambda x, w, b, r: gpt2kernels.linear(x, w[:, :-1]), r"x has shape \[3, 80\] but weight has shape \[96, 79\]"),
    (lambda x, w, b, r: gpt2kernels.linear(x, w, b[:-1]), r"bias has shape \[95\], expected \[96\]"),
    (lambda x, w, b, r: gpt2kernels.linear(x, w, b, None, r[:, :5]),
     r"residual has shape \[3, 5\], expected \[3, 96\]"),
    (lambda x, w, b, r: gpt2kernels.linear(x, w.half()), "weight has dtype torch.float16, expected torch.float32"),
    (lambda x, w, b, r: gpt2kernels.linear(x.long(), w.long()), "x has dtype torch.int64"),
    (lambda x, w, b, r: gpt2kernels.linear(x, w, b, "relu"), "activation must be one of"),
    (lambda x, w, b, r: gpt2kernels.linear(x, w[None]), "weight must have 2 dims"),
])
def test_bad_input(call, match, device):
    x, w, b, r = _inputs(3, 80, 96, torch.float32, device, seed=6)
    with pytest.raises(ValueError, match=match):
        call(x, w, b, r)


# --- the fused decode ops: LayerNorm in the prologue, the KV-cache write in the epilogue -------------
LN_SHAPES = [(1, 96, 80), (3, 1600, 200), (16, 96, 4231), (1, 769, 96), (33, 96, 200)]  # (M, K, N); 33: prefill tiles


def _ln_inputs(m, k, n, dtype, device, seed, mean=-2.3, scale=3.0):
    """x with a large mean and scale (a naive fp16 variance would be garbage), LayerNorm and linear params."""
    g = torch.Generator().manual_seed(seed)
    x = mean + scale * torch.randn(m, k, generator=g)
    ln_w, ln_b = 1 + 0.3 * torch.randn(k, generator=g), 0.3 * torch.randn(k, generator=g)
    w, b = torch.randn(n, k, generator=g) / k**0.5, 0.5 * torch.randn(n, generator=g)
    return [t.to(device, dtype) for t in (x, ln_w, ln_b, w, b)]


def _ln_oracle(x, ln_w, ln_b, w, b, act, eps=1e-5):
    """float64, with the LayerNorm's output rounded to x's dtype, as the kernel (and a separate LayerNorm) does."""
    h = gpt2kernels.layer_norm_ref(x.double(), ln_w.double(), ln_b.double(), eps).to(x.dtype).double()
    return linear_ref(h, w.double(), b.double() if b is not None else None, act)


@pytest.mark.parametrize("act,has_bias", [(None, False), ("gelu_tanh", True)])
@pytest.mark.parametrize("m,k,n", LN_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ln_linear(m, k, n, act, has_bias, dtype, device, monkeypatch):
    x, ln_w, ln_b, w, b = _ln_inputs(m, k, n, dtype, device, seed=m + k + n)
    b = b if has_bias else None
    want = _ln_oracle(x, ln_w, ln_b, w, b, act)
    poison_empty(monkeypatch)
    assert_close_to(gpt2kernels.ln_linear(x, ln_w, ln_b, w, b, act), want, TOLS[dtype])


def test_ln_linear_strided_rows_and_3d(device):
    x, ln_w, ln_b, w, b = _ln_inputs(6, 96, 80, torch.float32, device, seed=7)
    wide = torch.randn(6, 130, device=device)
    wide[:, 20:116] = x
    want = _ln_oracle(x, ln_w, ln_b, w, b, None)
    assert_close_to(gpt2kernels.ln_linear(wide[:, 20:116], ln_w, ln_b, w, b), want, TOLS[torch.float32])
    assert gpt2kernels.ln_linear(x.view(2, 3, 96), ln_w, ln_b, w, b).shape == (2, 3, 80)


def _qkv_case(b, h, d, max_len, dtype, device, seed):
    """Inputs of a decode step's QKV projection, with caches that are views of a NaN-filled
    (layers, slots, H, L, D) buffer holding more slots than rows, as the engine's cache is."""
    c = h * d
    x, ln_w, ln_b, w, bias = _ln_inputs(b, c, 3 * c, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    lens = torch.randint(1, max_len + 1, (b,), generator=g, dtype=torch.int32).to(device)
    store = torch.full((2, 2, b + 2, h, max_len, d), float("nan"), dtype=dtype, device=device)
    return x, ln_w, ln_b, w, bias, store, lens


@pytest.mark.parametrize("b,h,d", [(1, 3, 32), (3, 2, 64), (16, 3, 32)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ln_qkv_append_writes_the_new_token_and_nothing_else(b, h, d, dtype, device, monkeypatch):
    max_len = 37
    x, ln_w, ln_b, w, bias, store, lens = _qkv_case(b, h, d, max_len, dtype, device, seed=b * h + d)
    k_cache, v_cache = store[0, 1, :b], store[1, 1, :b]  # layer 1 of a 2-layer cache, rows [0, b)
    want = _ln_oracle(x, ln_w, ln_b, w, bias, None).view(b, 3, h, d)
    poison_empty(monkeypatch)
    q = gpt2kernels.ln_qkv_append(x, ln_w, ln_b, w, bias, k_cache, v_cache, lens)
    assert q.shape == (b, h * d) and q.is_contiguous()
    assert_close_to(q, want[:, 0].reshape(b, h * d), TOLS[dtype])
    rows, pos = torch.arange(b, device=device), lens.long() - 1
    assert_close_to(k_cache[rows, :, pos], want[:, 1], TOLS[dtype])
    assert_close_to(v_cache[rows, :, pos], want[:, 2], TOLS[dtype])
    written = torch.zeros_like(store, dtype=torch.bool)
    written[:, 1, rows, :, pos] = True
    assert store[~written].isnan().all()  # no other slot, row or layer touched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ln_qkv_append_equals_its_reference(dtype, device):
    """The eager backend's composition (LayerNorm, linear, index writes) gives the same caches and query."""
    x, ln_w, ln_b, w, bias, store, lens = _qkv_case(3, 2, 64, 20, dtype, device, seed=11)
    store.zero_()
    ref_store = store.clone()
    q = gpt2kernels.ln_qkv_append(x, ln_w, ln_b, w, bias, store[0, 0, :3], store[1, 0, :3], lens)
    q_ref = gpt2kernels.ln_qkv_append_ref(x, ln_w, ln_b, w, bias, ref_store[0, 0, :3], ref_store[1, 0, :3], lens)
    tol = TOLS[dtype]
    torch.testing.assert_close(q, q_ref, atol=tol[0], rtol=tol[1])
    torch.testing.assert_close(store, ref_store, atol=tol[0], rtol=tol[1])


def test_fused_ops_opcheck(device):
    x, ln_w, ln_b, w, b = _ln_inputs(3, 80, 96, torch.float32, device, seed=12)
    opcheck(getattr(torch.ops, NS).ln_linear.default, (x, ln_w, ln_b, w, b, "gelu_tanh", 1e-5))
    opcheck(getattr(torch.ops, NS).ln_linear.default, (x, ln_w, ln_b, w))
    x, ln_w, ln_b, w, bias, store, lens = _qkv_case(2, 2, 32, 9, torch.float32, device, seed=13)
    store.zero_()
    opcheck(getattr(torch.ops, NS).ln_qkv_append.default, (x, ln_w, ln_b, w, bias, store[0, 0, :2], store[1, 0, :2],
                                                           lens))


@pytest.mark.parametrize("call,match", [
    (lambda x, ln_w, ln_b, w, b, kc, vc, lens: gpt2kernels.ln_linear(x, ln_w[:-1], ln_b, w),
     r"ln_weight has shape \[63\], expected \[64\]"),
    (lambda x, ln_w, ln_b, w, b, kc, vc, lens: gpt2kernels.ln_qkv_append(x, ln_w, ln_b, w[:-1], b[:-1], kc, vc, lens),
     r"the fused QKV projection needs N = 3 \* C = 192"),
    (lambda x, ln_w, ln_b, w, b, kc, vc, lens: gpt2kernels.ln_qkv_append(x, ln_w, ln_b, w, b, kc[:, :1], vc[:, :1],
                                                                         lens),
     r"k_cache has shape \[2, 1, 9, 32\]: expected \(B, H, max_len, D\) with B = 2 and H \* D = C = 64"),
    (lambda x, ln_w, ln_b, w, b, kc, vc, lens: gpt2kernels.ln_qkv_append(x, ln_w, ln_b, w, b, kc, vc, lens.long()),
     "cache_lens has dtype torch.int64"),
    (lambda x, ln_w, ln_b, w, b, kc, vc, lens: gpt2kernels.ln_qkv_append(x, ln_w, ln_b, w, b, kc, vc[:, :, :5], lens),
     "v_cache .* must match k_cache"),
])
def test_fused_ops_bad_input(call, match, device):
    x, ln_w, ln_b, w, b, store, lens = _qkv_case(2, 2, 32, 9, torch.float32, device, seed=14)
    with pytest.raises(ValueError, match=match):
        call(x, ln_w, ln_b, w, b, store[0, 0, :2], store[1, 0, :2], lens)


def test_split_k_is_deterministic_and_rearms_its_counters(device):
    """The last split to arrive sums the partials in split order: bit-identical results whatever the
    arrival order, and every arrival counter back at zero for the next launch."""
    from gpt2kernels._ops import arrival_counters

    x, ln_w, ln_b, w, b = _ln_inputs(12, 768, 96, torch.float16, device, seed=15)  # 12 rows: the tiled kernel
    assert gemm_config(12, 96, 768, torch.float16, sms=132).split_k > 1
    first = gpt2kernels.ln_linear(x, ln_w, ln_b, w, b, "gelu_tanh")
    assert all(torch.equal(first, gpt2kernels.ln_linear(x, ln_w, ln_b, w, b, "gelu_tanh")) for _ in range(3))
    assert not arrival_counters(device, 4096).any()


# lm_head: 40 s interpreted
@pytest.mark.parametrize("n,k", [pytest.param(n, k, marks=[pytest.mark.gpu] if n == 50257 else [])
                                 for n, k in DECODE_TUNED])
def test_measured_decode_tiles(n, k, device, monkeypatch):
    """The tiles DECODE_TUNED picks for gpt2's shapes (wide K blocks, split-K 1 or 8) compute the same
    product, with and without the LayerNorm prologue, with the epilogues those layers use, at the
    row counts that still take them (9-16: fewer go to the GEMV)."""
    x, w, b, r = _inputs(12, k, n, torch.float16, device, seed=n + k)
    ln_w, ln_b = 1 + 0.1 * torch.randn(k, device=device), 0.1 * torch.randn(k, device=device)
    act = "gelu_tanh" if n == 4 * k else None
    residual = r if n <= k else None  # the two c_proj layers
    poison_empty(monkeypatch)
    got = gpt2kernels.linear(x, w, b, act, residual)
    assert_close_to(got, linear_ref(x.double(), w.double(), b.double(), act,
                                    residual.double() if residual is not None else None),
                    TOLS[torch.float16])
    assert_close_to(gpt2kernels.ln_linear(x, ln_w, ln_b, w, b, act), _ln_oracle(x, ln_w, ln_b, w, b, act),
                    TOLS[torch.float16])


@pytest.mark.parametrize("c", [768, 1024, 1280, 1600])
@pytest.mark.parametrize("m", [1, 8, 16])
def test_decode_launches_fill_an_h100(c, m):
    """A CPU proxy of decode bandwidth: at GPT-2's shapes every decode projection the rule sizes
    launches at least 1.4 programs per SM of an H100 (132 SMs); measured tiles (DECODE_TUNED: gpt2's
    small layers, where fewer programs won on an H200) are used for 16-bit weights only. Either way no
    K split is left without work and the blocks fit tl.dot."""
    for n, k in [(3 * c, c), (c, c), (4 * c, c), (c, 4 * c), (50257, c)]:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            cfg = gemm_config(m, n, k, dtype, sms=132)
            tuned = DECODE_TUNED.get((n, k)) if dtype != torch.float32 else None
            if tuned:
                assert (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.split_k) == tuned
            else:
                assert -(-n // cfg.block_n) * cfg.split_k >= 1.4 * 132, (n, k, dtype, cfg)
            k_blocks = -(-k // cfg.block_k)
            assert (cfg.split_k - 1) * -(-k_blocks // cfg.split_k) < k_blocks, (n, k, cfg)
            assert cfg.block_m == 16 and cfg.block_n >= 16 and cfg.block_k >= 16, cfg
