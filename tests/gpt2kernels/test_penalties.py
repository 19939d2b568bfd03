"""Penalties (Triton kernel and PyTorch reference) against HF's RepetitionPenaltyLogitsProcessor and
OpenAI's documented formula, the in-kernel count of the last token, and bad inputs."""

import pytest
import torch
from torch.library import opcheck

from gpt2kernels import apply_penalties, apply_penalties_ref, check_penalties
from gpt2kernels._ops import NS

IMPLS = {"triton": apply_penalties, "ref": apply_penalties_ref}


def _one_by_one(logits, prompt, output, repetition, presence, frequency):
    """HF's processor over prompt + output, then OpenAI's formula, token by token, in float64."""
    from transformers import RepetitionPenaltyLogitsProcessor

    x = RepetitionPenaltyLogitsProcessor(repetition)(torch.tensor([prompt + output]), logits[None].double())[0]
    for j in set(output):
        x[j] -= output.count(j) * frequency + presence
    return x


def _state(vocab, prompts, outputs, device):
    """counts of every output token but the last, which ``last_tokens`` hands to the op to count."""
    b = len(prompts)
    counts = torch.zeros(b, vocab, dtype=torch.int32)
    mask = torch.zeros(b, vocab, dtype=torch.bool)
    last = torch.full((b,), -1, dtype=torch.int64)
    for r in range(b):
        mask[r, prompts[r]] = True
        for t in outputs[r][:-1]:
            counts[r, t] += 1
        if outputs[r]:
            last[r] = outputs[r][-1]
    return counts.to(device), mask.to(device), last.to(device)


@pytest.mark.parametrize("vocab", [97, 1025, 50257])  # one block, a partial second block, GPT-2's
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("impl", IMPLS)
def test_penalties_equal_hf_and_openai(impl, dtype, vocab, device):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(5, vocab, generator=g) * 3).to(dtype)
    logits[:, 5] = 0.0  # a zero logit stays 0
    logits[4, 6] = -float("inf")
    prompts = [[1, 5, 5, 9], [], [3], [2, 2], [6, vocab - 1]]
    outputs = [[9, 9, 4, 60, 9], [7], [], [2, vocab - 1, vocab - 1], [vocab - 1, 6]]  # the last token: a boundary
    params = [(1.3, 0.5, 0.25), (0.8, -1.0, 2.0), (1.0, 0.0, 0.0), (2.0, 2.0, -2.0), (1.7, 0.3, 0.1)]
    counts, mask, last = _state(vocab, prompts, outputs, device)
    rep, pres, freq = (torch.tensor(col, dtype=torch.float32, device=device) for col in zip(*params))
    out = torch.full((5, vocab), float("nan"), device=device)
    out.copy_(IMPLS[impl](logits.to(device), counts, mask, last, rep, pres, freq))
    for r in range(5):
        want = _one_by_one(logits[r].float(), prompts[r], outputs[r], *params[r])
        torch.testing.assert_close(out[r].cpu().double(), want, rtol=2e-7, atol=1e-6)  # fp32 rounding of exact maths
        assert torch.equal(counts[r].cpu(), torch.bincount(torch.tensor(outputs[r], dtype=torch.long),
                                                            minlength=vocab).int())
    assert torch.equal(out[2].cpu(), logits[2].float())  # neutral penalties change nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_kernel_equals_reference_bit_for_bit(dtype, device):
    """Correctly rounded division and no fused multiply-adds: the kernel's sums round as torch's do."""
    g = torch.Generator().manual_seed(3)
    b, vocab = 7, 4231
    logits = (torch.randn(b, 2 * vocab, generator=g) * 5).to(dtype)[:, ::2].contiguous()
    counts = torch.randint(0, 3, (b, vocab), generator=g, dtype=torch.int32)
    mask = torch.rand(b, vocab, generator=g) < 0.1
    last = torch.randint(-1, vocab, (b,), generator=g)
    rep, pres, freq = torch.rand(b, generator=g) + 0.5, torch.rand(b, generator=g) * 4 - 2, \
        torch.rand(b, generator=g) * 4 - 2
    args = [t.to(device) for t in (logits, counts, mask, last, rep, pres, freq)]
    twin = [a.clone() for a in args]
    assert torch.equal(apply_penalties(*args), apply_penalties_ref(*twin))
    assert torch.equal(args[1], twin[1])  # the same counts, the last tokens counted once


def test_opcheck_compile_and_bad_inputs(device):
    b, v = 3, 50
    args = (torch.randn(b, v, device=device), torch.zeros(b, v, dtype=torch.int32, device=device),
            torch.zeros(b, v, dtype=torch.bool, device=device), torch.tensor([1, -1, 49], device=device),
            torch.ones(b, device=device), torch.zeros(b, device=device), torch.full((b,), 0.5, device=device))
    opcheck(getattr(torch.ops, NS).apply_penalties.default, args)
    compiled = torch.compile(lambda *a: apply_penalties(*a) * 2, fullgraph=True,
                             backend="aot_eager" if device.type == "cpu" else "inductor")
    twin = [a.clone() for a in args]
    assert torch.equal(compiled(*args), apply_penalties_ref(*twin) * 2)
    bad = list(args)
    bad[1] = bad[1].long()
    with pytest.raises(ValueError, match="counts has dtype torch.int64"):
        apply_penalties(*bad)
    bad = list(args)
    bad[2] = bad[2][:, :10]
    with pytest.raises(ValueError, match=r"prompt_mask has shape \[3, 10\], expected \[3, 50\]"):
        apply_penalties(*bad)


@pytest.mark.parametrize("kw,message", [
    (dict(repetition_penalty=0.0), "repetition_penalty must be finite and > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty must be in \\[-2, 2\\]"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(frequency_penalty="1"), "frequency_penalty must be a number"),
])
def test_bad_penalties(kw, message):
    with pytest.raises(ValueError, match=message):
        check_penalties(**kw)
