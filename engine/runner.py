"""The decode core: a persistent KV cache, per-request state and a static decode step, replayed as
a CUDA graph on GPUs.

``Runner.step()`` = decode -> sample, with the same ops on the same shapes every step,
every input in a persistent device buffer and no host sync, so one capture per batch-size bucket
replays it. The host reads each step's tokens outside the step (``TokenReader``).
"""

from __future__ import annotations

import time

import torch

from gpt2kernels import prepare_device
from gpt2kernels.sampling import prepare_sampler, sample_next_

from .cache import KVCache
from .errors import EngineError
from .model import GPT2
from .request import Request, SamplingParams

__all__ = ["CACHE_LEN_STEP", "GRAPH_BUCKETS", "TOP_LOGPROBS", "Request", "Runner", "SamplingParams", "TokenReader",
           "graph_bucket"]

# Batch sizes a CUDA graph is captured for; a batch runs in the smallest bucket that holds it, with
# padding rows. Powers of two: at most 2x wasted rows, and seven captures cover 1..64.
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Alternatives a step with log-probabilities records per row (OpenAI's API allows up to 20).
TOP_LOGPROBS = 20
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


def _rounded_len(needed: int, n_positions: int) -> int:
    return min(n_positions, -(-needed // CACHE_LEN_STEP) * CACHE_LEN_STEP)


class Runner:
    """Owns a model's KV cache, every slot's sampling state and one CUDA graph per batch bucket.

    Persistent across calls: the cache grows (and its graphs are recaptured) only when a batch
    needs more slots or positions than it has. A batch: ``prepare(requests)``, ``start(requests)``
    (prefill + first token), then ``step()`` until every request is finished. Continuous batching
    (``engine.scheduler``): ``reserve`` once, then ``admit`` requests into free slots, ``step(rows)``
    and ``release`` slots as requests come and go. ``tokens`` holds each slot's latest token.
    """

    def __init__(self, model: GPT2):
        self.model = model
        self.device = model.device
        self.cache: KVCache | None = None
        self.graphs: dict[tuple[int, bool, bool], torch.cuda.CUDAGraph] = {}  # (rows, penalized, logprobs)
        self._pool = None
        self.rows = 0          # rows the decode step runs (the batch, padded to a bucket with graphs)
        self.batch = 0         # real rows
        self.use_graph = False
        self.penalized = False  # the step applies penalties (some row has them) and counts tokens
        self.logprobs = False   # the step records log-probabilities into ``logprob_out``
        self._lens: list[int] = []  # each slot's cache length, as the host knows it
        self.decode_step = self._decode_step  # benchmarks may swap in torch.compile(self._decode_step)

    # --- persistent state ---------------------------------------------------------------------------
    def _allocate(self, slots: int, max_len: int) -> None:
        if self.cache is not None and self.cache.fits(slots, max_len):
            return
        if self.cache is not None:
            slots, max_len = max(slots, self.cache.slots), max(max_len, self.cache.max_len)
        self.drop_graphs()  # they captured the old buffers' addresses
        self.cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.cache = KVCache(self.model.config, slots, max_len, self.model.dtype, self.device)
        dev, vocab = self.device, self.model.config.vocab_size
        self._lens = [0] * slots
        self.tokens = torch.zeros(slots, dtype=torch.int64, device=dev)
        # Free and padding rows: greedy, no penalties (cheapest, and always valid).
        self.temperature = torch.zeros(slots, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(slots, dtype=torch.int64, device=dev)
        self.top_p = torch.ones(slots, dtype=torch.float64, device=dev)
        self.min_p = torch.zeros(slots, dtype=torch.float64, device=dev)
        self.seed = torch.zeros(slots, dtype=torch.int64, device=dev)
        self.offset = torch.zeros(slots, dtype=torch.int64, device=dev)  # each row's next token index
        self.repetition = torch.ones(slots, dtype=torch.float32, device=dev)
        self.presence = torch.zeros(slots, dtype=torch.float32, device=dev)
        self.frequency = torch.zeros(slots, dtype=torch.float32, device=dev)
        self.counts = torch.zeros(slots, vocab, dtype=torch.int32, device=dev)  # output tokens, per slot
        self.prompt_mask = torch.zeros(slots, vocab, dtype=torch.bool, device=dev)
        # Per slot, after a step with logprobs: [log p(token), the top k log p, their ids (as floats:
        # exact below 2^24)], k = min(TOP_LOGPROBS, vocab); one buffer, so the host reads it in one copy.
        self.top_k_logprobs = min(TOP_LOGPROBS, vocab)
        self.logprob_out = torch.zeros(slots, 1 + 2 * self.top_k_logprobs, dtype=torch.float32, device=dev)

    def drop_graphs(self) -> None:
        """Forget every captured graph and their memory pool. A pool whose graphs are all gone is
        released, and capturing into its stale handle trips the CUDA caching allocator's assert
        ("use_count > 0", seen on an H200 when a bigger batch regrew the cache): the next capture
        starts a fresh pool."""
        self.graphs.clear()
        self._pool = None

    def _decode_step(self, rows: int, penalized: bool = False, logprobs: bool = False) -> None:
        """The static step over slots [0, rows): only device buffers in, only device buffers out."""
        logits = self.model.decode(self.tokens[:rows], self.cache, self._kv_len(rows))
        self._sample(logits, slice(0, rows), penalized, last=self.tokens[:rows], logprobs=logprobs)

    def _kv_len(self, rows: int) -> int | None:
        """How much of the cache the step's attention reads: all of it on GPUs (the kernels stop at
        each row's length on the device; static shapes for the graphs); on CPU, where the eager
        attention reads every position it is given, only the prefix some row uses, in steps of 64."""
        if self.device.type != "cpu":
            return None
        return min(self.cache.max_len, -(-(max(self._lens[:rows]) + 1) // 64) * 64)

    def _sample(self, logits: torch.Tensor, rows: slice | torch.Tensor, penalized: bool,
                last: torch.Tensor | None = None, logprobs: bool = False) -> None:
        """Draw the tokens of ``rows`` (a slice, or int64 slot ids) into ``tokens``, advancing their
        offsets: one kernel. With ``penalized``, one more before it: count each row's ``last``
        token (the step's input; None: nothing to count, as after a prefill) and penalise. With
        ``logprobs``, also write the rows of ``logprob_out`` (``_logprobs``)."""
        gathered = isinstance(rows, torch.Tensor)  # indexing by a tensor copies: write the results back
        offset, tokens = self.offset[rows], self.tokens[rows]
        if penalized:
            counts = self.counts[rows]
            if last is None:
                last = torch.full((logits.shape[0],), -1, dtype=torch.int64, device=self.device)
            logits = self.model.ops.apply_penalties(logits, counts, self.prompt_mask[rows], last,
                                                    self.repetition[rows], self.presence[rows], self.frequency[rows])
        sample_next_(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows], self.seed[rows],
                     offset, tokens, self.min_p[rows])
        if logprobs:
            self.logprob_out[rows] = self._logprobs(logits, self.temperature[rows], tokens)
        if gathered:
            self.offset[rows], self.tokens[rows] = offset, tokens

    def _logprobs(self, logits: torch.Tensor, temperature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Rows of ``logprob_out`` for sampled ``tokens``: log-probabilities under the distribution
        the sampler drew from before its filters, i.e. log_softmax(logits / temperature) after the
        penalties (temperature 1 for greedy rows); top-k, top-p and min-p do not renormalise them.
        Device ops only (a log-softmax, a gather, a top-k): no host sync, capturable."""
        scaled = logits.float() / torch.where(temperature > 0, temperature, 1.0)[:, None]
        lp = torch.log_softmax(scaled, dim=-1)
        top_lp, top_ids = lp.topk(self.top_k_logprobs, dim=-1)
        return torch.cat([lp.gather(1, tokens[:, None]), top_lp, top_ids.float()], dim=1)

    def _capture(self, rows: int, penalized: bool, logprobs: bool = False) -> None:
        """Record the decode step of ``rows`` rows as a CUDA graph. Only while no request is running:
        the warm-up steps write into those rows' cache (the caller's prefill resets them after)."""
        self.cache.lens[:rows] = 0
        self.tokens[:rows] = 0
        stream = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):  # warm-up: every kernel variant compiles and autotunes here
            for _ in range(2):
                self._decode_step(rows, penalized, logprobs)
        stream.wait_stream(side)
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._decode_step(rows, penalized, logprobs)
        self.graphs[rows, penalized, logprobs] = graph
        self.cache.lens[:rows] = 0
        self.counts[:rows] = 0
        self._lens[:rows] = [0] * rows

    def _capture_missing(self, buckets: list[int], modes: list[tuple[bool, bool]]) -> float:
        """Capture the graphs of ``buckets`` x ``modes`` ((penalized, logprobs) pairs) not yet
        recorded; seconds spent (0.0: none was missing)."""
        missing = [(rows, *mode) for rows in buckets for mode in modes if (rows, *mode) not in self.graphs]
        if not missing:
            return 0.0
        start = time.perf_counter()
        for rows, penalized, logprobs in missing:
            self._capture(rows, penalized, logprobs)
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _check_device(self, cuda_graph: bool) -> None:
        if cuda_graph and self.device.type != "cuda":
            raise EngineError(f"CUDA graphs need a CUDA device, the model is on {self.device}")
        prepare_sampler(self.device)  # outside the step: a build without this device's kernel fails here
        prepare_device(self.device)  # the kernels' counters: never allocated inside a step

    # --- a batch: prepare, start, step ---------------------------------------------------------------
    def prepare(self, requests: list[Request], cuda_graph: bool) -> float:
        """Size the cache for ``requests`` and capture the step's graph if missing. Returns seconds spent capturing."""
        self._check_device(cuda_graph)
        batch = len(requests)
        self.use_graph = cuda_graph
        self.penalized = any(r.sampling.penalized for r in requests)
        self.logprobs = any(r.logprobs is not None for r in requests)
        self.batch, self.rows = batch, graph_bucket(batch) if cuda_graph else batch
        needed = max(len(s.prompt) + s.max_new_tokens for s in requests)
        self._allocate(self.rows, _rounded_len(needed, self.model.config.n_positions))
        if not cuda_graph:
            return 0.0
        return self._capture_missing([self.rows], [(self.penalized, self.logprobs)])

    def start(self, requests: list[Request]) -> torch.Tensor:
        """Prefill ``requests`` (as prepared) into slots [0, B) and sample each one's first token.

        Returns the tokens, int64 (B,) on the device (a view of ``tokens``).
        """
        self.release(range(len(requests), self.rows))  # padding rows
        self.admit(requests, list(range(len(requests))))
        return self.tokens[:self.batch]

    def step(self, rows: int | None = None) -> torch.Tensor:
        """One decode step for slots [0, rows) (default: the prepared batch's), finished and free
        rows too: shapes stay static. Returns the new tokens, int64 (rows,) on the device (a view of
        ``tokens``, overwritten by the next step); a prepared batch's padding rows are left out."""
        batch = self.batch if rows is None else rows
        rows = self.rows if rows is None else rows
        overflowing = [s for s in range(rows) if self._lens[s] >= self.cache.max_len]
        if overflowing:  # only free rows get here (a request's length is checked at admission)
            self.release(overflowing)
        if self.use_graph:
            self.graphs[rows, self.penalized, self.logprobs].replay()
        else:
            if self.penalized or self.logprobs:
                self.decode_step(rows, self.penalized, self.logprobs)
            else:  # as benchmarks call it (a torch.compile'd step is traced for this call)
                self.decode_step(rows)
        for s in range(rows):
            self._lens[s] += 1
        return self.tokens[:batch]

    # --- continuous batching: reserve, admit, release ------------------------------------------------
    def reserve(self, slots: int, max_len: int, cuda_graph: bool) -> float:
        """Size the cache for ``slots`` rows of ``max_len`` positions and, with ``cuda_graph``,
        capture every bucket up to ``slots`` with and without penalties and log-probabilities (four
        graphs a bucket), all before any request is admitted (a capture mid-flight would disturb
        running rows). Returns seconds spent capturing."""
        self._check_device(cuda_graph)
        self.use_graph = cuda_graph
        self._allocate(slots, max_len)
        self.release(range(self.cache.slots))
        if not cuda_graph:
            return 0.0
        modes = [(penalized, logprobs) for penalized in (False, True) for logprobs in (False, True)]
        return self._capture_missing(sorted({graph_bucket(b) for b in range(1, slots + 1)}), modes)

    def admit(self, requests: list[Request], slots: list[int]) -> None:
        """Prefill ``requests`` into ``slots`` (free, distinct), set their sampling state and sample
        each one's first token into ``tokens[slots]``; the host reads it from there.

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
        lengths = torch.tensor([len(requests[i].prompt) for i in unique], dtype=torch.int32)
        slot_ids = torch.tensor(slots, dtype=torch.int64, device=dev)
        logits = self.model.prefill(ids.to(dev), lengths.to(dev), self.cache, slot_ids[unique])
        shared = [i for i in range(len(requests)) if i not in unique]
        if shared:
            self.cache.copy_slots(slot_ids[[unique[source[i]] for i in shared]], slot_ids[shared], longest)

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype).to(dev)

        params = [r.sampling for r in requests]
        self.temperature[slot_ids] = column([p.temperature for p in params], torch.float32)
        self.top_k[slot_ids] = column([p.top_k for p in params], torch.int64)
        self.top_p[slot_ids] = column([p.top_p for p in params], torch.float64)
        self.min_p[slot_ids] = column([p.min_p for p in params], torch.float64)
        self.seed[slot_ids] = column([p.seed for p in params], torch.int64)
        self.repetition[slot_ids] = column([p.repetition_penalty for p in params], torch.float32)
        self.presence[slot_ids] = column([p.presence_penalty for p in params], torch.float32)
        self.frequency[slot_ids] = column([p.frequency_penalty for p in params], torch.float32)
        self.offset[slot_ids] = 0
        self.counts[slot_ids] = 0
        mask = torch.zeros(len(requests), self.model.config.vocab_size, dtype=torch.bool)
        for i, r in enumerate(requests):
            mask[i, r.prompt] = True
        self.prompt_mask[slot_ids] = mask.to(dev)
        for r, slot in zip(requests, slots):
            self._lens[slot] = len(r.prompt)
            r.begin()
        self._sample(logits[source], slot_ids, any(p.penalized for p in params),
                     logprobs=any(r.logprobs is not None for r in requests))

    def release(self, slots) -> None:
        """Reset ``slots`` to free rows: empty, greedy, no penalties (their later tokens are ignored)."""
        slots = list(slots)
        if not slots:
            return
        index = torch.tensor(slots, dtype=torch.int64, device=self.device)
        self.cache.lens[index] = 0
        self.temperature[index] = 0.0
        self.repetition[index] = 1.0
        self.presence[index] = 0.0
        self.frequency[index] = 0.0
        for s in slots:
            self._lens[s] = 0


class TokenReader:
    """Copies each step's tokens to the host without stalling the device.

    On CUDA: a non-blocking copy into one of two pinned buffers and an event, so the host can read
    step n while the device runs step n + 1. Elsewhere: a plain copy.
    """

    def __init__(self, rows: int, device: torch.device, columns: int = 0, dtype: torch.dtype = torch.int64):
        """Reads (rows,) tensors, or (rows, columns) with ``columns`` (e.g. ``logprob_out``), of ``dtype``."""
        self.cuda = device.type == "cuda"
        if self.cuda:
            shape = (rows, columns) if columns else (rows,)
            self._buffers = [torch.empty(shape, dtype=dtype, pin_memory=True) for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
        self._next = 0

    def submit(self, tokens: torch.Tensor) -> int | list:
        """Start copying ``tokens`` (as constructed: int64 (B,) by default); returns a ticket for ``read``."""
        if not self.cuda:
            return tokens.tolist()
        i, self._next = self._next, 1 - self._next
        self._buffers[i].copy_(tokens, non_blocking=True)
        self._events[i].record()
        return i

    def read(self, ticket: int | list) -> list:
        """The tokens (a list of the rows' values) of a submitted copy, waiting for it if needed."""
        if not self.cuda:
            return ticket
        self._events[ticket].synchronize()
        return self._buffers[ticket].tolist()
