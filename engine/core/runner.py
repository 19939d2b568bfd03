"""The decode core: a persistent KV cache, every slot's state and a static decode step, replayed as
a CUDA graph on GPUs. The scheduler (``engine.core.scheduler``) is its one driver.

``Runner.step(plan)`` = decode -> sample, with the same ops on the same shapes every step, every
input in a persistent device buffer and no host sync, so one capture per ``StepPlan`` replays it.
The host reads each step's tokens outside the step (``TokenReader``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from gpt2kernels import prepare_device
from gpt2kernels.sampling import prepare_sampler, sample_next_

from ..errors import EngineError
from ..model.cache import KVCache
from ..model.gpt2 import GPT2
from .cpu_threads import start_sampling, step_threads
from .request import Request
from .slots import TOP_LOGPROBS, SlotState

__all__ = ["CACHE_LEN_STEP", "GRAPH_BUCKETS", "TOP_LOGPROBS", "Runner", "StepPlan", "TokenReader", "admit_batch",
           "graph_bucket", "rounded_len", "runner_for"]

# Batch sizes a CUDA graph is captured for; a batch runs in the smallest bucket that holds it, with
# padding rows. Powers of two: at most 2x wasted rows, and seven captures cover 1..64.
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Cache lengths round up to a multiple of this (capped at the model's positions): at most four
# cache shapes for GPT-2's 1024 positions (each a separate capture), and at most 255 idle slots a row.
CACHE_LEN_STEP = 256


def graph_bucket(batch: int) -> int:
    """The padded batch size a CUDA graph runs ``batch`` rows at: the smallest bucket holding them,
    beyond the largest a multiple of it."""
    for bucket in GRAPH_BUCKETS:
        if batch <= bucket:
            return bucket
    return -(-batch // GRAPH_BUCKETS[-1]) * GRAPH_BUCKETS[-1]


def rounded_len(needed: int, n_positions: int) -> int:
    """The cache length a request needing ``needed`` positions gets: a multiple of ``CACHE_LEN_STEP``,
    at most ``n_positions``."""
    return min(n_positions, -(-needed // CACHE_LEN_STEP) * CACHE_LEN_STEP)


@dataclass(frozen=True)
class StepPlan:
    """One decode step: slots [0, rows) run; ``penalized``: the step applies penalties (some row has
    them) and counts tokens; ``logprobs``: it records log-probabilities into ``logprob_out``;
    ``greedy``: every row is greedy and none penalised, so the lm_head kernel can pick the tokens
    and no sampler runs (where the model ``fuses_greedy``). It keys the step's CUDA graph."""
    rows: int
    penalized: bool = False
    logprobs: bool = False
    greedy: bool = False

    @classmethod
    def of(cls, rows: int, requests) -> "StepPlan":
        """The plan of a step of ``rows`` rows running ``requests``: with penalties if one has them,
        with log-probabilities if one asks for them, greedy if all are (free rows are greedy too)."""
        requests = list(requests)
        penalized = any(r.sampling.penalized for r in requests)
        return cls(rows, penalized, any(r.logprobs is not None for r in requests),
                   not penalized and all(r.sampling.greedy for r in requests))

    def covers(self, plan: "StepPlan") -> bool:
        """Whether this plan's graph can run ``plan``'s step: as many rows or more, and a mode that does
        more (penalties at their free values and unread log-probabilities change no token; the
        sampler picks greedy rows' tokens as the greedy lm_head does)."""
        return (self.rows >= plan.rows and self.penalized >= plan.penalized and self.logprobs >= plan.logprobs
                and self.greedy <= plan.greedy)

    @property
    def extra_work(self) -> int:
        """The optional parts this plan's step runs: penalties, log-probabilities, a sampler."""
        return self.penalized + self.logprobs + (not self.greedy)


def runner_for(model: GPT2) -> "Runner":
    """The model's one runner (and so its one KV cache), made on first use."""
    if getattr(model, "runner", None) is None:
        model.runner = Runner(model)
    return model.runner


class Runner:
    """Owns a model's KV cache, every slot's state (``slots``, a ``SlotState``) and one CUDA graph per
    ``StepPlan``.

    The scheduler drives it: ``reserve`` (and ``capture``) while no request runs, then ``admit``
    requests into free slots, ``step`` every running slot, and ``release`` slots as requests end.
    The cache grows (dropping the graphs) only at a ``reserve`` that needs more slots or positions.
    """

    def __init__(self, model: GPT2):
        self.model = model
        self.device = model.device
        self.cache: KVCache | None = None
        self.slots: SlotState | None = None
        self.graphs: dict[StepPlan, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.host_cache_lens: list[int] = []  # each slot's cache length, as the host knows it
        self.decode_step = self._decode_step  # benchmarks may swap in torch.compile(self._decode_step)
        if self.device.type == "cpu":
            start_sampling()

    # --- persistent state ---------------------------------------------------------------------------
    def reserve(self, slots: int, max_len: int) -> None:
        """Have a cache of at least ``slots`` rows of ``max_len`` positions. Only while no request
        runs: growing it moves every buffer (and drops the graphs, which captured their addresses)."""
        if self.cache is not None and self.cache.fits(slots, max_len):
            return
        if self.cache is not None:
            slots, max_len = max(slots, self.cache.slots), max(max_len, self.cache.max_len)
        self.drop_graphs()
        self.cache = self.slots = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.cache = KVCache(self.model.config, slots, max_len, self.model.dtype, self.device)
        self.slots = SlotState(slots, self.model.config.vocab_size, self.device)
        self.host_cache_lens = [0] * slots

    @property
    def tokens(self) -> torch.Tensor:
        """int64 (slots,): each slot's latest token."""
        return self.slots.tokens

    @property
    def logprob_out(self) -> torch.Tensor:
        """float32 (slots, 1 + 2k): each slot's log-probabilities after a step that records them."""
        return self.slots.logprob_out

    def drop_graphs(self) -> None:
        """Forget every captured graph and their memory pool. A pool whose graphs are all gone is
        released, and capturing into its stale handle trips the CUDA caching allocator's assert
        ("use_count > 0", seen on an H200 when a bigger batch regrew the cache): the next capture
        starts a fresh pool."""
        self.graphs.clear()
        self._pool = None

    def check_device(self, cuda_graph: bool) -> None:
        """EngineError for graphs off CUDA; load the sampler and the kernels' counters (never inside a step)."""
        if cuda_graph and self.device.type != "cuda":
            raise EngineError(f"CUDA graphs need a CUDA device, the model is on {self.device}")
        prepare_sampler(self.device)  # outside the step: a build without this device's kernel fails here
        prepare_device(self.device)

    def _decode_step(self, rows: int, penalized: bool = False, logprobs: bool = False, greedy: bool = False) -> None:
        """The static step over slots [0, rows): only device buffers in, only device buffers out.
        ``greedy`` (every row greedy, none penalised), on a model that ``fuses_greedy``: the lm_head
        kernel writes the tokens and no sampler runs. ``offset`` is then left as it was: it only keys
        draws, and a greedy request never draws."""
        tokens = self.slots.tokens[:rows]
        if greedy and self.model.fuses_greedy:
            logits = self.model.decode(tokens, self.cache, self._kv_len(rows), greedy_into=tokens)
            if logprobs:
                self._record_logprobs(logits, slice(0, rows))
            return
        logits = self.model.decode(tokens, self.cache, self._kv_len(rows))
        self._sample(logits, slice(0, rows), penalized, last=tokens, logprobs=logprobs)

    def _kv_len(self, rows: int) -> int | None:
        """How much of the cache the step's attention reads: all of it on GPUs (the kernels stop at
        each row's length on the device; static shapes for the graphs); on CPU, where the eager
        attention reads every position it is given, only the prefix some row uses, in steps of 64."""
        if self.device.type != "cpu":
            return None
        return min(self.cache.max_len, -(-(max(self.host_cache_lens[:rows]) + 1) // 64) * 64)

    def _sample(self, logits: torch.Tensor, rows: slice | torch.Tensor, penalized: bool,
                last: torch.Tensor | None = None, logprobs: bool = False) -> None:
        """Draw the tokens of ``rows`` (a slice, or int64 slot ids) into ``tokens``, advancing their
        offsets: one kernel. With ``penalized``, one more before it: count each row's ``last``
        token (the step's input; None: nothing to count, as after a prefill) and penalise. With
        ``logprobs``, also write the rows of ``logprob_out`` (``_logprobs``)."""
        state = self.slots
        gathered = isinstance(rows, torch.Tensor)  # indexing by a tensor copies: write the results back
        offset, tokens = state.offset[rows], state.tokens[rows]
        if penalized:
            counts = state.counts[rows]
            if last is None:
                last = torch.full((logits.shape[0],), -1, dtype=torch.int64, device=self.device)
            logits = self.model.ops.apply_penalties(logits, counts, state.prompt_mask[rows], last,
                                                    *state.penalty_args(rows))
            if gathered:
                state.counts[rows] = counts
        sample_next_(logits, *state.sampling_args(rows), state.seed[rows], offset, tokens)
        if gathered:
            state.offset[rows], state.tokens[rows] = offset, tokens
        if logprobs:
            self._record_logprobs(logits, rows)

    def _record_logprobs(self, logits: torch.Tensor, rows: slice | torch.Tensor) -> None:
        """Write the ``logprob_out`` rows of ``rows``, whose tokens are in ``tokens`` (``_logprobs``)."""
        state = self.slots
        state.logprob_out[rows] = self._logprobs(logits, state.temperature[rows], state.tokens[rows])

    def _logprobs(self, logits: torch.Tensor, temperature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Rows of ``logprob_out`` for sampled ``tokens``: log-probabilities under the distribution
        the sampler drew from before its filters, i.e. log_softmax(logits / temperature) after the
        penalties (temperature 1 for greedy rows); top-k, top-p and min-p do not renormalise them.
        Device ops only (a log-softmax, a gather, a top-k): no host sync, capturable."""
        scaled = logits.float() / torch.where(temperature > 0, temperature, 1.0)[:, None]
        lp = torch.log_softmax(scaled, dim=-1)
        top_lp, top_ids = lp.topk(self.slots.top_logprobs, dim=-1)
        return torch.cat([lp.gather(1, tokens[:, None]), top_lp, top_ids.float()], dim=1)

    # --- CUDA graphs ---------------------------------------------------------------------------------
    def capture(self, plans: list[StepPlan]) -> float:
        """Capture the graphs of ``plans`` not yet recorded; seconds spent (0.0: none was missing).
        Only while no request runs: the warm-up steps write into the slots' cache and state, which
        are reset after."""
        missing = [p for p in plans if p not in self.graphs]
        if not missing:
            return 0.0
        start = time.perf_counter()
        for plan in missing:
            self._capture(plan)
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _capture(self, plan: StepPlan) -> None:
        rows = plan.rows
        self.cache.cache_lens[:rows] = 0
        self.slots.free(range(rows))
        stream = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):  # warm-up: every kernel variant compiles and autotunes here
            for _ in range(2):
                self._decode_step(rows, plan.penalized, plan.logprobs, plan.greedy)
        stream.wait_stream(side)
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._decode_step(rows, plan.penalized, plan.logprobs, plan.greedy)
        self.graphs[plan] = graph
        self.release(range(rows))

    # --- requests in slots ---------------------------------------------------------------------------
    def admit(self, requests: list[Request], slots: list[int]) -> None:
        """Prefill ``requests`` into ``slots`` (free, distinct), set their state and sample each one's
        first token into ``tokens[slots]``; the host reads it from there.

        Requests with the same prompt share one prefill: it runs once and its cache is copied.
        """
        dev = self.device
        firsts: dict[tuple[int, ...], int] = {}  # prompt -> index of its first request, in prefill-row order
        for i, r in enumerate(requests):
            firsts.setdefault(tuple(r.prompt), i)
        unique = list(firsts.values())
        source = [unique.index(firsts[tuple(r.prompt)]) for r in requests]  # each request's prefill row
        longest = max(len(r.prompt) for r in requests)
        ids = torch.zeros((len(unique), longest), dtype=torch.int64)  # right padding, never attended
        for row, i in enumerate(unique):
            ids[row, :len(requests[i].prompt)] = torch.tensor(requests[i].prompt)
        prompt_lens = torch.tensor([len(requests[i].prompt) for i in unique], dtype=torch.int32)
        slot_ids = torch.tensor(slots, dtype=torch.int64, device=dev)
        logits = self.model.prefill(ids.to(dev), prompt_lens.to(dev), self.cache, slot_ids[unique])
        shared = [i for i in range(len(requests)) if i not in unique]
        if shared:
            self.cache.copy_slots(slot_ids[[unique[source[i]] for i in shared]], slot_ids[shared], longest)
        self.slots.assign(slots, [r.sampling for r in requests], [r.prompt for r in requests])
        for r, slot in zip(requests, slots):
            self.host_cache_lens[slot] = len(r.prompt)
            r.begin()
        mode = StepPlan.of(len(requests), requests)
        self._sample(logits[source], slot_ids, mode.penalized, logprobs=mode.logprobs)

    def step(self, plan: StepPlan, use_graph: bool) -> None:
        """One decode step for slots [0, plan.rows), free rows too (static shapes): each slot's next
        token lands in ``tokens`` (and its log-probabilities in ``logprob_out`` with ``plan.logprobs``).
        Replays the plan's graph with ``use_graph`` when it was captured, else runs op by op."""
        rows = plan.rows
        overflowing = [s for s in range(rows) if self.host_cache_lens[s] >= self.cache.max_len]
        if overflowing:  # only free rows get here (a request's length is checked at admission)
            self.release(overflowing)
        graph = self.graphs.get(plan) if use_graph else None
        if graph is not None:
            graph.replay()
        else:
            with step_threads() if self.device.type == "cpu" else contextlib.nullcontext():  # CPU: the cores left free
                self.decode_step(rows, plan.penalized, plan.logprobs, plan.greedy)
        for s in range(rows):
            self.host_cache_lens[s] += 1

    def release(self, slots) -> None:
        """Reset ``slots`` to free rows: an empty cache row and every per-slot tensor at its free
        value (``SlotState.free``); their later tokens are ignored."""
        slots = list(slots)
        if not slots:
            return
        self.cache.cache_lens[torch.tensor(slots, dtype=torch.int64, device=self.device)] = 0
        self.slots.free(slots)
        for s in slots:
            self.host_cache_lens[s] = 0


def admit_batch(runner: Runner, requests: list[Request], cuda_graph: bool = False) -> StepPlan:
    """Admit ``requests`` into slots [0, B) of a ``runner`` no scheduler is driving (benchmarks and
    tests that time or trace the bare step): size its cache, capture the step's graph with
    ``cuda_graph``, prefill. Returns the plan of their decode steps, for ``runner.step``."""
    rows = graph_bucket(len(requests)) if cuda_graph else len(requests)
    needed = max(len(r.prompt) + r.max_new_tokens for r in requests)
    runner.check_device(cuda_graph)
    runner.reserve(rows, rounded_len(needed, runner.model.config.n_positions))
    plan = StepPlan.of(rows, requests)
    if cuda_graph:
        runner.capture([plan])
    runner.release(range(runner.cache.slots))
    runner.admit(requests, list(range(len(requests))))
    return plan


class TokenReader:
    """Copies tensors of a step to the host without stalling the device.

    On CUDA: a non-blocking copy into one of ``depth`` pinned buffers (a ring) and an event, so the
    host can read step n while the device runs step n + 1; at most ``depth`` copies may be unread.
    Elsewhere: a plain copy.
    """

    def __init__(self, rows: int, device: torch.device, columns: int = 0, dtype: torch.dtype = torch.int64,
                 depth: int = 2):
        """Reads (n,) tensors, n <= rows, or (n, columns) with ``columns`` (e.g. ``logprob_out``), of ``dtype``."""
        self.cuda = device.type == "cuda"
        if self.cuda:
            shape = (rows, columns) if columns else (rows,)
            self._buffers = [torch.empty(shape, dtype=dtype, pin_memory=True) for _ in range(depth)]
            self._events = [torch.cuda.Event() for _ in range(depth)]
        self._next = 0

    def submit(self, values: torch.Tensor) -> tuple[int, int] | list:
        """Start copying ``values`` (as constructed: int64 (n,) by default); returns a ticket for ``read``."""
        if not self.cuda:
            return values.tolist()
        i, self._next = self._next, (self._next + 1) % len(self._buffers)
        self._buffers[i][:values.shape[0]].copy_(values, non_blocking=True)
        self._events[i].record()
        return i, values.shape[0]

    def read(self, ticket: tuple[int, int] | list) -> list:
        """The values (a list of the rows') of a submitted copy, waiting for it if needed."""
        if not self.cuda:
            return ticket
        i, n = ticket
        self._events[i].synchronize()
        return self._buffers[i][:n].tolist()
