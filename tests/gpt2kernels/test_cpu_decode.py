"""The int8 CPU kernels (csrc/decode_cpu.cpp): the GEMV against its reference in every instruction set
this processor runs, the packed layout, the whole decode step against ``decode_step_ref``, and the errors."""

import os
import threading
import time

import pytest
import torch

from gpt2kernels import cpu_decode, quantize_int8

pytestmark = pytest.mark.skipif(not cpu_decode.available(), reason="the extension cannot be built here")

# (rows, N, K): one row; odd widths (97, 769, 4231 columns, K not a multiple of 4); GPT-2's shapes.
SHAPES = [(1, 97, 13), (1, 768, 768), (2, 769, 1600), (3, 4231, 770), (5, 2304, 768), (8, 768, 3072), (9, 130, 1601)]
# fp32 out: the integer products are exact, so only the epilogue's rounding (and the GELU's exp) differs.
ATOL, RTOL = 1e-5, 1e-5


def _isas():
    return cpu_decode.supported_isas() if cpu_decode.available() else []


def _weight(n, k, gen):
    return quantize_int8(0.05 * torch.randn(n, k, generator=gen))


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_linear_matches_ref(m, n, k, isa):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, scale = _weight(n, k, gen)
    packed, colsum = cpu_decode.pack_int8(q)
    x, bias, res = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen), torch.randn(m, n, generator=gen)
    cases = ((None, None, None), ("gelu_tanh", bias, None), (None, bias, res), ("gelu_tanh", None, res))
    for activation, b, r in cases:
        got = cpu_decode.int8_linear(x, packed, colsum, scale, b, k, activation, r, isa=isa)
        torch.testing.assert_close(got, cpu_decode.int8_linear_ref(x, q, scale, b, activation, r), atol=ATOL, rtol=RTOL)


def test_int8_linear_equals_dequantised_weight_within_activation_rounding():
    """The scheme itself: y differs from x @ dequantised(W).T by at most half an activation step per product."""
    gen = torch.Generator().manual_seed(1)
    q, scale = _weight(300, 200, gen)
    x = torch.randn(4, 200, generator=gen)
    got = cpu_decode.int8_linear(x, *cpu_decode.pack_int8(q), scale, None, 200)
    w = q.float() * scale[:, None]
    step = (x.amax(1).clamp(min=0) - x.amin(1).clamp(max=0)) / 255
    bound = 0.5 * step[:, None] * w.abs().sum(1)[None] + 1e-5
    assert ((got - x @ w.t()).abs() <= bound).all()


def test_pack_int8_layout():
    q = torch.randint(-127, 128, (70, 9), dtype=torch.int8)
    packed, colsum = cpu_decode.pack_int8(q)
    assert packed.shape == (2, 3, 64, 4) and packed.dtype == torch.int8 and packed.is_contiguous()
    for n, k in ((0, 0), (5, 7), (63, 8), (64, 0), (69, 8)):
        assert packed[n // 64, k // 4, n % 64, k % 4] == q[n, k]
    assert (packed[1, :, 6:] == 0).all() and (packed[:, 2, :, 1:] == 0).all()  # padding columns and k
    assert torch.equal(colsum, q.sum(1, dtype=torch.int32))


def test_int8_linear_errors_name_the_value():
    q, scale = _weight(64, 32, torch.Generator().manual_seed(0))
    packed, colsum = cpu_decode.pack_int8(q)
    x = torch.randn(2, 32)
    with pytest.raises(RuntimeError, match=r"x must be a float32 CPU \(rows, 32\) tensor, got Double"):
        cpu_decode.int8_linear(x.double(), packed, colsum, scale, None, 32)
    with pytest.raises(RuntimeError, match=r"packed must be a contiguous int8 \(1, 8, 64, 4\) tensor"):
        cpu_decode.int8_linear(x, packed[:, :4], colsum, scale, None, 32)
    with pytest.raises(RuntimeError, match="activation must be None or 'gelu_tanh', got 'relu'"):
        cpu_decode.int8_linear(x, packed, colsum, scale, None, 32, "relu")
    with pytest.raises(ValueError, match="isa must be None or one of portable, avx2, avx512_vnni, got 'sse9'"):
        cpu_decode.int8_linear(x, packed, colsum, scale, None, 32, isa="sse9")


# --- the whole step ------------------------------------------------------------------------------------------
def _model(layers=2, c=64, heads=4, mlp=256, vocab=97, positions=40, head=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def vec(n, mean=0.0):
        return mean + 0.1 * torch.randn(n, generator=gen)

    def lin(n, k):
        return (*_weight(n, k, gen), vec(n))

    blocks = [{"ln_1.weight": vec(c, 1.0), "ln_1.bias": vec(c), "attn.c_attn": lin(3 * c, c),
               "attn.c_proj": lin(c, c), "ln_2.weight": vec(c, 1.0), "ln_2.bias": vec(c), "mlp.c_fc": lin(mlp, c),
               "mlp.c_proj": lin(c, mlp)} for _ in range(layers)]
    wte, wpe = 0.5 * torch.randn(vocab, c, generator=gen), 0.1 * torch.randn(positions, c, generator=gen)
    ln_f = (vec(c, 1.0), vec(c))
    head_weights = _weight(vocab, c, gen) if head else None
    return dict(wte=wte, wpe=wpe, blocks=blocks, ln_f=ln_f, head=head_weights, n_head=heads, eps=1e-5)


def _cache(m, slots, max_len):
    c, h = m["wte"].shape[1], m["n_head"]
    shape = (len(m["blocks"]), slots, h, max_len, c // h)
    return torch.randn(shape), torch.randn(shape)  # unread positions hold anything


def _assert_close_up_to_a_code(got, want):
    """Most values equal to fp32 rounding; all within what one activation landing on the other side
    of a rounding boundary moves them (the LayerNorm and attention here and in PyTorch differ in the
    last bit, which flips a code in ~1 run of 20: up to 6e-3 on these sizes, against errors of 0.1
    and more for a wrong scale, zero point, head or position)."""
    diff = (got - want).abs()
    assert not got.isnan().any() and diff.max() < 2e-2 and diff.median() < 1e-5, (diff.max(), diff.median())


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("head", [True, False])
@pytest.mark.parametrize("c,heads", [(64, 4), (128, 2)])  # head_dim 16 (any width), 64 (GPT-2's, registers)
def test_decode_step_matches_ref_over_steps(isa, head, c, heads):
    """Rows at different lengths (one at position 0), several steps, the cache written where the
    reference writes it and nowhere else, the output NaN-poisoned before each step."""
    m = _model(c=c, heads=heads, head=head, seed=torch.seed() % 2**31)
    decoder = cpu_decode.Int8Decoder(**m, isa=isa)
    assert decoder.isa == isa
    k, v = _cache(m, slots=4, max_len=24)
    lens = torch.tensor([5, 0, 17, 9], dtype=torch.int32)
    k_ref, v_ref, lens_ref = k.clone(), v.clone(), lens.clone()
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        tokens = torch.randint(0, 97, (3,), generator=gen)
        out = torch.full((3, decoder.width), float("nan"))
        got = decoder.step(tokens, lens, k, v, out)
        want = cpu_decode.decode_step_ref(**m, tokens=tokens, cache_lens=lens_ref, k_cache=k_ref, v_cache=v_ref)
        assert got is out and got.shape == (3, 97 if head else c)
        _assert_close_up_to_a_code(got, want)
        assert torch.equal(lens, lens_ref)
        _assert_close_up_to_a_code(k, k_ref)
        _assert_close_up_to_a_code(v, v_ref)
    assert torch.equal(lens[3:], torch.tensor([9], dtype=torch.int32))  # slots past the batch untouched


def test_decode_step_errors_name_the_value_and_change_nothing():
    m = _model()
    decoder = cpu_decode.Int8Decoder(**m)
    k, v = _cache(m, slots=2, max_len=8)
    out = torch.empty(2, 97)
    lens = torch.tensor([3, 8], dtype=torch.int32)
    k_before = k.clone()
    with pytest.raises(RuntimeError, match=r"row 1 has 8 cached positions: no room for another \(cache 8, model 40\)"):
        decoder.step(torch.tensor([1, 2]), lens, k, v, out)
    assert torch.equal(lens, torch.tensor([3, 8], dtype=torch.int32)) and torch.equal(k, k_before)
    lens[1] = 2
    with pytest.raises(RuntimeError, match=r"token 97 of row 1 is outside the vocabulary \[0, 97\)"):
        decoder.step(torch.tensor([1, 97]), lens, k, v, out)
    with pytest.raises(RuntimeError, match=r"k_cache and v_cache must be contiguous float32 CPU"):
        decoder.step(torch.tensor([1, 2]), lens, k.half(), v.half(), out)
    with pytest.raises(RuntimeError, match=r"out must be a contiguous float32 CPU \(2, 97\) tensor"):
        decoder.step(torch.tensor([1, 2]), lens, k, v, torch.empty(2, 64))
    with pytest.raises(RuntimeError, match=r"cache_lens must be a contiguous int32 CPU tensor"):
        decoder.step(torch.tensor([1, 2]), lens.long(), k, v, out)
    assert torch.equal(lens, torch.tensor([3, 2], dtype=torch.int32)) and torch.equal(k, k_before)


def test_decode_step_rows_do_not_depend_on_the_batch():
    """Each row is quantised and computed on its own: a batch's rows equal their single runs bit for bit."""
    m = _model(seed=torch.seed() % 2**31)
    decoder = cpu_decode.Int8Decoder(**m)
    k, v = _cache(m, slots=3, max_len=16)
    lens = torch.tensor([4, 9, 1], dtype=torch.int32)
    tokens = torch.tensor([5, 60, 96])
    batch = decoder.step(tokens, lens.clone(), k.clone(), v.clone(), torch.empty(3, 97))
    for r in range(3):
        alone = decoder.step(tokens[r:r + 1], lens[r:r + 1].clone(), k[:, r:r + 1].clone(), v[:, r:r + 1].clone(),
                             torch.empty(1, 97))
        assert torch.equal(alone[0], batch[r])


@pytest.fixture
def threads():
    """torch.set_num_threads for one test, restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _in_thread(fn):
    """fn() on a new Python thread (a server's engine thread), with torch's thread count set there
    as the main thread's; its result."""
    result, n = [], torch.get_num_threads()

    def run():
        torch.set_num_threads(n)
        result.append(fn())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


def test_parallel_loops_run_on_torch_threads(threads):
    """The step's loops split over as many threads as torch's count, from the main thread and from
    any other (the first build ran every loop on one thread: no OpenMP for ATen's inline parallel_for;
    the next, on OpenMP, slept between loops off the main thread)."""
    for n in sorted({1, min(2, os.cpu_count() or 1)}):
        threads(n)
        assert cpu_decode.parallel_threads() == n
        assert _in_thread(cpu_decode.parallel_threads) == n


def test_decode_step_does_not_depend_on_the_thread_count(threads):
    """Threads split a GEMV's columns and attention's heads, never a sum: 1 and 2 threads, on the main
    thread or another, agree bit for bit."""
    m = _model(c=128, heads=2, mlp=512, vocab=300, seed=torch.seed() % 2**31)
    decoder = cpu_decode.Int8Decoder(**m)
    k, v = _cache(m, slots=2, max_len=16)
    lens = torch.tensor([3, 11], dtype=torch.int32)
    results = []

    def step():
        out = torch.full((2, 300), float("nan"))
        return decoder.step(torch.tensor([7, 299]), lens.clone(), k.clone(), v.clone(), out)

    for n in (1, 2):
        threads(n)
        results += [step(), _in_thread(step)]
    assert not results[0].isnan().any() and all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.skipif(not hasattr(os, "fork") or (os.cpu_count() or 1) < 2, reason="needs fork and 2 cores")
def test_decode_step_runs_in_a_child_forked_after_a_threaded_step(threads):
    """The worker threads stay in the parent at a fork: a child's first step makes its own, where
    waiting for the parent's would hang."""
    m = _model(c=128, heads=2, mlp=512, vocab=300, seed=1)
    decoder = cpu_decode.Int8Decoder(**m)
    k, v = _cache(m, slots=1, max_len=8)
    threads(2)

    def step():
        return decoder.step(torch.tensor([5]), torch.tensor([2], dtype=torch.int32), k.clone(), v.clone(),
                            torch.empty(1, 300))

    want = step()
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only with the parent's result
        try:
            os._exit(0 if torch.equal(step(), want) and cpu_decode.parallel_threads() == 2 else 1)
        finally:
            os._exit(2)
    for _ in range(600):  # 60 s
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's step hung")
