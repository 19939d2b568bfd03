"""The decode core: a static, sync-free step; per-request randomness; a persistent cache; CUDA graphs (GPU)."""

import dataclasses

import pytest
import torch

import engine
from benchmarks.step_trace import kernel_budget, trace_step
from engine import EOT_ID
from engine.errors import EngineError
from engine.core.request import Request, SamplingParams
from engine.core.runner import GRAPH_BUCKETS, Runner, StepPlan, admit_batch, graph_bucket, runner_for
from engine.core.scheduler import Scheduler
from gpt2kernels.sampling import sample_ref, sampler_launches


# The triton backend's device: CPU only under the interpreter (TRITON_INTERPRET=1, as CI runs these tests).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(checkpoint, backend, dtype="float32", device=None):
    device = device or (TRITON_DEVICE if backend == "triton" else "cpu")
    return engine.load_model(str(checkpoint), device=device, dtype=dtype, backend=backend)


class _Started:
    """A runner with ``prompts`` admitted into slots [0, B), stepped directly (as the scheduler does)."""

    def __init__(self, model, prompts, max_new=12, cuda_graph=False, **sampling):
        self.runner = Runner(model)
        requests = [Request(p, max_new, SamplingParams(seed=10 + r, **sampling)) for r, p in enumerate(prompts)]
        self.plan, self.cuda_graph = admit_batch(self.runner, requests, cuda_graph), cuda_graph
        self.rows = self.plan.rows
        self.tokens, self.cache = self.runner.tokens, self.runner.cache

    def step(self):
        self.runner.step(self.plan, self.cuda_graph)


def _started_runner(model, prompts, max_new=12, cuda_graph=False, **sampling):
    return _Started(model, prompts, max_new, cuda_graph, **sampling)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_decode_steps_are_identical_and_never_wait_for_the_host(small_vocab_checkpoint, backend):
    model = _model(small_vocab_checkpoint, backend)
    runner = _started_runner(model, [[5, 6, 7], list(range(40))], temperature=0.8, top_k=50)
    first, first_launches = trace_step(runner.step)
    second, second_launches = trace_step(runner.step)
    assert first.ops == second.ops  # every op, its argument shapes and strides, inside our kernels too
    assert first_launches == second_launches  # the same Triton variants
    assert first.host_syncs() == [] and len(first.ops) > 50
    assert bool(first_launches) == (backend == "triton")


@pytest.mark.parametrize("batch", [1, 16])
def test_decode_kernel_budget(small_vocab_checkpoint, batch):
    """The triton decode step: at most 5 kernels a layer and 3 outside them besides the sampler's
    (embedding, ln_f + lm_head, one spare; the sampler: 1, or the split sampler's 4 on a GPU), counted
    as benchmarks.step_trace does (Triton launches, aten kernels inside our launchers too, the
    compiled sampler). The eager backend, the reference, launches far more."""
    budget = kernel_budget(_model(small_vocab_checkpoint, "triton"), batch)
    sampler = sampler_launches(batch, TRITON_DEVICE)
    assert budget["per_layer"] <= 5 and budget["outside_layers"] <= 3 + sampler, budget
    assert budget["kernels"] == 5 * budget["layers"] + 2 + sampler, budget  # today's exact count: a change is seen
    eager = kernel_budget(_model(small_vocab_checkpoint, "eager"), batch)
    assert eager["per_layer"] > 5, eager
    # Penalties (only in a step whose batch has them): one kernel more, which also keeps the counts.
    penalized = kernel_budget(_model(small_vocab_checkpoint, "triton"), batch, penalized=True)
    assert penalized["per_layer"] == 5 and penalized["kernels"] == budget["kernels"] + 1, penalized
    # A greedy batch: the lm_head kernel picks the tokens, no sampler runs (5 a layer + 2).
    greedy = kernel_budget(_model(small_vocab_checkpoint, "triton"), batch, greedy=True)
    assert greedy["per_layer"] == 5 and greedy["kernels"] == 5 * greedy["layers"] + 2, greedy
    assert kernel_budget(_model(small_vocab_checkpoint, "eager"), batch, greedy=True)["kernels"] == eager["kernels"]


def test_int8_decode_step_keeps_the_budget_and_static_shapes(small_vocab_checkpoint):
    """int8 weights (scales in the epilogues) add no kernel and no host sync: 5 a layer, 3 outside
    (2 in a greedy step)."""
    model = engine.load_model(str(small_vocab_checkpoint), device=TRITON_DEVICE, dtype="float32", backend="triton",
                              quantize="int8-all")
    budget = kernel_budget(model, 1)
    assert budget["kernels"] == 5 * budget["layers"] + 2 + sampler_launches(1, TRITON_DEVICE), budget
    assert kernel_budget(model, 1, greedy=True)["kernels"] == 5 * budget["layers"] + 2
    runner = _started_runner(model, [[5, 6, 7]], temperature=0)
    first, first_launches = trace_step(runner.step)
    second, second_launches = trace_step(runner.step)
    assert first.ops == second.ops and first_launches == second_launches and first.host_syncs() == []


@pytest.mark.parametrize("backend,temperature", [("eager", 1.0), ("triton", 1.0), ("triton", 0.0)])
def test_decode_step_traces_as_one_graph(small_vocab_checkpoint, backend, temperature):
    """torch.compile(fullgraph=True) accepts the step: no graph break, so nothing data-dependent in it;
    also the greedy step, whose lm_head writes the token buffer the step read."""
    model = _model(small_vocab_checkpoint, backend)
    runner = _started_runner(model, [[1, 2], [3, 4, 5, 6]], temperature=temperature)
    twin = _started_runner(model, [[1, 2], [3, 4, 5, 6]], temperature=temperature)
    assert runner.plan.greedy == (temperature == 0)
    torch._dynamo.reset()
    compiled = torch.compile(runner.runner._decode_step, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        compiled(runner.rows, greedy=runner.plan.greedy)
        twin.step()
        assert torch.equal(runner.tokens[:2], twin.tokens[:2])
    assert torch.equal(runner.cache.cache_lens, twin.cache.cache_lens)


def test_a_greedy_step_picks_its_tokens_in_the_lm_head(small_vocab_checkpoint):
    """Every row greedy (none penalised): the lm_head kernel writes the tokens, and they, the cache
    and the log-probabilities equal those of the same step through the sampler. Only the draws'
    offsets stay, which a greedy request never reads."""
    model = _model(small_vocab_checkpoint, "triton")
    prompts = [[5, 6, 7], list(range(40)), [9]]
    fused, sampled = (_Started(model, prompts, temperature=0) for _ in range(2))
    for started in (fused, sampled):
        started.runner.logprob_out.fill_(float("nan"))
    assert fused.plan.greedy and model.fuses_greedy
    sampled.plan = dataclasses.replace(fused.plan, greedy=False, logprobs=True)
    fused.plan = dataclasses.replace(fused.plan, logprobs=True)
    offsets = fused.runner.slots.offset.clone()
    for _ in range(3):
        fused.step()
        sampled.step()
        assert torch.equal(fused.tokens, sampled.tokens)
        assert torch.equal(fused.runner.logprob_out, sampled.runner.logprob_out)
    assert torch.equal(fused.cache.k, sampled.cache.k) and torch.equal(fused.cache.cache_lens, sampled.cache.cache_lens)
    assert torch.equal(fused.runner.slots.offset, offsets)
    assert torch.equal(sampled.runner.slots.offset, offsets + 3)


def test_which_steps_are_greedy_and_which_graph_runs_them():
    """A step is greedy when every request is (temperature 0 or top_k 1) and none is penalised. A
    sampled step's graph also runs a greedy step (the sampler picks the argmax too); a greedy
    step's graph never runs a sampled one; among the graphs that cover a step, the fewest rows,
    then the least work beside it."""
    def request(**sampling):
        return Request([1], 4, SamplingParams(**sampling))

    assert StepPlan.of(4, [request(temperature=0), request(top_k=1, temperature=0.7)]).greedy
    assert not StepPlan.of(4, [request(temperature=0), request(temperature=0.7)]).greedy
    assert not StepPlan.of(4, [request(temperature=0, repetition_penalty=1.3)]).greedy
    assert StepPlan.of(4, []).greedy  # only free rows
    greedy, sampled = StepPlan(4, greedy=True), StepPlan(4)
    assert sampled.covers(greedy) and not greedy.covers(sampled) and StepPlan(8, logprobs=True).covers(greedy)
    assert not StepPlan(2, greedy=True).covers(greedy) and not StepPlan(8, penalized=True, greedy=True).covers(sampled)
    graphs = [StepPlan(4), StepPlan(4, greedy=True), StepPlan(4, logprobs=True, greedy=True), StepPlan(8, greedy=True)]
    assert min((p for p in graphs if p.covers(greedy)), key=lambda p: (p.rows, p.extra_work)) == greedy
    assert min((p for p in graphs if p.covers(sampled)), key=lambda p: (p.rows, p.extra_work)) == sampled


def test_greedy_into_needs_a_fused_lm_head(tiny_checkpoint):
    model = _model(tiny_checkpoint, "eager")
    runner = _started_runner(model, [[1, 2]], temperature=0)
    assert not model.fuses_greedy and runner.plan.greedy  # the eager step samples greedy rows itself
    runner.step()
    with pytest.raises(ValueError, match="fuses_greedy"):
        model.decode(runner.tokens[:1], runner.cache, greedy_into=runner.tokens[:1])


def _plain_loop(model, prompt, n, seed, **sampling):
    """The slow, obvious generation: full recompute every token, the reference sampler at offset = index."""
    ids = list(prompt)
    for i in range(n):
        logits = model(torch.tensor([ids]))[:, -1]
        ids.append(int(sample_ref(logits, seed=torch.tensor([seed]), offset=torch.tensor([i]), **sampling)))
    return ids[len(prompt):]


def test_runner_tokens_equal_a_plain_loop(tiny_checkpoint):
    model = _model(tiny_checkpoint, "eager")
    prompts = [engine.encode("The cat sat on"), engine.encode("Hi")]
    kw = dict(temperature=0.9, top_k=40, top_p=0.95)
    out = engine.generate(model, prompts, 10, seed=[123, 77], stop_at_eos=False, **kw)
    assert out.tokens == [_plain_loop(model, p, 10, s, **kw) for p, s in zip(prompts, [123, 77])]


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_a_request_samples_the_same_alone_or_batched_in_any_row(tiny_checkpoint, small_vocab_checkpoint, backend):
    model = _model(tiny_checkpoint if backend == "eager" else small_vocab_checkpoint, backend)
    a, b, c = [11, 12, 13], list(range(100, 130)), [7]
    kw = dict(temperature=1.0, stop_at_eos=False)
    n = 8 if backend == "eager" else 4  # interpreted kernels take seconds a step
    alone = engine.generate(model, [a], n, seed=[5], **kw).tokens[0]
    assert engine.generate(model, [c, b, a], n, seed=[1, 9, 5], **kw).tokens[2] == alone
    if backend == "eager":  # a scalar seed s seeds row r with s + r (the runner's rule, whatever the backend)
        assert engine.generate(model, [b, a], n, seed=4, **kw).tokens[1] == alone


def test_cache_is_allocated_once_and_reused(tiny_checkpoint, monkeypatch):
    model = _model(tiny_checkpoint, "eager")
    allocations = []
    real_init = engine.model.cache.KVCache.__init__

    def counting_init(self, config, slots, max_len, dtype, device):
        allocations.append((slots, max_len))
        real_init(self, config, slots, max_len, dtype, device)

    monkeypatch.setattr(engine.model.cache.KVCache, "__init__", counting_init)
    engine.generate(model, ["one", "two", "three"], 6, temperature=0)
    runner = runner_for(model)
    k_ptr = runner.cache.k.data_ptr()
    assert model.scheduler.runner is runner
    engine.generate(model, ["again"], 20, temperature=0.5, seed=1)
    engine.generate(model, ["x", "y"], 3, temperature=0)
    assert allocations == [(3, 128)] and runner.cache.k.data_ptr() == k_ptr  # TINY: 128 positions
    engine.generate(model, ["a"] * 5, 3, temperature=0)  # more rows than slots: grows once
    assert allocations == [(3, 128), (5, 128)]


def test_one_cache_per_model_whoever_drives_it(tiny_checkpoint, monkeypatch):
    """generate() and a server's scheduler on one model share its runner: one KV cache is alive."""
    import gc
    import weakref

    made = []
    real_init = engine.model.cache.KVCache.__init__

    def tracking_init(self, *args):
        made.append(weakref.ref(self))
        real_init(self, *args)

    monkeypatch.setattr(engine.model.cache.KVCache, "__init__", tracking_init)
    model = _model(tiny_checkpoint, "eager")
    engine.generate(model, ["one", "two"], 4, temperature=0)
    server = Scheduler(model, max_batch=4)
    out = engine.generate(model, ["three"], 4, temperature=0)  # runs through the server's scheduler
    gc.collect()
    alive = [ref() for ref in made if ref() is not None]
    assert alive == [runner_for(model).cache] and server.runner is runner_for(model) and model.scheduler is server
    assert len(out.tokens[0]) == 4


def test_graph_buckets():
    assert [graph_bucket(b) for b in (1, 2, 3, 5, 8, 9, 33, 64, 65, 130)] == [1, 2, 4, 8, 8, 16, 64, 64, 128, 192]
    assert GRAPH_BUCKETS == (1, 2, 4, 8, 16, 32, 64)


def test_cuda_graph_on_cpu_is_a_clear_error(tiny_checkpoint):
    model = _model(tiny_checkpoint, "eager")
    with pytest.raises(EngineError, match="CUDA graphs need a CUDA device"):
        engine.generate(model, "hi", 3, cuda_graph=True)


def test_bad_seed_is_a_clear_error(tiny_checkpoint):
    model = _model(tiny_checkpoint, "eager")
    with pytest.raises(EngineError, match="one per prompt"):
        engine.generate(model, ["a", "b"], 2, seed=[1])
    with pytest.raises(EngineError, match="seed must be an int"):
        engine.generate(model, "a", 2, seed=1.5)


# --- on a GPU --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_graph_replay_equals_the_eager_step(small_vocab_checkpoint, backend):
    model = _model(small_vocab_checkpoint, backend, device="cuda")
    prompts = [[5, 6, 7], list(range(40)), [9]]
    graphed = _started_runner(model, prompts, cuda_graph=True, temperature=0.8, top_k=50)
    plain = _started_runner(model, prompts, cuda_graph=False, temperature=0.8, top_k=50)
    assert graphed.rows == 4 and plain.rows == 3
    for _ in range(10):
        graphed.step()
        plain.step()
        assert torch.equal(graphed.tokens[:3], plain.tokens[:3])
    layer_k = graphed.cache.k[:, :3, :, :60]
    assert torch.equal(layer_k, plain.cache.k[:, :3, :, :60]) and torch.equal(graphed.cache.cache_lens[:3],
                                                                              plain.cache.cache_lens)


@pytest.mark.gpu
def test_triton_graph_greedy_equals_eager_greedy_in_fp32(tiny_checkpoint):
    eager = _model(tiny_checkpoint, "eager", "float32", "cuda")
    triton_ = _model(tiny_checkpoint, "triton", "float32", "cuda")
    prompts = [engine.encode(t) for t in ("Once upon a time", "1 2 3 4 5 6", "The")]
    want = engine.generate(eager, prompts, 40, temperature=0, stop_at_eos=False, cuda_graph=False).tokens
    got = engine.generate(triton_, prompts, 40, temperature=0, stop_at_eos=False, cuda_graph=True).tokens
    assert got == want


@pytest.mark.gpu
def test_triton_graph_fp16_greedy_picks_the_fp32_argmax_up_to_rounding(tiny_checkpoint, hf_model):
    """In fp16, near-ties flip (a random tiny model's top two logits are ~0.1 apart, fp16 moves them
    by ~3e-3), and one flip changes the rest of the row, so token equality with eager is the wrong
    test (it saw 72 % on an H200). Instead every token our fp16 graph picks, along its own sequence,
    must be the argmax of HF's fp32 logits up to a margin far below the gap between real choices."""
    triton_ = _model(tiny_checkpoint, "triton", "float16", "cuda")
    prompts = [engine.encode(t) for t in ("Once upon a time", "1 2 3 4 5 6", "The")]
    got = engine.generate(triton_, prompts, 40, temperature=0, stop_at_eos=False, cuda_graph=True).tokens
    worst = 0.0
    for prompt, tokens in zip(prompts, got):
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].double()
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        worst = max(worst, (logits.max(1).values - chosen).max().item())
    assert worst < 0.03, f"a greedy token is {worst:.3g} below the fp32 argmax"


@pytest.mark.gpu
def test_graphs_with_ragged_batches_and_eos(tiny_checkpoint, monkeypatch):
    import engine.core.runner

    model = _model(tiny_checkpoint, "triton", device="cuda")
    prompts = [[1, 2, 3], list(range(50)), [4]]
    want = engine.generate(model, prompts, 12, temperature=0, stop_at_eos=False, cuda_graph=False).tokens
    got = engine.generate(model, prompts, 12, temperature=0, stop_at_eos=False, cuda_graph=True)
    assert got.tokens == want and got.capture_seconds > 0
    again = engine.generate(model, prompts[:2] + [[8, 9]], 12, temperature=0, stop_at_eos=False)
    assert again.capture_seconds == 0  # the 4-row graph is reused
    real = engine.core.runner.sample_next_

    def eos_at_third(logits, temperature, top_k, top_p, min_p, seed, offset, out):  # row 1 stops at its 3rd token
        at_third = (torch.arange(len(out), device=out.device) == 1) & (offset == 2)
        real(logits, temperature, top_k, top_p, min_p, seed, offset, out)
        out.copy_(torch.where(at_third, EOT_ID, out))

    # Sampled, so that the patched sampler runs (a greedy step's lm_head picks its tokens itself).
    kw = dict(temperature=0.8, seed=[1, 2, 3])
    want = engine.generate(model, prompts, 12, stop_at_eos=False, cuda_graph=False, **kw).tokens
    monkeypatch.setattr(engine.core.runner, "sample_next_", eos_at_third)
    runner_for(model).drop_graphs()  # recapture with the patched sampler
    out = engine.generate(model, prompts, 12, **kw)
    assert len(out.tokens[1]) == 3 and out.tokens[1][-1] == EOT_ID
    for r in (0, 2):  # the others are untouched (up to an EOS of their own)
        assert out.tokens[r] == want[r][:len(out.tokens[r])]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_graphs_survive_the_cache_growing(tiny_checkpoint, backend):
    """A bigger batch regrows the cache and drops the graphs; capturing again must start a fresh
    memory pool (reusing the old one's handle tripped the CUDA allocator's assert on an H200)."""
    model = _model(tiny_checkpoint, backend, "float16", "cuda")
    for batch, length in ((1, 5), (8, 40), (64, 100), (1, 5)):
        prompts = [list(range(r + 1, r + 1 + length)) for r in range(batch)]
        want = engine.generate(model, prompts, 6, temperature=0, stop_at_eos=False, cuda_graph=False).tokens
        got = engine.generate(model, prompts, 6, temperature=0, stop_at_eos=False, cuda_graph=True).tokens
        assert got == want
