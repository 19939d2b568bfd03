"""Cross-entropy over a vocabulary, and the lm_head + cross-entropy fused so that the [N, V] logits
never exist at once; forward and backward.

``cross_entropy``: one program per row reads the row once for an online log-sum-exp in fp32, then
again (from L2, a row of GPT-2's vocabulary is 100 KB in fp16) to write the gradient
``(softmax - one_hot) * scale``, so the backward pass only multiplies it by the incoming gradient.

``linear_cross_entropy``: hidden [N, C] x weight [V, C] (the tied embedding) in chunks of rows.
Each chunk's logits come from one cuBLAS GEMM into a buffer reused by every chunk; the kernel above
turns them into their gradient in place; two more GEMMs take that into the grad of the chunk's
hidden rows and add it into the weight's grad (fp32). With ``reduction`` "mean" or "sum" all of
this runs in the forward (the backward scales by the incoming scalar), 3 GEMMs in all, as the
unfused path; with "none" the incoming gradient differs per row and reaches the weight's grad only
through the GEMM, so the backward recomputes the logits (4 GEMMs).

Rows whose target is ``ignore_index`` add nothing to the loss or the gradients. "mean" divides by
the number of other rows (NaN when there are none, as ``F.cross_entropy``). Losses and sums are fp32 (fp64 for
fp64 inputs, which gradcheck uses).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._ops import NS, TRAIN_DTYPES, acc_dtype, check_device, check_tensor, tl_acc

BLOCK_V = 4096  # 13 steps over GPT-2's row; 16 fp32 values a thread at 8 warps keeps registers low
WARPS = 8
REDUCTIONS = ("mean", "sum", "none")
# Rows per chunk of linear_cross_entropy: the chunk's logits take at most this many bytes (64 MB:
# 640 fp16 rows of GPT-2's vocabulary, a tenth of the unfused path's logits at N = 8K), GEMMs of
# M >= 256 rows, which cuBLAS runs near its peak.
CHUNK_BYTES = 64 * 2**20
MIN_CHUNK_ROWS = 256


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,      # (N, V) unit stride along V
    targets_ptr,     # (N,) int64
    loss_ptr,        # (N,) fp32 per-row loss (0 for ignored rows)
    grad_ptr,        # (N, V) the gradient, unit stride along V; may be logits_ptr (in place)
    scale_ptr,       # gradient scale in ACC: (1,) with scale_stride 0, or (N,) with 1
    V, stride_logits, stride_grad, scale_stride, ignore_index,
    BLOCK: tl.constexpr, HAS_GRAD: tl.constexpr, ACC: tl.constexpr,  # ACC: fp32, fp64 for fp64 logits
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    valid = (target >= 0) & (target < V)
    row_ptr = logits_ptr + row * stride_logits
    # Pass 1: running max m and sum s of exp(x - m). A block of -inf (masked vocabulary) keeps m at
    # -inf: the where()s keep exp(-inf - -inf) from turning the sums into NaN.
    m = tl.full((), -float("inf"), ACC)
    s = tl.zeros((), ACC)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, 0))
        finite = m_new != -float("inf")
        p = tl.where(x == -float("inf"), 0.0, tl.exp(x - m_new))
        s = tl.where(finite, s * tl.exp(m - m_new), 0.0) + tl.sum(p, 0)
        m = m_new
    log_s = tl.log(s)  # log-sum-exp = m + log_s; kept apart, so that m - x, exact, comes first
    x_target = tl.load(row_ptr + tl.where(valid, target, 0)).to(ACC)
    loss = tl.where(valid, (m - x_target) + log_s, float("nan"))  # an out-of-range target poisons its row
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    if HAS_GRAD:
        # Pass 2: (softmax - one_hot) * scale, 0 on ignored rows.
        scale = tl.where(ignored, 0.0, tl.load(scale_ptr + row * scale_stride))
        grad_row = grad_ptr + row * stride_grad
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < V
            x = tl.load(row_ptr + cols, mask=inside, other=0.0).to(ACC)
            g = tl.exp((x - m) - log_s) - (cols == target).to(ACC)
            tl.store(grad_row + cols, (g * scale).to(grad_ptr.dtype.element_ty), mask=inside)


def _launch(logits: Tensor, targets: Tensor, ignore_index: int, grad: Tensor | None,
            scale: Tensor | None) -> Tensor:
    """Per-row losses, (N,) in ``acc_dtype(logits.dtype)``; with ``grad`` (N, V), also write the
    gradient times ``scale`` ((1,) or (N,), that dtype) into it, which may be ``logits`` itself."""
    n, v = logits.shape
    loss = torch.empty(n, dtype=acc_dtype(logits.dtype), device=logits.device)
    if n == 0:
        return loss
    has_grad = grad is not None
    if not has_grad:
        grad, scale = logits, loss  # never read: any pointers of the right kind
    _cross_entropy_kernel[(n,)](
        logits, targets, loss, grad, scale, v, logits.stride(0), grad.stride(0),
        0 if scale.numel() == 1 else 1, ignore_index,
        BLOCK=min(BLOCK_V, triton.next_power_of_2(v)), HAS_GRAD=has_grad,
        ACC=tl_acc(loss.dtype), num_warps=WARPS)
    return loss


def _mean_scale(targets: Tensor, ignore_index: int, reduction: str, dtype: torch.dtype) -> Tensor:
    """The gradient scale of ``reduction``, (1,) in ``dtype`` on the targets' device:
    1 / (rows not ignored) for "mean" (inf when all are), 1 otherwise."""
    if reduction != "mean":
        return torch.ones(1, dtype=dtype, device=targets.device)
    return 1.0 / (targets != ignore_index).sum(dtype=dtype).reshape(1)


def _reduce(row_loss: Tensor, scale: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    return total * scale[0] if reduction == "mean" else total


# --- cross_entropy -----------------------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(logits: Tensor, targets: Tensor, ignore_index: int, reduction: str,
                       compute_grad: bool) -> tuple[Tensor, Tensor]:
    """(loss, gradient of the loss for the logits, or an empty tensor without ``compute_grad``)."""
    scale = _mean_scale(targets, ignore_index, reduction, acc_dtype(logits.dtype))
    grad = torch.empty_like(logits) if compute_grad else None
    row_loss = _launch(logits, targets, ignore_index, grad, scale)
    return _reduce(row_loss, scale, reduction), (grad if compute_grad else logits.new_empty(0))


@_cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index, reduction, compute_grad):
    loss = logits.new_empty((logits.shape[0],) if reduction == "none" else (), dtype=acc_dtype(logits.dtype))
    return loss, (torch.empty_like(logits) if compute_grad else logits.new_empty(0))


def _cross_entropy_setup(ctx, inputs, output):
    ctx.reduction = inputs[3]
    ctx.save_for_backward(output[1])


def _cross_entropy_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    g = grad_loss[:, None] if ctx.reduction == "none" else grad_loss
    return grad * g.to(grad.dtype), None, None, None, None


torch.library.register_autograd(f"{NS}::cross_entropy_fwd", _cross_entropy_backward,
                                setup_context=_cross_entropy_setup)


def _check_targets(targets: Tensor, n: int, v: int, ignore_index: int, device: torch.device) -> Tensor:
    """int64 targets, each ``ignore_index`` or in [0, v); raises ValueError naming a bad one. The range
    check reads one value back (a host sync), skipped while torch.compile traces."""
    check_tensor("targets", targets, dtypes=(torch.int64, torch.int32), shape=(n,), device=device)
    targets = targets.long()
    if not torch.compiler.is_compiling() and n:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"targets[{i}] = {int(targets[i])} is outside the vocabulary [0, {v}) "
                             f"and is not ignore_index ({ignore_index})")
    return targets


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """``F.cross_entropy(logits.float(), targets, ignore_index=..., reduction=...)`` in one kernel,
    differentiable: the gradient is computed with the loss, in the logits' dtype.

    Args:
        logits: (N, V) fp32/fp16/bf16, unit stride along V.
        targets: (N,) int64 (or int32) class per row, in [0, V) or ``ignore_index``.
        reduction: "mean" over rows not ignored, "sum", or "none" (per row, 0 where ignored).
    Returns:
        fp32 loss: a scalar, or (N,) for "none".
    """
    check_device("cross_entropy", logits)
    _check_reduction(reduction)
    check_tensor("logits", logits, ndim=2, dtypes=TRAIN_DTYPES)
    n, v = logits.shape
    targets = _check_targets(targets, n, v, ignore_index, logits.device)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    return _cross_entropy_fwd(logits, targets, ignore_index, reduction, compute_grad)[0]


def cross_entropy_ref(logits: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """``cross_entropy`` in plain PyTorch: ``F.cross_entropy`` on fp32 logits."""
    return torch.nn.functional.cross_entropy(logits.to(acc_dtype(logits.dtype)), targets.long(),
                                             ignore_index=ignore_index, reduction=reduction)


# --- linear_cross_entropy ----------------------------------------------------------------------------
def chunk_rows(n: int, v: int, dtype: torch.dtype) -> int:
    """Rows per chunk of ``linear_cross_entropy`` (see CHUNK_BYTES), a multiple of 64."""
    rows = CHUNK_BYTES // (_padded(v) * dtype.itemsize) // 64 * 64
    return max(1, min(n, max(MIN_CHUNK_ROWS, rows)))


def _padded(v: int) -> int:
    # Each chunk's logits are written with a row stride rounded up to 64 elements, so that every
    # row (and each part of ``_vocab_parts``) starts aligned for cuBLAS. Alone it did not make the
    # GEMMs fast on the H200 (32.8 ms, against 10.4 with the split as well).
    return -(-v // 64) * 64


def _vocab_parts(v: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of the vocabulary for the GEMMs: a multiple of 64, then the rest. On an H200
    (bf16, C = 1600, N = 8K) cuBLAS ran GEMMs whose N or K is GPT-2's odd 50257 at ~90 TFLOP/s, and
    torch.compile, which pads them, the same three GEMMs ~5x faster; the 17-wide rest costs little."""
    main = v // 64 * 64
    return [(lo, hi) for lo, hi in ((0, main), (main, v)) if hi > lo]


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32, or fp64 for fp64) += a @ b; fp16/bf16 ``a`` and ``b`` multiply without an fp32 copy."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    else:  # CPU has no mixed-dtype addmm
        acc.add_(torch.mm(a, b).float())


def _chunked(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, ignore_index: int,
             scale: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row losses (fp32 (N,)) and, with ``scale`` (fp32 (1,) or (N,)), the gradients of
    sum(row_loss * scale) for hidden, weight and bias (empty tensors without ``scale`` or bias)."""
    n, c = hidden.shape
    v = weight.shape[0]
    rows = chunk_rows(n, v, hidden.dtype)
    buf = torch.empty(rows, _padded(v), dtype=hidden.dtype, device=hidden.device)
    acc = acc_dtype(hidden.dtype)
    row_loss = torch.empty(n, dtype=acc, device=hidden.device)
    grad_h = torch.empty_like(hidden) if scale is not None else hidden.new_empty(0)  # outputs of an op: never
    grad_w = torch.zeros(v, c, dtype=acc, device=hidden.device) if scale is not None \
        else hidden.new_empty(0)  # one tensor twice
    grad_b = torch.zeros(v, dtype=acc, device=hidden.device) if scale is not None and bias is not None \
        else hidden.new_empty(0)
    parts = _vocab_parts(v)
    for start in range(0, n, rows):
        end = min(n, start + rows)
        h = hidden[start:end]
        logits = buf[:end - start, :v]
        for lo, hi in parts:
            if bias is None:
                torch.mm(h, weight[lo:hi].t(), out=logits[:, lo:hi])
            else:
                torch.addmm(bias[lo:hi], h, weight[lo:hi].t(), out=logits[:, lo:hi])
        chunk_scale = None if scale is None else (scale if scale.numel() == 1 else scale[start:end])
        row_loss[start:end] = _launch(logits, targets[start:end], ignore_index,
                                      None if scale is None else logits, chunk_scale)
        if scale is None:
            continue
        # logits now hold their gradient
        (lo, hi), *tail = parts
        torch.mm(logits[:, lo:hi], weight[lo:hi], out=grad_h[start:end])
        for lo, hi in tail:
            grad_h[start:end].addmm_(logits[:, lo:hi], weight[lo:hi])
        for lo, hi in parts:
            _accumulate_mm(grad_w[lo:hi], logits[:, lo:hi].t(), h)
        if bias is not None:
            grad_b += logits.sum(0, dtype=acc)
    if scale is not None:
        grad_w = grad_w.to(weight.dtype)
        grad_b = grad_b.to(bias.dtype) if bias is not None else grad_b
    return row_loss, grad_h, grad_w, grad_b


@torch.library.custom_op(f"{NS}::linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None,
                              ignore_index: int, reduction: str,
                              compute_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, per-row target log-probabilities, and with ``compute_grad`` and a reduction other
    than "none" the loss's gradients for hidden, weight and bias; empty tensors otherwise)."""
    scale = _mean_scale(targets, ignore_index, reduction, acc_dtype(hidden.dtype))
    grads_now = compute_grad and reduction != "none"
    row_loss, grad_h, grad_w, grad_b = _chunked(hidden, weight, targets, bias, ignore_index,
                                                scale if grads_now else None)
    return _reduce(row_loss, scale, reduction), -row_loss, grad_h, grad_w, grad_b


@_linear_cross_entropy_fwd.register_fake
def _(hidden, weight, targets, bias, ignore_index, reduction, compute_grad):
    n = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    loss = hidden.new_empty((n,) if reduction == "none" else (), dtype=acc)
    grads_now = compute_grad and reduction != "none"
    return (loss, hidden.new_empty(n, dtype=acc),
            torch.empty_like(hidden) if grads_now else hidden.new_empty(0),
            torch.empty_like(weight) if grads_now else hidden.new_empty(0),
            torch.empty_like(bias) if grads_now and bias is not None else hidden.new_empty(0))


@torch.library.custom_op(f"{NS}::linear_cross_entropy_bwd", mutates_args=())
def _linear_cross_entropy_bwd(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None,
                              ignore_index: int, row_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(row_loss * row_scale) for hidden, weight and bias (empty without bias): the
    chunks again, for reduction "none"."""
    scale = row_scale.to(acc_dtype(hidden.dtype)).contiguous()
    _, grad_h, grad_w, grad_b = _chunked(hidden, weight, targets, bias, ignore_index, scale)
    return grad_h, grad_w, grad_b


@_linear_cross_entropy_bwd.register_fake
def _(hidden, weight, targets, bias, ignore_index, row_scale):
    return torch.empty_like(hidden), torch.empty_like(weight), \
        (torch.empty_like(bias) if bias is not None else hidden.new_empty(0))


def _linear_cross_entropy_setup(ctx, inputs, output):
    hidden, weight, targets, bias, ignore_index, reduction, _ = inputs
    ctx.reduction, ctx.ignore_index, ctx.has_bias = reduction, ignore_index, bias is not None
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, targets, bias)
    else:
        ctx.save_for_backward(*output[2:])


def _linear_cross_entropy_backward(ctx, grad_loss, _grad_logprobs, *_grads_of_grads):
    if ctx.reduction == "none":
        hidden, weight, targets, bias = ctx.saved_tensors
        grad_h, grad_w, grad_b = _linear_cross_entropy_bwd(hidden, weight, targets, bias, ctx.ignore_index, grad_loss)
    else:
        grad_h, grad_w, grad_b = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    return grad_h, grad_w, None, grad_b if ctx.has_bias else None, None, None, None


torch.library.register_autograd(f"{NS}::linear_cross_entropy_fwd", _linear_cross_entropy_backward,
                                setup_context=_linear_cross_entropy_setup)


def _check_linear_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    check_tensor("hidden", hidden, ndim=2, dtypes=TRAIN_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=TRAIN_DTYPES, dtype=hidden.dtype, device=hidden.device,
                 last_dim_contiguous=False)  # only cuBLAS reads it, in any layout
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight has shape {list(weight.shape)}: its second dim must be hidden's width "
                         f"{hidden.shape[1]} (weight is [vocab, width], as nn.Linear's)")
    if bias is not None:
        check_tensor("bias", bias, shape=(weight.shape[0],), dtypes=TRAIN_DTYPES, dtype=hidden.dtype,
                     device=hidden.device)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         return_logprobs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ...)`` without ever holding
    the (N, V) logits: chunks of rows, differentiable for hidden, weight and bias (see the module
    docstring for what runs when).

    Args:
        hidden: (N, C) fp32/fp16/bf16 (flatten batch and time first).
        weight: (V, C) in hidden's dtype, e.g. GPT-2's tied ``wte``; bias: (V,) or None.
        targets: (N,) int64 (or int32), in [0, V) or ``ignore_index``.
        reduction: "mean" over rows not ignored, "sum", or "none" (per row, 0 where ignored).
        return_logprobs: also return each row's log p(target), fp32 (N,), 0 where ignored
            (not differentiable).
    Returns:
        The fp32 loss (a scalar, or (N,) for "none"), and the log-probabilities if asked.
    """
    check_device("linear_cross_entropy", hidden)
    _check_reduction(reduction)
    _check_linear_inputs(hidden, weight, bias)
    targets = _check_targets(targets, hidden.shape[0], weight.shape[0], ignore_index, hidden.device)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, logprobs, *_ = _linear_cross_entropy_fwd(hidden, weight, targets, bias, ignore_index, reduction,
                                                   compute_grad)
    return (loss, logprobs.detach()) if return_logprobs else loss


def linear_cross_entropy_ref(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                             ignore_index: int = -100, reduction: str = "mean",
                             return_logprobs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``linear_cross_entropy`` in plain PyTorch, chunk by chunk as well (so that it too never holds
    the (N, V) logits; autograd keeps every chunk's for the backward)."""
    _check_reduction(reduction)
    targets = targets.long()
    rows = chunk_rows(hidden.shape[0], weight.shape[0], hidden.dtype)
    acc = acc_dtype(hidden.dtype)

    def chunk_loss(start: int) -> Tensor:
        logits = torch.nn.functional.linear(hidden[start:start + rows], weight, bias).to(acc)
        return torch.nn.functional.cross_entropy(logits, targets[start:start + rows], ignore_index=ignore_index,
                                                 reduction="none")

    n = hidden.shape[0]
    row_loss = torch.cat([chunk_loss(s) for s in range(0, n, rows)]) if n else hidden.new_zeros(0, dtype=acc)
    loss = _reduce(row_loss, _mean_scale(targets, ignore_index, reduction, row_loss.dtype), reduction)
    return (loss, -row_loss.detach()) if return_logprobs else loss


def aot_launches() -> None:
    """The kernel at GPT-2's vocabulary, fp16/bf16/fp32 logits, with and without the gradient. For
    ``gpt2kernels.aot``."""
    from .aot import GPT2_VOCAB

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        logits = torch.empty(4, _padded(GPT2_VOCAB), dtype=dtype)[:, :GPT2_VOCAB]
        targets = torch.zeros(4, dtype=torch.int64)
        _launch(logits, targets, -100, None, None)
        _launch(logits, targets, -100, logits, torch.ones(1))
        _launch(logits, targets, -100, torch.empty(4, GPT2_VOCAB, dtype=dtype), torch.ones(4))
