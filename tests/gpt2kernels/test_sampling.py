"""The samplers (PyTorch reference, the compiled C++/CUDA one and, on a GPU, the split one): hard
invariants, agreement with each other, and a chi-square fit against the exact distribution, with the
harness's power shown."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy import stats

from gpt2kernels.sampling import row_parameters, row_seeds, sample, sample_ref
from gpt2kernels.sampling_split import sample_split

SAMPLERS = {"ref": sample_ref, "compiled": sample}

DRAWS = 200_000


def _expected(logits, temperature, top_k, top_p, min_p=0.0):
    """The exact float64 distribution the semantics define, written independently of sample_ref."""
    x = logits.double() / temperature
    vals, order = torch.sort(x, descending=True, stable=True)
    if top_k:
        vals = torch.where(vals >= vals[top_k - 1], vals, -math.inf)
    p = torch.softmax(vals, 0)
    before = torch.cumsum(p, 0) - p
    keep = before < top_p
    keep[0] = True
    p = torch.where(keep & (p >= min_p * p[0]), p, 0.0)  # min-p: against the top token's probability
    out = torch.zeros_like(p)
    out[order] = p / p.sum()
    return out


def _chi2_pvalue(counts, probs):
    """Pearson chi-square, pooling bins expected below 5; a drawn token of probability 0 gives p = 0."""
    n = counts.sum()
    if (counts[probs == 0] > 0).any():
        return 0.0
    exp = probs * n
    big = exp >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]]).double()
    ex = torch.cat([exp[big], exp[~big].sum()[None]])
    if ex[-1] == 0:
        obs, ex = obs[:-1], ex[:-1]
    return stats.chisquare(obs.numpy(), ex.numpy()).pvalue


def _draw(sampler, logits, draws, seed, **kw):
    """Counts per token over ``draws`` rows of stride 0 (one uniform per row makes them independent)."""
    chunk = max(1, min(draws, 50_000_000 // logits.shape[-1]))  # bound the sort's memory at large vocab
    counts = torch.zeros(logits.shape[-1], dtype=torch.long)
    for offset, start in enumerate(range(0, draws, chunk)):
        rows = logits.expand(min(chunk, draws - start), -1)
        counts += torch.bincount(sampler(rows, seed=seed, offset=offset, **kw), minlength=logits.shape[-1]).cpu()
    return counts


SETTINGS = [  # (vocab, temperature, top_k, top_p, min_p): none binds, top-k, top-p, both, min-p, all three
    (7, 1.0, 0, 1.0, 0.0), (7, 0.7, 3, 1.0, 0.0), (111, 1.3, 0, 0.8, 0.0), (111, 1.0, 20, 0.9, 0.0),
    (50257, 0.9, 50, 0.95, 0.0), (111, 1.0, 0, 1.0, 0.1), (111, 1.2, 30, 0.95, 0.05),
]


@pytest.mark.parametrize("vocab,temperature,top_k,top_p,min_p", SETTINGS)
@pytest.mark.parametrize("name", SAMPLERS)
def test_chi_square_fit(name, vocab, temperature, top_k, top_p, min_p, device):
    logits = (torch.randn(1, vocab, generator=torch.Generator().manual_seed(vocab)) * 2).to(device)
    # 50257-wide draws: ~1.4 ms (ref), ~0.6 ms (C++)
    draws = DRAWS if vocab < 1000 else (5_000 if name == "ref" else 20_000)
    counts = _draw(SAMPLERS[name], logits, draws, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   seed=5).cpu()
    assert _chi2_pvalue(counts, _expected(logits[0].cpu(), temperature, top_k, top_p, min_p)) > 1e-6


def _split_sampler(rows):
    """The split sampler (``gpt2kernels.sampling_split``) with ``sample``'s arguments, fed ``rows``
    rows a call; row r still draws with seed ``seed + r``."""
    def sampler(logits, temperature=1.0, top_k=0, top_p=1.0, seed=0, offset=0, min_p=0.0):
        n, dev = logits.shape[0], logits.device
        per_row = (*row_parameters(n, dev, temperature, top_k, top_p, min_p), row_seeds(seed, n, dev),
                   torch.full((n,), offset, dtype=torch.int64, device=dev))
        return torch.cat([sample_split(logits[i:i + rows], *(t[i:i + rows] for t in per_row))
                          for i in range(0, n, rows)])
    return sampler


@pytest.mark.gpu
@pytest.mark.parametrize("vocab,temperature,top_k,top_p,min_p", SETTINGS)
@pytest.mark.parametrize("rows", [1, 100])
def test_chi_square_fit_of_the_split_sampler(rows, vocab, temperature, top_k, top_p, min_p):
    """The split sampler at batch 1 and at 100 rows a call (``compiled`` above takes the CUDA
    one-block-per-row sampler on a GPU: its calls hold >= 994 rows). A batch-1 call costs ~6
    launches through Python, so batch 1 draws fewer (and its test has less power)."""
    logits = (torch.randn(1, vocab, generator=torch.Generator().manual_seed(vocab)) * 2).cuda()
    draws = 20_000 if rows == 1 or vocab >= 1000 else DRAWS
    counts = _draw(_split_sampler(rows), logits, draws, temperature=temperature, top_k=top_k, top_p=top_p,
                   min_p=min_p, seed=5).cpu()
    assert _chi2_pvalue(counts, _expected(logits[0].cpu(), temperature, top_k, top_p, min_p)) > 1e-6


def _no_renormalisation(logits, temperature, top_k, top_p, seed, offset, min_p):
    # Keeps the survivors' full-softmax probabilities and gives the rest of the mass to the top token.
    x = logits.float() / temperature
    p = torch.softmax(x, -1)
    keep = x >= x.topk(top_k, -1).values[:, -1:]
    p = torch.where(keep, p, 0.0)
    p[:, 0] += 1 - p.sum(-1)
    return torch.multinomial(p, 1, generator=torch.Generator().manual_seed(seed + offset)).squeeze(1)


BROKEN = {
    "no_renormalisation": _no_renormalisation,
    "top_k_off_by_one": lambda logits, top_k, **kw: sample_ref(logits, top_k=top_k + 1, **kw),
    "temperature_after_softmax": lambda logits, temperature, **kw: sample_ref(logits, temperature=1.0, **kw),
    "top_p_boundary_inclusive": lambda logits, top_p, **kw: sample_ref(logits, top_p=top_p - 0.05, **kw),
    # min-p before the temperature: the threshold taken on the unscaled distribution
    "min_p_before_temperature": lambda logits, temperature, min_p, **kw: sample_ref(
        logits, temperature=temperature, min_p=min_p ** (1 / temperature), **kw),
}


@pytest.mark.parametrize("name", BROKEN)
def test_harness_rejects_broken_samplers(name):
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.6, 0.2, -0.5, -1.0]])
    logits = logits[:, torch.argsort(torch.rand(7, generator=torch.Generator().manual_seed(1)))]
    kw = {"top_p_boundary_inclusive": dict(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0),
          "min_p_before_temperature": dict(temperature=2.0, top_k=0, top_p=1.0, min_p=0.3)}.get(
        name, dict(temperature=0.7, top_k=3, top_p=1.0, min_p=0.0))
    counts = _draw(BROKEN[name], logits, DRAWS, seed=5, **kw)
    assert _chi2_pvalue(counts, _expected(logits[0].cpu(), **kw)) < 1e-6


@pytest.mark.parametrize("name", SAMPLERS)
def test_hard_invariants(name, device):
    sample_ref = SAMPLERS[name]  # noqa: F811 - the same checks for every implementation
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g).to(device)
    logits[:, 7] = logits[:, 11] = 50.0  # a tie for the maximum: the first index wins
    assert (sample_ref(logits, temperature=0) == 7).all()
    assert (sample_ref(logits, temperature=1.0, top_k=1, seed=3) == 7).all()
    x = torch.randn(64, 300, generator=g).to(device)
    top10 = x.topk(10, -1).indices
    tok = sample_ref(x, temperature=1.5, top_k=10, seed=1)
    assert (top10 == tok[:, None]).any(-1).all()
    masked = x.clone()
    masked[:, ::2] = -math.inf
    assert (sample_ref(masked, seed=2) % 2 == 1).all()
    one_hot = torch.full((4, 300), -math.inf, device=device)
    one_hot[torch.arange(4), torch.tensor([3, 99, 0, 299])] = 0.0
    assert sample_ref(one_hot, top_k=5000, top_p=0.5, seed=1).tolist() == [3, 99, 0, 299]


@pytest.mark.parametrize("name", SAMPLERS)
def test_determinism_row_independence_and_flagged_rows(name, device):
    sample_ref = SAMPLERS[name]  # noqa: F811
    x = torch.randn(8, 1000, generator=torch.Generator().manual_seed(1)).to(device)
    a = sample_ref(x, top_p=0.9, seed=11, offset=4)
    assert torch.equal(a, sample_ref(x, top_p=0.9, seed=11, offset=4))
    assert not torch.equal(a, sample_ref(x, top_p=0.9, seed=11, offset=5))
    y = x.clone()
    y[3] = torch.randn(1000, device=device)
    y[5] = float("nan")
    y[6] = -math.inf
    b = sample_ref(y, top_p=0.9, seed=11, offset=4)
    keep = [0, 1, 2, 4, 7]
    assert torch.equal(a[keep], b[keep]) and b[5] == -1 and b[6] == -1


@pytest.mark.parametrize("name", SAMPLERS)
def test_overflowing_rows_are_greedy(name, device):
    """A +inf logit wins (the first of several), and a temperature so small that logit / T
    overflows to +-inf samples its limit, the argmax, under every filter; other rows draw as before."""
    sample_ref = SAMPLERS[name]  # noqa: F811
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 300, generator=g)
    x[1, 7] = x[1, 200] = math.inf
    x[2] -= 100.0  # every logit negative: / 1e-40 overflows to -inf
    x[3, 50] = math.inf
    x[3, 60] = -math.inf
    x = x.to(device)
    temp = torch.tensor([1.0, 1.0, 1e-40, 0.7, 1e-40, 1e-38])
    for kw in (dict(), dict(top_k=5), dict(top_p=0.5), dict(min_p=0.1)):
        tok = sample_ref(x, temperature=temp, seed=3, **kw).cpu()
        assert tok[1:].tolist() == [7, x[2].argmax().item(), 50, x[4].argmax().item(), x[5].argmax().item()], kw
        alone = sample_ref(x[:1], temperature=1.0, seed=3, **kw).cpu()
        assert tok[0] == alone[0]
    assert sample_ref(torch.tensor([[0.0, math.inf, 1.0]], device=device), 1.0).tolist() == [1]


@pytest.mark.parametrize("kw", [dict(temperature=1e300), dict(top_k=2**70), dict(top_k=float("inf"))])
def test_parameters_that_overflow_are_refused(kw):
    with pytest.raises(ValueError, match="temperature|top_k"):
        sample(torch.randn(2, 10), **kw)


@pytest.mark.parametrize("name", SAMPLERS)
def test_per_row_parameters(name, device):
    sample_ref = SAMPLERS[name]  # noqa: F811
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)).to(device)
    tok = sample_ref(x, temperature=torch.tensor([0.0, 1.0, 1.0]), top_k=torch.tensor([0, 1, 0]), seed=1)
    assert torch.equal(tok, sample(x, temperature=torch.tensor([0.0, 1.0, 1.0]), top_k=torch.tensor([0, 1, 0]), seed=1))
    assert tok[0] == x[0].argmax() and tok[1] == x[1].argmax()


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0),
                                dict(top_p=1.01), dict(top_k=-1), dict(temperature=torch.tensor([1.0, -1.0])),
                                dict(min_p=-0.1), dict(min_p=1.5), dict(min_p=float("nan"))])
@pytest.mark.parametrize("name", SAMPLERS)
def test_bad_parameters(name, kw):
    with pytest.raises(ValueError):
        SAMPLERS[name](torch.randn(2, 10), **kw)


@pytest.mark.parametrize("top_k,top_p,scale", [(50, 1.0, 2.0), (0, 0.9, 6.0), (0, 0.99, 1.0), (2000, 0.9, 2.0),
                                               (0, 1.0, 1.0), (30, 0.5, 2.0)])
def test_candidate_shortcut_equals_full_sort(monkeypatch, top_k, top_p, scale):
    """Sorting only the top candidates (or none) must give exactly the full sort's tokens."""
    import gpt2kernels.sampling as sampling

    x = torch.randn(16, 50257, generator=torch.Generator().manual_seed(top_k)) * scale
    x[3, :40] = 9.0  # ties across the top-k boundary force the full sort for that call
    fast = sample_ref(x, top_k=top_k, top_p=top_p, seed=9, offset=1)
    monkeypatch.setattr(sampling, "CANDIDATES", 10**9)
    assert torch.equal(fast, sample_ref(x, top_k=top_k, top_p=top_p, seed=9, offset=1))


SWEEP = [dict(temperature=0.0), dict(temperature=0.7), dict(top_k=50), dict(top_k=3, temperature=1.5),
         dict(top_p=0.9), dict(top_p=0.3, temperature=2.0), dict(top_k=50, top_p=0.9, temperature=0.8),
         dict(top_k=100000), dict(top_p=1e-9), dict(min_p=0.1), dict(min_p=1.0, temperature=0.5),
         dict(min_p=0.02, top_k=50, top_p=0.9, temperature=0.8), dict(min_p=0.3, top_p=0.5)]


@pytest.mark.parametrize("kw", SWEEP, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("vocab", [1, 7, 111, 50257])
def test_compiled_equals_reference(kw, vocab, device):
    """Same semantics and the same Philox numbers: the same token, row by row."""
    x = (torch.randn(33, vocab, generator=torch.Generator().manual_seed(vocab)) * 3).to(device)
    x[5, : vocab // 2] = x[5, 0]  # ties, including at top-k / top-p boundaries
    # The C++ path mirrors the reference's arithmetic exactly. The CUDA path finds the top-p boundary
    # with fixed-point masses, so among thousands of tied tokens it may keep one more or fewer.
    rows = [r for r in range(33) if r != 5] if device.type == "cuda" else list(range(33))
    for offset in range(3):
        got, want = sample(x, seed=17, offset=offset, **kw), sample_ref(x, seed=17, offset=offset, **kw)
        assert torch.equal(got[rows], want[rows])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_low_precision_and_strided_rows(dtype, device):
    base = torch.randn(8, 2 * 500, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    x = base[:, ::2]  # strided columns
    want = sample_ref(x.float(), top_k=40, top_p=0.8, seed=2)
    assert torch.equal(sample(x, top_k=40, top_p=0.8, seed=2), want)
    one = base[:1, :500].expand(6, -1)  # stride-0 rows: one uniform per row keeps them independent
    assert torch.equal(sample(one, seed=4), sample_ref(one.float(), seed=4))


@pytest.mark.parametrize("name", SAMPLERS)
def test_seed_and_offset_tensors(name, device):
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(5)).to(device)
    sampler = SAMPLERS[name]
    as_ints = sampler(x, top_p=0.9, seed=123, offset=9)
    seed, offset = torch.tensor(123, device=device), torch.tensor(9, device=device)
    assert torch.equal(sampler(x, top_p=0.9, seed=seed, offset=offset), as_ints)
    # A scalar seed s gives row r the seed s + r: the same draws as explicit per-row seeds.
    seeds, offsets = torch.arange(123, 127, device=device), torch.full((4,), 9, device=device)
    per_row = sampler(x, top_p=0.9, seed=seeds, offset=offsets)
    assert torch.equal(per_row, as_ints)
    with pytest.raises(ValueError, match="seed must be an int or an int64 tensor"):
        sampler(x, seed=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="offset must be an int or an int64 tensor of 1 or 4 values"):
        sampler(x, offset=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("name", SAMPLERS)
def test_a_row_draws_by_its_own_seed_and_offset_only(name, device):
    """A request's draw depends on its seed and token index, not on its row or its neighbours."""
    sampler = SAMPLERS[name]
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 400, generator=g).to(device)
    seeds = torch.tensor([7, -3, 2**62, 11, 7], device=device)
    offsets = torch.tensor([0, 5, 2**40, 3, 1], device=device)
    together = sampler(x, top_k=100, seed=seeds, offset=offsets)
    order = torch.tensor([3, 0, 4, 2, 1], device=device)
    shuffled = sampler(x[order], top_k=100, seed=seeds[order], offset=offsets[order])
    assert torch.equal(shuffled, together[order])
    for r in range(5):
        alone = sampler(x[r:r + 1], top_k=100, seed=seeds[r:r + 1], offset=offsets[r:r + 1])
        assert alone.item() == together[r].item()


def test_philox_known_answer():
    """Philox4x32-10 with key 0, counter 0 (Random123's known-answer vector 6627e8d5 e169c58d ...)."""
    from gpt2kernels.sampling import uniforms

    zero = torch.zeros(1, dtype=torch.long)
    bits = ((0x6627E8D5 >> 5) << 26) | (0xE169C58D >> 6)
    assert uniforms(zero, zero).item() == bits / 2.0**53


def test_torch_compile_traces_the_compiled_sampler(device):
    x = torch.randn(2, 100, device=device)

    def step(logits):
        return sample(logits * 2.0, temperature=0.9, top_k=10, seed=1)

    compiled = torch.compile(step, backend="aot_eager" if device.type == "cpu" else "inductor")
    assert torch.equal(compiled(x), step(x))


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "reference-fallback"])
def test_sample_next_draws_into_out_and_advances_offsets(compiled, device, monkeypatch):
    """The decode step's one-kernel form: out[r] = sample(...)[r] at offset[r], then offset[r] += 1."""
    from gpt2kernels import _extension, sampling

    if not compiled:  # where the extension cannot be built: the reference plus two in-place updates
        monkeypatch.setattr(_extension, "SAMPLE_NEXT_OP", None)
        monkeypatch.setattr(sampling, "load_extension", lambda: False)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(4, 300, generator=g).to(device)
    temperature = torch.tensor([0.0, 0.8, 1.0, 1.3], device=device)
    top_k = torch.tensor([0, 40, 0, 5], device=device)
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0], dtype=torch.float64, device=device)
    seed = torch.tensor([1, 2, 3, 4], device=device)
    offset = torch.tensor([0, 7, 2**40, 3], device=device)
    min_p = torch.tensor([0.0, 0.0, 0.2, 0.05], dtype=torch.float64, device=device)
    want = sample(x, temperature, top_k, top_p, seed, offset, min_p)
    out = torch.full((4,), -5, dtype=torch.long, device=device)
    before = offset.clone()
    sampling.sample_next_(x, temperature, top_k, top_p, min_p, seed, offset, out)
    assert torch.equal(out, want) and torch.equal(offset, before + 1)


def test_the_compiled_ops_take_the_controls_in_the_tables_order():
    """csrc/'s schemas, sample_unchecked and sample_next_ list the controls as SAMPLING_CONTROLS does."""
    import inspect

    from gpt2kernels import _extension, sampling

    controls = [c.name for c in sampling.SAMPLING_CONTROLS]
    assert _extension.load(), "the sampler extension did not load"
    for op, tail in ((_extension.SAMPLE_OP, ["seed", "offset"]), (_extension.SAMPLE_NEXT_OP, ["seed", "offset",
                                                                                              "out"])):
        assert [a.name for a in op.default._schema.arguments] == ["logits", *controls, *tail]
    for fn, tail in ((sampling.sample_unchecked, ["seed", "offset"]), (sampling.sample_next_, ["seed", "offset",
                                                                                               "out"])):
        assert list(inspect.signature(fn).parameters) == ["logits", *controls, *tail]


def test_sample_next_needs_contiguous_int64_outputs(device):
    """The compiled op's own checks raise RuntimeError. In a subprocess: on the GPU image of
    2026-11-25 an error raised inside the extension killed the process (SIGSEGV; see
    benchmarks/probe_cpp_errors.py), which must fail this test, not the whole run."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.probe_cpp_errors", device.type], capture_output=True,
                       text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, f"exit status {r.returncode}: {r.stderr[-2000:]}"
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and "out must be a contiguous int64" in lines[0], r.stdout
    assert "offset must be a contiguous int64" in lines[1], r.stdout

