"""Continuous batching: requests join and leave between steps, each getting exactly the tokens it
gets alone; slots are reused; the queue is bounded; cancellation frees a slot at the next step."""

import pytest
import torch

import engine
from engine.errors import ContextLengthError, EngineError, QueueFullError
from engine.core.request import Request, SamplingParams
from engine.core.scheduler import Scheduler


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return engine.load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)


def _alone(model, prompt, n, sampling):
    kw = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
              repetition_penalty=sampling.repetition_penalty, presence_penalty=sampling.presence_penalty,
              frequency_penalty=sampling.frequency_penalty)
    return engine.generate(model, [prompt], n, seed=[sampling.seed], stop_at_eos=False, cuda_graph=False,
                           **kw).tokens[0]


def test_requests_joining_mid_flight_get_the_tokens_they_get_alone(model):
    sched = Scheduler(model, max_batch=3, max_waiting=10)
    specs = [  # (prompt, new tokens, sampling): more requests than slots, different lengths
        (engine.encode("The cat"), 9, SamplingParams(temperature=0)),
        (engine.encode("Once upon a time there was"), 3, SamplingParams(temperature=1.0, top_p=0.9, seed=7)),
        (engine.encode("A"), 14, SamplingParams(temperature=0.8, min_p=0.05, seed=8)),
        (engine.encode("The cat"), 5, SamplingParams(temperature=1.0, repetition_penalty=1.3, seed=9)),
        (engine.encode("Zebra"), 6, SamplingParams(temperature=0.9, presence_penalty=1.0, frequency_penalty=0.5,
                                                   seed=1)),
    ]
    requests = [Request(p, n, s, stop_at_eos=False) for p, n, s in specs]
    sched.submit(requests[:2])
    sched.step()
    sched.step()
    sched.submit(requests[2:])  # three more arrive while two run
    seen_batches = set()
    while not sched.idle:
        seen_batches.add(len(sched.active))
        sched.step()
    assert 3 in seen_batches  # really ran as a batch
    for r, (p, n, s) in zip(requests, specs):
        assert r.finish_reason == "length" and r.tokens == _alone(model, p, n, s), (p, s)


def test_a_finished_request_frees_its_slot_for_a_waiting_one(model):
    sched = Scheduler(model, max_batch=2, max_waiting=5)
    short, long_ = Request([1, 2], 2, SamplingParams(temperature=0), stop_at_eos=False), \
        Request([3], 20, SamplingParams(temperature=0), stop_at_eos=False)
    waiting = Request([4, 5], 4, SamplingParams(temperature=0), stop_at_eos=False)
    sched.submit([short, long_, waiting])
    sched.step()  # admits two, one decode step: short is done (2 tokens)
    assert short.finished and not long_.finished and list(sched.active) == [1]
    sched.step()  # the waiting request takes slot 0 while long_ keeps running
    assert sched.active == {0: waiting, 1: long_}
    sched.run_until_idle()
    assert waiting.tokens == _alone(model, [4, 5], 4, SamplingParams(temperature=0))


def test_a_free_row_at_the_end_of_the_cache_is_reset_not_overflowed(model):
    """Free rows keep stepping with the batch; one that reaches the cache's end starts over."""
    from engine.core.runner import Runner, StepPlan

    runner = Runner(model)
    runner.reserve(2, 128)  # TINY: 128 positions
    runner.admit([Request([1, 2], 5, SamplingParams(temperature=0))], [1])
    runner.cache.cache_lens[0] = 128  # as if slot 0 had idled for the whole context
    runner.host_cache_lens[0] = 128
    runner.step(StepPlan(2), use_graph=False)  # would write position 128 of slot 0
    assert runner.cache.cache_lens.tolist() == [1, 3]


def test_cancel_frees_the_slot_at_the_next_step(model):
    sched = Scheduler(model, max_batch=1, max_waiting=2)
    first, second = Request([1], 50, SamplingParams(temperature=0)), Request([2], 3, SamplingParams(temperature=0))
    ended = []
    first.on_finish = ended.append
    sched.submit([first, second])
    sched.step()
    first.cancel()
    sched.step()
    assert first.finish_reason == "cancelled" and ended == [first] and sched.active == {0: second}
    queued = Request([3], 3, SamplingParams(temperature=0))
    sched.submit([queued])
    queued.cancel()  # cancelled while waiting: never admitted
    sched.run_until_idle()
    assert queued.finish_reason == "cancelled" and queued.tokens == [] and second.finished


def test_queue_bound_and_bad_requests(model):
    sched = Scheduler(model, max_batch=1, max_waiting=2)
    sched.submit([Request([1], 2), Request([2], 2)])
    with pytest.raises(QueueFullError, match="waiting queue is full"):
        sched.submit([Request([3], 2)])
    with pytest.raises(ContextLengthError):
        sched.check(Request([1] * 100, 30))  # needs 129 of 128 positions
    sched.check(Request([1] * 100, 29))
    with pytest.raises(EngineError, match="outside the model's vocabulary"):
        sched.check(Request([50257], 2))
    with pytest.raises(EngineError, match="max_batch"):
        Scheduler(model, max_batch=0)


def test_nan_logits_fail_one_request_only(model, monkeypatch):
    import engine.core.runner

    real = engine.core.runner.sample_next_

    def flag_slot_0(logits, temperature, top_k, top_p, min_p, seed, offset, out):
        real(logits, temperature, top_k, top_p, min_p, seed, offset, out)
        if len(out) > 1:
            out[0] = -1

    monkeypatch.setattr(engine.core.runner, "sample_next_", flag_slot_0)
    sched = Scheduler(model, max_batch=2)
    a, b = Request([1], 4, SamplingParams(temperature=0)), Request([2], 4, SamplingParams(temperature=0))
    sched.submit([a, b])
    sched.run_until_idle()
    assert a.finish_reason == "error" and b.finish_reason in ("length", "stop")


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_a_server_captures_every_mode_of_every_bucket(small_vocab_checkpoint, backend, monkeypatch):
    """What a graphed server captures at start-up (captures recorded, not made: the CPU half of the
    GPU test below): every bucket with and without penalties and log-probabilities, and greedy
    steps where the lm_head picks the tokens (the triton backend)."""
    from engine.core.runner import Runner, StepPlan

    monkeypatch.setattr(Runner, "check_device", lambda self, cuda_graph: None)
    monkeypatch.setattr(Runner, "capture", lambda self, plans: self.graphs.update(dict.fromkeys(plans)) or 0.0)
    model = engine.load_model(small_vocab_checkpoint, device="cpu", dtype=torch.float32, backend=backend)
    sched = Scheduler(model, max_batch=5, cuda_graph=True)
    modes = [(p, lp, False) for p in (False, True) for lp in (False, True)]
    modes += [(False, lp, True) for lp in (False, True)] if backend == "triton" else []
    assert set(sched.runner.graphs) == {StepPlan(b, *mode) for b in (1, 2, 4, 8) for mode in modes}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_graphed_scheduler_equals_generate_alone(tiny_checkpoint, backend):
    """On CUDA every bucket's step is captured up front, with and without penalties and log-probabilities,
    and greedy where the lm_head picks greedy tokens; requests joining mid-flight still get exactly
    their solo tokens (fp32, so exact)."""
    from engine.core.runner import StepPlan

    model = engine.load_model(tiny_checkpoint, device="cuda", dtype=torch.float32, backend=backend)
    sched = Scheduler(model, max_batch=5)
    assert sched.cuda_graph and sched.capture_seconds > 0
    modes = [(p, lp, False) for p in (False, True) for lp in (False, True)]  # penalties, log-probabilities
    modes += [(False, lp, True) for lp in (False, True)] if backend == "triton" else []  # greedy
    assert set(sched.runner.graphs) == {StepPlan(b, *mode) for b in (1, 2, 4, 8) for mode in modes}
    specs = [(engine.encode(f"prompt {i}"), 5 + 3 * i,
              SamplingParams(temperature=[0, 1.0][i % 2], seed=i, top_p=0.9, repetition_penalty=1.0 + 0.2 * (i % 3)))
             for i in range(7)]
    requests = [Request(p, n, s, stop_at_eos=False) for p, n, s in specs]
    sched.submit(requests[:3])
    for _ in range(3):
        sched.step()
    sched.submit(requests[3:])
    sched.run_until_idle()
    for r, (p, n, s) in zip(requests, specs):
        assert r.tokens == _alone(model, p, n, s)


def test_sampling_params_built_directly_are_checked():
    from engine.errors import ParameterError
    from engine.core.request import SamplingParams
    for kw, name in [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                     (dict(frequency_penalty=3.0), "frequency_penalty"), (dict(seed=1.5), "seed")]:
        with pytest.raises(ParameterError) as e:
            SamplingParams(**kw)
        assert e.value.param == name
