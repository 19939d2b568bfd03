"""The backward passes of layer_norm, add_layer_norm, linear, gelu_mlp and flash_attention: gradcheck
in float64, each dtype against float64 autograd through the eager references, poisoned outputs,
determinism, and the ops that have no backward saying so."""

import pytest
import torch
from torch.library import opcheck

import gpt2kernels
from gpt2kernels._ops import NS

from .helpers import poison_empty

# bf16 tl.dot is wrong in the Triton interpreter (GPU_READINESS.md): bf16 GEMMs run on a GPU only.
GEMM_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
# Largest error over the largest reference value, per gradient: fp32 accumulates in fp32, fp16/bf16
# round their inputs and outputs (and the probabilities fed to the attention's GEMMs).
TOL = {torch.float32: 2e-5, torch.float16: 6e-3, torch.bfloat16: 4e-2}


def _leaves(*tensors, dtype, device):
    return [t.to(device, dtype).requires_grad_() if t is not None else None for t in tensors]


def _grads(fn, inputs, grad_out):
    """Gradients of sum(fn(*inputs) * grad_out) for every input that requires grad (None elsewhere)."""
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return [next(grads) if t is not None and t.requires_grad else None for t in inputs]


def _check(fn, ref, inputs, dtype, device, monkeypatch, seed):
    """fn's gradients in ``dtype`` against ref's in float64 on the same values; NaN-poisoned allocations."""
    g = torch.Generator().manual_seed(seed)
    leaves = _leaves(*inputs, dtype=dtype, device=device)
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    out_shape = ref(*leaves64)
    out_shape = (out_shape[0] if isinstance(out_shape, tuple) else out_shape).shape
    grad_out = torch.randn(out_shape, generator=g).to(device, dtype)
    want = _grads(ref, leaves64, grad_out.double())
    with monkeypatch.context() as m:
        poison_empty(m)
        got = _grads(fn, leaves, grad_out)
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            continue
        assert not torch.isnan(a).any(), f"input {i}: NaN in the gradient"
        err = (a.double() - b).abs().max() / b.abs().max().clamp_min(1e-2)  # width 1: dweight is 0; one key: dq is 0
        assert err <= TOL[dtype], f"input {i}: relative error {err:.2e} > {TOL[dtype]}"


def _randn(*shape, scale=1.0, seed=0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- LayerNorm ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 769, 1600, 4231])
@pytest.mark.parametrize("m", [1, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layer_norm_backward(m, n, dtype, device, monkeypatch):
    x, w, b = _randn(m, n, seed=1) - 2.3, 1 + _randn(n, scale=0.3, seed=2), _randn(n, scale=0.3, seed=3)
    _check(gpt2kernels.layer_norm, gpt2kernels.layer_norm_ref, [x, w, b], dtype, device, monkeypatch, m + n)


@pytest.mark.parametrize("n", [1, 769, 1600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_layer_norm_backward_through_y_and_s(n, dtype, device, monkeypatch):
    """The loss reads both outputs: s (the residual stream) carries its own gradient into x and residual."""
    x, r = _randn(5, n, seed=1), _randn(5, n, scale=0.5, seed=2)
    w, b = 1 + _randn(n, scale=0.3, seed=3), _randn(n, scale=0.3, seed=4)
    mix = _randn(5, n, seed=5).to(device, dtype)

    def both(op):
        return lambda *a: (lambda y, s: y + mix * s)(*op(*a))

    _check(both(gpt2kernels.add_layer_norm), both(gpt2kernels.add_layer_norm_ref), [x, r, w, b], dtype, device,
           monkeypatch, n)


def test_layer_norm_gradcheck_float64(device):
    x, r = _randn(3, 37, seed=1, scale=2).double(), _randn(3, 37, seed=2).double()
    w, b = (1 + _randn(37, scale=0.3, seed=3)).double(), _randn(37, seed=4).double()
    args = [t.to(device).requires_grad_() for t in (x, r, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: gpt2kernels.layer_norm(x, w, b), [args[0], *args[2:]],
                                    fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: gpt2kernels.add_layer_norm(*a), args,
                                    fast_mode=True)


# --- linear and the GELU MLP ---------------------------------------------------------------------------
LINEAR_SHAPES = [(1, 80, 96), (37, 769, 33), (70, 96, 200)]  # (M, K, N): one row, odd sizes, the prefill tiles


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear-layout", "conv1d-layout"])
@pytest.mark.parametrize("epilogue", ["plain", "bias+gelu+residual"])
@pytest.mark.parametrize("m,k,n", LINEAR_SHAPES)
@pytest.mark.parametrize("dtype", GEMM_DTYPES)
def test_linear_backward(m, k, n, dtype, epilogue, conv1d, device, monkeypatch):
    x, b, r = _randn(m, k, seed=1), _randn(n, scale=0.5, seed=3), _randn(m, n, seed=4)
    w = _randn(k, n, seed=2, scale=k ** -0.5)  # HF Conv1D's [in, out]; the op takes w.t()
    if not conv1d:
        w = w.t().contiguous()
    act = "gelu_tanh" if epilogue != "plain" else None

    def call(op):
        def fn(x, w, b, r):
            return op(x, w.t() if conv1d else w, b, act, r)
        return fn

    inputs = [x, w, b, r] if epilogue != "plain" else [x, w, None, None]
    _check(call(gpt2kernels.linear), call(gpt2kernels.linear_ref), inputs, dtype, device, monkeypatch, m * k + n)


@pytest.mark.parametrize("m,c", [(1, 96), (10, 97)])
@pytest.mark.parametrize("dtype", GEMM_DTYPES)
def test_gelu_mlp_backward(m, c, dtype, device, monkeypatch):
    f = 4 * c
    inputs = [_randn(2, m, c, seed=1), _randn(f, c, scale=c ** -0.5, seed=2), _randn(f, scale=0.5, seed=3),
              _randn(c, f, scale=f ** -0.5, seed=4), _randn(c, scale=0.1, seed=5), _randn(2, m, c, seed=6)]
    _check(gpt2kernels.gelu_mlp, gpt2kernels.gelu_mlp_ref, inputs, dtype, device, monkeypatch, m + c)


def test_linear_and_mlp_gradcheck_float64(device):
    x, w, b, r = (_randn(*s, seed=i).double().to(device).requires_grad_() for i, s in
                  enumerate([(5, 33), (17, 33), (17,), (5, 17)]))
    assert torch.autograd.gradcheck(lambda x, w, b, r: gpt2kernels.linear(x, w, b, "gelu_tanh", r), (x, w, b, r),
                                    fast_mode=True)
    wt = w.detach().t().contiguous().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, wt: gpt2kernels.linear(x, wt.t(), None, "gelu_tanh"), (x, wt),
                                    fast_mode=True)
    fw, fb, pw, pb = (_randn(*s, seed=9 + i).double().to(device).requires_grad_() for i, s in
                      enumerate([(51, 33), (51,), (33, 51), (33,)]))
    assert torch.autograd.gradcheck(lambda *a: gpt2kernels.gelu_mlp(*a), (x, fw, fb, pw, pb),
                                    fast_mode=True)


def test_conv1d_weight_grad_keeps_the_weight_layout(device):
    """A patch passes HF's [in, out] weight as weight.t(): its gradient must come back [in, out]
    without a copy, i.e. as a transposed view of the kernel's output."""
    x = _randn(6, 40, seed=1).to(device).requires_grad_()
    w = _randn(40, 24, seed=2).to(device).requires_grad_()
    gpt2kernels.linear(x, w.t()).sum().backward()
    assert w.grad.shape == (40, 24) and w.grad.is_contiguous()
    torch.testing.assert_close(w.grad, x.detach().t() @ torch.ones(6, 24, device=device))


# --- flash attention -----------------------------------------------------------------------------------
ATTENTION_SHAPES = [  # (B, H, Tq, Tk, D, causal)
    (1, 1, 1, 1, 64, True), (2, 3, 37, 37, 64, True), (1, 2, 17, 70, 32, True), (1, 2, 33, 20, 80, False),
]


@pytest.mark.parametrize("b,h,tq,tk,d,causal", ATTENTION_SHAPES)
@pytest.mark.parametrize("dtype", GEMM_DTYPES)
def test_flash_attention_backward(b, h, tq, tk, d, causal, dtype, device, monkeypatch):
    q, k, v = _randn(b, h, tq, d, seed=1), _randn(b, h, tk, d, seed=2), _randn(b, h, tk, d, seed=3)
    _check(lambda q, k, v: gpt2kernels.flash_attention(q, k, v, causal),
           lambda q, k, v: gpt2kernels.flash_attention_ref(q, k, v, causal), [q, k, v], dtype, device, monkeypatch,
           tq * tk + d)


def test_flash_attention_backward_on_fused_qkv_views(device):
    """q, k, v as GPT-2 makes them: strided views of one (B, T, 3, H, D) projection; their gradients
    flow back into it."""
    qkv = _randn(2, 29, 3, 4, 32, seed=4).to(device).requires_grad_()
    qkv64 = qkv.detach().double().requires_grad_()
    grad = _randn(2, 4, 29, 32, seed=5).to(device)
    for t, op in ((qkv, gpt2kernels.flash_attention), (qkv64, gpt2kernels.flash_attention_ref)):
        q, k, v = t.permute(2, 0, 3, 1, 4)
        (op(q, k, v) * grad.to(t.dtype)).sum().backward()
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, atol=1e-5, rtol=1e-5)


def test_flash_attention_gradcheck_float64(device):
    for causal, (tq, tk) in ((True, (5, 37)), (False, (20, 13))):
        q, k, v = (_randn(1, 2, t, 16, seed=i).double().to(device).requires_grad_() for i, t in
                   enumerate((tq, tk, tk)))
        assert torch.autograd.gradcheck(lambda q, k, v: gpt2kernels.flash_attention(q, k, v, causal), (q, k, v),
                                    fast_mode=True)


def test_flash_attention_lse_is_the_log2_sum_exp2(device):
    q, k, v = (_randn(1, 2, 9, 16, seed=i).to(device) for i in range(3))
    _, lse = gpt2kernels.flash_attention_with_lse(q, k, v, False)
    scores = q.double() @ k.double().transpose(-1, -2) * 16 ** -0.5
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1) / torch.log(torch.tensor(2.0)),
                               atol=1e-5, rtol=1e-5)


# --- every op with a backward ------------------------------------------------------------------------
def test_backward_is_deterministic(device):
    x = _randn(70, 96, seed=1).to(device).requires_grad_()
    w, b = _randn(200, 96, seed=2).to(device).requires_grad_(), _randn(200, seed=3).to(device).requires_grad_()
    ln_w = (1 + _randn(96, seed=4)).to(device).requires_grad_()
    q = _randn(1, 2, 40, 32, seed=5).to(device).requires_grad_()

    def grads():
        y = gpt2kernels.linear(gpt2kernels.layer_norm(x, ln_w, b[:96]), w, b, "gelu_tanh")
        loss = y.square().sum() + gpt2kernels.flash_attention(q, q, q).square().sum()
        return torch.autograd.grad(loss, (x, w, b, ln_w, q))

    for a, b_ in zip(grads(), grads()):
        assert torch.equal(a, b_)


def test_ops_pass_opcheck_with_gradients(device):
    """opcheck's autograd-registration test runs because the inputs require grad."""
    def leaf(*shape, seed=0):
        return _randn(*shape, seed=seed).to(device).requires_grad_()

    x, r, w, b = leaf(3, 40, seed=1), leaf(3, 40, seed=2), leaf(40, seed=3), leaf(40, seed=4)
    opcheck(getattr(torch.ops, NS).layer_norm.default, (x, w, b, 1e-5))
    opcheck(getattr(torch.ops, NS).add_layer_norm.default, (x, r, w, b, 1e-5))
    wl, bl = leaf(24, 40, seed=5), leaf(24, seed=6)
    opcheck(getattr(torch.ops, NS).linear.default, (x, wl, bl, "gelu_tanh", leaf(3, 24, seed=7)))
    opcheck(getattr(torch.ops, NS).gelu_mlp.default, (x, leaf(64, 40), leaf(64), leaf(40, 64), leaf(40), r))
    q, k = leaf(1, 2, 9, 16, seed=8), leaf(1, 2, 12, 16, seed=9)
    opcheck(getattr(torch.ops, NS).flash_attention.default, (q, k, k, True, None))


def test_inference_only_ops_name_themselves(device):
    x = _randn(2, 64, seed=1).to(device).requires_grad_()
    w = _randn(192, 64, seed=2).to(device).requires_grad_()
    b, ln = torch.zeros(192, device=device), (torch.ones(64, device=device), torch.zeros(64, device=device))
    cache = torch.zeros(2, 2, 1, 8, 64, device=device)
    lens = torch.ones(2, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="gpt2kernels.ln_qkv_append is inference-only"):
        gpt2kernels.ln_qkv_append(x, *ln, w, b, cache[0], cache[1], lens)
    with pytest.raises(RuntimeError, match="gpt2kernels.ln_linear is inference-only"):
        gpt2kernels.ln_linear(x, *ln, w)
    with pytest.raises(RuntimeError, match="gpt2kernels.ln_linear is inference-only"):
        torch.ops.gpt2engine.ln_linear(x, *ln, w).sum().backward()  # past the Python face: at backward
    q = x.view(2, 1, 1, 64)
    with pytest.raises(RuntimeError, match="gpt2kernels.decode_attention is inference-only"):
        gpt2kernels.decode_attention(q, cache[0, :, :1], cache[1, :, :1], lens)
    wq, scale = gpt2kernels.quantize_int8(w.detach())
    y = gpt2kernels.linear(x, wq, None, weight_scale=scale)
    with pytest.raises(RuntimeError, match="gpt2kernels.linear with int8 weights is inference-only"):
        y.sum().backward()
    with torch.no_grad():  # inference with parameters that require grad still runs
        assert gpt2kernels.ln_linear(x, *ln, w).shape == (2, 192)


@pytest.mark.parametrize("m,n", [(37, 29), (70, 90)])  # the small-GEMM tiles, and the large ones
@pytest.mark.parametrize("dtype", GEMM_DTYPES)
def test_matmul_fusions_against_reference(m, n, dtype, device, monkeypatch):
    a, b, z = (_randn(*s, seed=i).to(device, dtype) for i, s in enumerate([(m, 50), (n, 50), (m, n)]))
    poison_empty(monkeypatch)
    for kwargs in ({}, {"gelu_a": True}, {"gelu_b": True}, {"gelu_grad_at": z}):
        for left in (a, a.t().contiguous().t()):  # row-major, and column-major as a transposed operand is
            got = gpt2kernels.matmul(left, b.t(), **kwargs)
            want = gpt2kernels.matmul_ref(a.double(), b.t().double(),
                                          **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
            if dtype == torch.float32:
                torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
            else:  # the inputs' rounding to 16 bits: relative to the largest value, as the other tests
                err = (got.double() - want).abs().max() / want.abs().max()
                assert err <= TOL[dtype], f"{kwargs}: relative error {err:.2e}"
    with pytest.raises(ValueError, match="b's first dim"):
        gpt2kernels.matmul(a, b)
