"""cross_entropy and linear_cross_entropy (Triton kernel and PyTorch reference) against
F.cross_entropy in float64: losses, gradients, ignore_index, the reductions, extreme logits, the
chunking, log-probabilities, gradcheck, the custom ops' registration and bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import gpt2kernels
import gpt2kernels.loss as ce
from gpt2kernels import cross_entropy, cross_entropy_ref, linear_cross_entropy, linear_cross_entropy_ref
from gpt2kernels._ops import NS

from .helpers import poison_empty

CE = {"triton": cross_entropy, "ref": cross_entropy_ref}
LCE = {"triton": linear_cross_entropy, "ref": linear_cross_entropy_ref}
# (loss atol, loss rtol, grad atol): fp32 is fp32 rounding; fp16 and bf16 logits are exact inputs
# (the reference reads the same rounded values) but their gradients are stored in that dtype.
CE_TOL = {torch.float32: (1e-5, 1e-5, 1e-6), torch.float16: (1e-5, 1e-5, 1e-3), torch.bfloat16: (1e-5, 1e-5, 8e-3)}


def _targets(n, v, g, ignored=()):
    t = torch.randint(0, v, (n,), generator=g)
    t[list(ignored)] = -100
    return t


def _grads64(loss_fn, *inputs):
    """Loss and gradients of ``loss_fn`` over float64 copies of ``inputs``."""
    xs = [x.detach().double().requires_grad_() for x in inputs]
    loss = loss_fn(*xs)
    return loss.detach(), torch.autograd.grad(loss.sum(), xs)


@pytest.mark.parametrize("v", [1, 97, 4096, 4231])  # one class, one partial block, exactly a block, 2 blocks
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("impl", CE)
def test_cross_entropy_equals_torch_in_float64(impl, dtype, reduction, v, device, monkeypatch):
    g = torch.Generator().manual_seed(v)
    n = 9
    logits = (torch.randn(n, v, generator=g) * 4).to(dtype)
    targets = _targets(n, v, g, ignored=(3,))
    targets[0] = v - 1  # the last class, in the last partial block
    poison_empty(monkeypatch)
    x = logits.to(device).requires_grad_()
    loss = CE[impl](x, targets.to(device), reduction=reduction)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    want, (want_grad,) = _grads64(lambda x: F.cross_entropy(x, targets, reduction=reduction), logits)
    atol, rtol, gatol = CE_TOL[dtype]
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.detach().cpu().double(), want, atol=atol * max(1, n if reduction == "sum" else 1),
                               rtol=rtol)
    torch.testing.assert_close(grad.cpu().double(), want_grad, atol=gatol, rtol=0)
    assert not grad[3].any()  # the ignored row


@pytest.mark.gpu
@pytest.mark.parametrize("impl", CE)
def test_cross_entropy_bf16(impl, device):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 50257, generator=g) * 3).bfloat16()
    targets = _targets(64, 50257, g, ignored=(0, 5))
    x = logits.to(device).requires_grad_()
    loss = CE[impl](x, targets.to(device))
    (grad,) = torch.autograd.grad(loss, x)
    want, (want_grad,) = _grads64(lambda x: F.cross_entropy(x, targets), logits)
    torch.testing.assert_close(loss.detach().cpu().double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), want_grad, atol=8e-3 / 62, rtol=0)


@pytest.mark.parametrize("impl", CE)
def test_cross_entropy_gpt2_vocab_and_extreme_logits(impl, device):
    """GPT-2's 50257 classes (13 blocks), logits of +-1e4 (exp would overflow without the running
    max), a masked vocabulary (-inf) and a first block that is entirely -inf."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50257, generator=g) * 3
    logits[0, 7], logits[0, 8] = 1e4, -1e4
    logits[1, ::2] = -float("inf")
    logits[2, :4096 + 10] = -float("inf")
    logits[3, :] = -1e4
    targets = torch.tensor([7, 1, 5000, 3])
    x = logits.to(device).requires_grad_()
    loss = CE[impl](x, targets.to(device), reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    want, (want_grad,) = _grads64(lambda x: F.cross_entropy(x, targets, reduction="none"), logits)
    torch.testing.assert_close(loss.detach().cpu().double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), want_grad, atol=1e-6, rtol=0)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", CE)
def test_cross_entropy_all_rows_ignored_and_one_row(impl, reduction, device):
    logits = torch.randn(3, 50, device=device, requires_grad=True)
    targets = torch.full((3,), -7, device=device)
    loss = CE[impl](logits, targets, ignore_index=-7, reduction=reduction)
    want = F.cross_entropy(logits.detach().cpu(), targets.cpu(), ignore_index=-7, reduction=reduction)
    torch.testing.assert_close(loss.detach().cpu(), want, equal_nan=True)  # mean: 0 / 0 = NaN, as torch
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert not grad.any()
    one = torch.randn(1, 50, device=device)
    torch.testing.assert_close(CE[impl](one, torch.tensor([4], device=device)).cpu(),
                               F.cross_entropy(one.cpu(), torch.tensor([4])))


def test_cross_entropy_gradcheck_float64(device):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 11, generator=g, dtype=torch.float64).to(device).requires_grad_()
    targets = _targets(5, 11, g, ignored=(2,)).to(device)
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(lambda x: cross_entropy(x, targets, reduction=reduction), (logits,),
                                        fast_mode=True)  # random projections: each call is an interpreted kernel


def test_cross_entropy_without_grad_writes_no_gradient(device, monkeypatch):
    launches = []
    real = ce._launch
    monkeypatch.setattr(ce, "_launch", lambda *a: launches.append(a[3]) or real(*a))
    logits = torch.randn(4, 30, device=device)
    cross_entropy(logits, torch.tensor([1, 2, 3, 4], device=device))
    with torch.no_grad():
        cross_entropy(logits.requires_grad_(), torch.tensor([1, 2, 3, 4], device=device))
    assert launches == [None, None]


# --- linear_cross_entropy ----------------------------------------------------------------------------
def _small_chunks(monkeypatch, rows):
    """Chunks of ``rows`` rows whatever the vocabulary, so small tests cross chunk boundaries."""
    monkeypatch.setattr(ce, "chunk_rows", lambda n, v, dtype: max(1, min(n, rows)))


LCE_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-2, 2e-2)}  # fp16: logits and grads rounded


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("impl", LCE)
def test_linear_cross_entropy_equals_torch_in_float64(impl, dtype, reduction, bias, device, monkeypatch):
    g = torch.Generator().manual_seed(11)
    n, c, v = 70, 48, 4231  # 70 rows in chunks of 32: two full, one partial
    hidden = torch.randn(n, c, generator=g).to(dtype)
    weight = (torch.randn(v, c, generator=g) / c**0.5).to(dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype) if bias else None
    targets = _targets(n, v, g, ignored=(0, 33, 69))
    _small_chunks(monkeypatch, 32)
    inputs = [t.to(device).requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    loss, logprobs = LCE[impl](inputs[0], inputs[1], targets.to(device), inputs[2] if bias else None,
                               reduction=reduction, return_logprobs=True)
    grads = torch.autograd.grad(loss.sum(), inputs)

    def torch_loss(h, w, *bb):
        return F.cross_entropy(F.linear(h, w, bb[0] if bb else None), targets, reduction=reduction)

    want, want_grads = _grads64(torch_loss, hidden, weight, *((b,) if bias else ()))
    atol, rtol = LCE_TOL[dtype]
    scale = n if reduction == "sum" else 1
    torch.testing.assert_close(loss.detach().cpu().double(), want, atol=atol * scale, rtol=rtol)
    for got, exp in zip(grads, want_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.cpu().double(), exp, atol=atol * exp.abs().max().item(), rtol=rtol)
    rows = F.cross_entropy(F.linear(hidden.double(), weight.double(), None if b is None else b.double()), targets,
                           reduction="none")
    torch.testing.assert_close(logprobs.cpu().double(), -rows, atol=atol, rtol=rtol)
    assert logprobs[33] == 0 and not logprobs.requires_grad


def test_linear_cross_entropy_gradcheck_float64(device, monkeypatch):
    g = torch.Generator().manual_seed(5)
    _small_chunks(monkeypatch, 3)  # 5 rows: two chunks
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    bias = torch.randn(7, generator=g, dtype=torch.float64).to(device).requires_grad_()
    targets = _targets(5, 7, g, ignored=(3,)).to(device)
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda h, w, b: linear_cross_entropy(h, w, targets, b, reduction=reduction), (hidden, weight, bias),
            fast_mode=True)


def test_linear_cross_entropy_never_holds_the_logits(device, monkeypatch):
    """Every GEMM output the op allocates is at most one chunk of logits: N x V never exists."""
    n, c, v = 64, 16, 1000
    _small_chunks(monkeypatch, 16)
    sizes = []
    real_empty = torch.empty

    def tracking_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        sizes.append(t.numel())
        return t

    monkeypatch.setattr(torch, "empty", tracking_empty)
    hidden = torch.randn(n, c, device=device, requires_grad=True)
    weight = torch.randn(v, c, device=device, requires_grad=True)
    linear_cross_entropy(hidden, weight, torch.randint(0, v, (n,), device=device)).backward()
    assert max(sizes) == 16 * ce._padded(v) < n * v
    assert hidden.grad is not None and weight.grad is not None


def test_chunk_rows_fit_the_budget():
    for v, dtype in ((50257, torch.float16), (50257, torch.float32), (50257, torch.bfloat16)):
        rows = ce.chunk_rows(100_000, v, dtype)
        assert rows % 64 == 0 and rows >= ce.MIN_CHUNK_ROWS
        assert rows * ce._padded(v) * dtype.itemsize <= max(ce.CHUNK_BYTES, ce.MIN_CHUNK_ROWS * ce._padded(v) * 4)
    assert ce.chunk_rows(5, 50257, torch.float16) == 5
    assert ce._padded(50257) == 50304


# --- registration and bad input ----------------------------------------------------------------------
def test_ops_pass_opcheck(device):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 40, generator=g).to(device).requires_grad_()
    targets = _targets(6, 40, g, ignored=(1,)).to(device)
    for reduction in ("mean", "none"):
        opcheck(getattr(torch.ops, NS).cross_entropy_fwd.default, (logits, targets, -100, reduction, True))
    hidden = torch.randn(6, 8, generator=g).to(device).requires_grad_()
    weight = torch.randn(40, 8, generator=g).to(device).requires_grad_()
    for reduction, bias in (("mean", None), ("none", torch.randn(40, device=device))):
        opcheck(getattr(torch.ops, NS).linear_cross_entropy_fwd.default,
                (hidden, weight, targets, bias, -100, reduction, True))
    opcheck(getattr(torch.ops, NS).linear_cross_entropy_bwd.default,
            (hidden.detach(), weight.detach(), targets, None, -100, torch.rand(6, device=device)))


def test_ops_trace_under_torch_compile(device):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(10, 8, generator=g).to(device).requires_grad_()
    weight = torch.randn(30, 8, generator=g).to(device).requires_grad_()
    targets = _targets(10, 30, g).to(device)

    def loss_fn(h, w):
        return linear_cross_entropy(h, w, targets) + cross_entropy(h @ w.t(), targets)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(hidden, weight)
    got.backward()
    want = loss_fn(hidden.detach(), weight.detach())
    torch.testing.assert_close(got.detach(), want)
    assert hidden.grad is not None


@pytest.mark.parametrize("call, message", [
    (lambda d: cross_entropy(torch.randn(3, 10, device=d), torch.tensor([1, 10, 2], device=d)),
     r"targets\[1\] = 10 is outside the vocabulary \[0, 10\)"),
    (lambda d: cross_entropy(torch.randn(3, 10, device=d), torch.tensor([1, -1, 2], device=d)),
     r"targets\[1\] = -1 .*not ignore_index \(-100\)"),
    (lambda d: cross_entropy(torch.randn(3, 10, device=d), torch.tensor([1, 2], device=d)), "targets has shape"),
    (lambda d: cross_entropy(torch.randn(3, 10, device=d), torch.tensor([1., 2., 3.], device=d)), "targets has dtype"),
    (lambda d: cross_entropy(torch.randn(3, 10, device=d), torch.tensor([1, 2, 3], device=d), reduction="avg"),
     "reduction must be one of mean, sum, none, got 'avg'"),
    (lambda d: linear_cross_entropy(torch.randn(3, 8, device=d), torch.randn(10, 7, device=d),
                                    torch.tensor([1, 2, 3], device=d)), "second dim must be hidden's width 8"),
    (lambda d: linear_cross_entropy(torch.randn(3, 8, device=d), torch.randn(10, 8, device=d).half(),
                                    torch.tensor([1, 2, 3], device=d)), "weight has dtype torch.float16"),
    (lambda d: linear_cross_entropy(torch.randn(3, 8, device=d), torch.randn(10, 8, device=d),
                                    torch.tensor([1, 2, 3], device=d), bias=torch.randn(9, device=d)),
     "bias has shape"),
])
def test_bad_input_is_a_clear_error(call, message, device):
    with pytest.raises(ValueError, match=message):
        call(device)


def test_exported_from_kernels():
    for name in ("cross_entropy", "cross_entropy_ref", "linear_cross_entropy", "linear_cross_entropy_ref"):
        assert name in gpt2kernels.__all__
