"""The split sampler (gpt2kernels.sampling_split: each row over many programs): the reference's tokens,
row by row, through every path it can take (one round, refinement, gathers, tied brackets, the
one-program finish), and the CUDA dispatch."""

import pytest
import torch

from gpt2kernels import sampling_split
from gpt2kernels.sampling import row_parameters, row_seeds, sample, sample_blockwise, sample_ref, uniforms
from gpt2kernels.sampling_split import sample_split, sample_split_, split_launch


def _split(x, seed, offset, block, cap, rounds, **kw):
    """The split sampler's tokens (and the advanced offsets), out poisoned beforehand."""
    rows = x.shape[0]
    params = row_parameters(rows, x.device, **kw)
    seeds = row_seeds(seed, rows, x.device)
    offsets = torch.full((rows,), offset, dtype=torch.int64, device=x.device)
    out = torch.full((rows,), -99, dtype=torch.int64, device=x.device)
    split_launch(x, *params, seeds, offsets, out, advance=True, block=block, cap=cap, rounds=rounds)
    return out, offsets


def _check(x, block, cap, rounds=3, seed=11, offset=2, **kw):
    got, offsets = _split(x, seed, offset, block, cap, rounds, **kw)
    want = sample_ref(x.float(), seed=seed, offset=offset, **kw)
    assert torch.equal(got.cpu(), want.cpu()), (got.tolist(), want.tolist())
    assert torch.equal(offsets.cpu(), torch.full((x.shape[0],), offset + 1))


SWEEP = [dict(temperature=0.7), dict(top_k=50), dict(top_k=3, temperature=1.5), dict(top_p=0.9),
         dict(top_p=0.3, temperature=2.0), dict(top_k=50, top_p=0.9, temperature=0.8), dict(top_k=100000),
         dict(top_p=1e-9), dict(min_p=0.1), dict(min_p=1.0, temperature=0.5),
         dict(min_p=0.02, top_k=50, top_p=0.9, temperature=0.8), dict(min_p=0.3, top_p=0.5),
         dict(top_k=300, top_p=0.99, temperature=1.3), dict(top_k=5, top_p=0.5, min_p=0.1)]
# (block, cap, rounds): slices of 64 tokens make several programs per row at small vocabularies;
# a small cap forces refinement rounds, one round the one-program finish.
PATHS = {"wide": (64, 64, 3), "refine": (64, 16, 3), "finish": (64, 8, 1)}


def _sweep_rows(x, settings=SWEEP):
    """Every setting as per-row parameters over the rows of ``x``, repeated: one call covers all of
    them (the interpreter's time goes by programs, not calls)."""
    rows = torch.cat([x] * len(settings))
    def column(name, default, dtype):
        per_setting = torch.tensor([kw.get(name, default) for kw in settings], dtype=dtype)
        return per_setting.repeat_interleave(x.shape[0])
    return rows, dict(temperature=column("temperature", 1.0, torch.float32), top_k=column("top_k", 0, torch.int64),
                      top_p=column("top_p", 1.0, torch.float64), min_p=column("min_p", 0.0, torch.float64))


@pytest.mark.parametrize("vocab,path", [(1, "wide"), (7, "wide"), (333, "refine"), (333, "finish")])
def test_split_equals_reference(vocab, path):
    x = torch.randn(3, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
    x[1, : vocab // 2] = x[1, 0]  # ties, including at the top-k / top-p boundaries
    x[2] = x[2].round()  # many small tie groups
    rows, kw = _sweep_rows(x)
    _check(rows, *PATHS[path], **kw)


@pytest.mark.parametrize("path", ["wide", "finish"])
def test_split_at_odd_widths(path):
    """Widths 1600 and 4231, not multiples of the slice; flat rows (scale 1) put thousands of tokens
    in the first round's brackets."""
    settings = [dict(top_k=50, top_p=0.95, temperature=0.8), dict(top_p=0.9), dict(top_k=2000), dict(min_p=0.05)]
    for vocab, scale in ((1600, 3.0), (4231, 1.0)):
        x = torch.randn(2, vocab, generator=torch.Generator().manual_seed(vocab)) * scale
        block, cap, rounds = PATHS[path]
        rows, kw = _sweep_rows(x, settings)
        _check(rows, block * 4, cap * 4 if path != "wide" else cap, rounds, **kw)


def test_split_at_gpt2_vocabulary_with_default_sizes():
    x = torch.randn(2, 50257, generator=torch.Generator().manual_seed(0)) * 3
    for kw in (dict(top_k=50, top_p=0.95, temperature=0.8), dict(top_p=0.9, temperature=0.8)):
        _check(x, sampling_split.BLOCK, sampling_split.CAP, sampling_split.ROUNDS, **kw)


@pytest.mark.parametrize("path", ["refine", "finish"])
def test_tied_brackets_are_solved_by_arithmetic(path):
    """Every token equal (a single-valued bracket of any size): top-k keeps all ties, top-p the first t
    in vocabulary order; and a bracket of -inf tokens where top-k reaches past the finite ones."""
    x = torch.zeros(4, 333)
    x[2, 100:] = float("-inf")
    x[3, ::3] = 1.0
    # No p lands exactly on a tie's cumulative weight (0.3 of 100 ties would): there float64
    # rounding alone decides, differently in every implementation.
    settings = [dict(top_k=10), dict(top_p=0.517), dict(top_p=0.013), dict(top_k=40, top_p=0.317), dict(top_k=200),
                dict(top_k=200, top_p=0.999), dict(min_p=0.5, top_p=0.717)]
    rows, kw = _sweep_rows(x, settings)
    _check(rows, *PATHS[path], offset=5, **kw)


@pytest.mark.parametrize("path", PATHS)
def test_flagged_greedy_and_mixed_rows(path):
    """Per-row parameters in one batch: greedy rows (temperature 0, top_k 1, a +inf logit, an
    overflowing temperature) take the argmax, NaN / all -inf rows get -1, the rest are drawn."""
    x = torch.randn(8, 111, generator=torch.Generator().manual_seed(5)) * 2
    x[1, 7] = float("nan")
    x[2] = float("-inf")
    x[3, 40] = float("inf")
    x[4, 90] = 1e38
    temperature = torch.tensor([0.8, 0.8, 0.8, 0.8, 1e-38, 0.0, 1.0, 1.3])
    top_k = torch.tensor([50, 0, 0, 0, 0, 0, 1, 7])
    top_p = torch.tensor([0.9, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 0.6], dtype=torch.float64)
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2], dtype=torch.float64)
    _check(x, *PATHS[path], temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    got, _ = _split(x, 11, 2, *PATHS[path], temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    assert got[1] == -1 and got[2] == -1 and got[3] == 40 and got[4] == 90 and got[6] == x[6].argmax()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_strided_and_expanded_rows(dtype):
    base = torch.randn(5, 2 * 400, generator=torch.Generator().manual_seed(3)).to(dtype)
    _check(base[:, ::2], 32, 64, top_k=40, top_p=0.8)  # strided columns, bf16's many ties
    _check(base[:1, :400].expand(4, -1), 32, 64, top_p=0.9)  # stride-0 rows: each its own uniform


def test_repeat_calls_draw_the_same_and_leave_counters_armed():
    from gpt2kernels._ops import arrival_counters

    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(8)) * 2
    first, _ = _split(x, 4, 0, 32, 16, 2, top_k=60, top_p=0.9)
    again, _ = _split(x, 4, 0, 32, 16, 2, top_k=60, top_p=0.9)
    assert torch.equal(first, again)
    assert not arrival_counters(x.device, 3).any()


def test_a_split_draw_is_a_fixed_launch_sequence_with_no_host_sync():
    """What a CUDA graph needs, checked on CPU: the same ``split_launches()`` Triton variants each
    call, whatever the row's values (a greedy row, a flat one), and no op that syncs the host."""
    from benchmarks.step_trace import trace_step

    params = row_parameters(2, "cpu", 0.8, 50, 0.9)
    seeds, offsets, out = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.int64), torch.empty(2, dtype=torch.int64)
    traces = []
    for x in (torch.randn(2, 700) * 3, torch.zeros(2, 700), torch.full((2, 700), float("nan"))):
        traces.append(trace_step(lambda: sample_split_(x, *params, seeds, offsets, out)))
    for trace, launches in traces:
        assert trace.host_syncs() == [] and len(launches) == sampling_split.split_launches()
        assert launches == traces[0][1]


def test_the_uniform_is_philox_bit_for_bit():
    """A two-token row of equal weights draws token 1 exactly when the row's uniform is >= 0.5."""
    x = torch.zeros(64, 2)
    seeds = torch.arange(64, dtype=torch.int64) * 7919 - 2**40
    u = uniforms(seeds, torch.full((64,), 3, dtype=torch.int64))
    out = sample_split(x, *row_parameters(64, x.device), seeds, torch.full((64,), 3, dtype=torch.int64))
    assert torch.equal(out, (u >= 0.5).long())


def test_ops_agree_with_each_other_and_opcheck():
    x = torch.randn(3, 90, generator=torch.Generator().manual_seed(2))
    params = row_parameters(3, x.device, top_k=20, top_p=0.8)
    seeds, offsets = torch.tensor([5, 6, 7]), torch.tensor([0, 9, 2**40])
    drawn = sample_split(x, *params, seeds, offsets)
    out = torch.full((3,), -5)
    advanced = offsets.clone()
    sample_split_(x, *params, seeds, advanced, out)
    assert torch.equal(drawn, out) and torch.equal(advanced, offsets + 1)
    torch.library.opcheck(sample_split.op, (x, *params, seeds, offsets))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8, 131, 132, 256])
def test_cuda_dispatch_and_both_cuda_samplers_draw_the_reference(rows):
    """``sample`` splits rows below the SM count (H100 / H200: 132); the split sampler and the CUDA
    one-block-per-row sampler, each called directly, give the reference's tokens at gpt2's vocabulary."""
    x = (torch.randn(rows, 50257, generator=torch.Generator().manual_seed(rows)) * 3).cuda()
    kw = dict(temperature=0.8, top_k=50, top_p=0.95, seed=3, offset=1)
    want = sample_ref(x, **kw)
    assert torch.equal(sample(x, **kw), want)
    assert (rows < sampling_split.split_max_rows(x.device)) == (rows < 132)  # H100 / H200
    per_row = (*row_parameters(rows, x.device, 0.8, 50, 0.95), row_seeds(3, rows, x.device),
               torch.ones(rows, dtype=torch.int64, device="cuda"))
    assert torch.equal(sample_split(x, *per_row), want)
    assert torch.equal(sample_blockwise(x, *per_row), want)


@pytest.mark.gpu
def test_cuda_graph_replays_draw_fresh_tokens():
    """Captured once, replayed as a decode loop does: each replay reads the advanced offsets."""
    x = (torch.randn(2, 50257, generator=torch.Generator().manual_seed(1)) * 3).cuda()
    per_row = (*row_parameters(2, x.device, 0.8, 50, 0.95), row_seeds(9, 2, x.device))
    offsets = torch.zeros(2, dtype=torch.int64, device="cuda")
    out = torch.full((2,), -9, dtype=torch.int64, device="cuda")
    sample_split_(x, *per_row, offsets, out)  # warm-up: compiles, allocates the work buffers
    offsets.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sample_split_(x, *per_row, offsets, out)
    offsets.zero_()  # the capture did not run the kernels: reset anyway
    for step in range(4):
        graph.replay()
        assert torch.equal(out, sample_ref(x, 0.8, 50, 0.95, seed=9, offset=step))
    assert offsets.tolist() == [4, 4]
