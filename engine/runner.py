"""The decode core: a persistent KV cache, per-request state and a static decode step, replayed as
a CUDA graph on GPUs.

``Runner.step()`` = decode -> sample, with the same ops on the same shapes every step,
every input in a persistent device buffer and no host sync, so one capture per batch-size bucket
replays it. The host reads each step's tokens outside the step (``TokenReader``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from kernels import prepare_device
from kernels.sampling import prepare_sampler, sample_next_

from .cache import KVCache
from .errors import EngineError
from .model import GPT2
from .tokenizer import EOT_ID, StreamDecoder

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


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling: temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.
    ``seed`` keys the request's own random stream (its n-th token draws at offset n)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Request:
    """One request: its prompt, its sampling, and what it has produced so far."""
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_at_eos: bool = True
    on_text: Callable[[str], None] | None = None  # receives streamed text as it is generated
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    _decoder: StreamDecoder | None = None

    def accept(self, token: int) -> None:
        """Take the next sampled token; stream its text; finish at EOS or the token limit."""
        if self.finished:
            return
        if token < 0:
            raise RuntimeError("the model produced NaN or all -inf logits")
        self.tokens.append(token)
        if self.stop_at_eos and token == EOT_ID:
            self.finished = True
        elif self.on_text is not None:
            self._decoder = self._decoder or StreamDecoder()
            piece = self._decoder.push(token)
            if piece:
                self.on_text(piece)
        if len(self.tokens) >= self.max_new_tokens:
            self.finished = True
        if self.finished and self._decoder is not None:
            tail = self._decoder.flush()
            if tail:
                self.on_text(tail)


def _rounded_len(needed: int, n_positions: int) -> int:
    return min(n_positions, -(-needed // CACHE_LEN_STEP) * CACHE_LEN_STEP)


class Runner:
    """Owns a model's KV cache, the decode step's inputs and one CUDA graph per batch bucket.

    Persistent across calls: the cache grows (and its graphs are recaptured) only when a batch
    needs more slots or positions than it has. Use: ``start(requests)`` (prefill + first token),
    then ``step()`` until every request is finished; ``tokens`` holds the latest tokens.
    """

    def __init__(self, model: GPT2):
        self.model = model
        self.device = model.device
        self.cache: KVCache | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.rows = 0          # rows the decode step runs (the batch, padded to a bucket with graphs)
        self.batch = 0         # real rows
        self.use_graph = False
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
        dev = self.device
        self.tokens = torch.zeros(slots, dtype=torch.int64, device=dev)
        self.temperature = torch.zeros(slots, dtype=torch.float32, device=dev)  # padding rows: greedy
        self.top_k = torch.zeros(slots, dtype=torch.int64, device=dev)
        self.top_p = torch.ones(slots, dtype=torch.float64, device=dev)
        self.seed = torch.zeros(slots, dtype=torch.int64, device=dev)
        self.offset = torch.zeros(slots, dtype=torch.int64, device=dev)  # each row's next token index

    def drop_graphs(self) -> None:
        """Forget every captured graph and their memory pool. A pool whose graphs are all gone is
        released, and capturing into its stale handle trips the CUDA caching allocator's assert
        ("use_count > 0", seen on an H200 when a bigger batch regrew the cache): the next capture
        starts a fresh pool."""
        self.graphs.clear()
        self._pool = None

    def _sample_into(self, logits: torch.Tensor, rows: int) -> None:
        """Draw rows [0, rows)'s tokens into ``tokens`` and advance their offsets: one kernel."""
        sample_next_(logits, self.temperature[:rows], self.top_k[:rows], self.top_p[:rows],
                     self.seed[:rows], self.offset[:rows], self.tokens[:rows])

    def _decode_step(self, rows: int) -> None:
        """The static step over slots [0, rows): only device buffers in, only device buffers out."""
        self._sample_into(self.model.decode(self.tokens[:rows], self.cache), rows)

    def _capture(self, rows: int) -> None:
        """Record the decode step of ``rows`` rows as a CUDA graph (state is reset by the prefill after)."""
        self.cache.lens[:rows] = 0
        self.tokens[:rows] = 0
        stream = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):  # warm-up: every kernel variant compiles and autotunes here
            for _ in range(2):
                self._decode_step(rows)
        stream.wait_stream(side)
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._decode_step(rows)
        self.graphs[rows] = graph

    # --- the loop's three calls ---------------------------------------------------------------------
    def prepare(self, requests: list[Request], cuda_graph: bool) -> float:
        """Size the cache for ``requests`` and capture the step's graph if missing. Returns seconds spent capturing."""
        if cuda_graph and self.device.type != "cuda":
            raise EngineError(f"CUDA graphs need a CUDA device, the model is on {self.device}")
        prepare_sampler(self.device)  # outside the step: a build without this device's kernel fails here
        prepare_device(self.device)  # the kernels' counters: never allocated inside a step
        batch = len(requests)
        self.use_graph = cuda_graph
        self.batch, self.rows = batch, graph_bucket(batch) if cuda_graph else batch
        needed = max(len(s.prompt) + s.max_new_tokens for s in requests)
        self._allocate(self.rows, _rounded_len(needed, self.model.config.n_positions))
        if not cuda_graph or self.rows in self.graphs:
            return 0.0
        start = time.perf_counter()
        self._capture(self.rows)
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def start(self, requests: list[Request]) -> torch.Tensor:
        """Prefill ``requests`` (as prepared) into slots [0, B) and sample each one's first token.

        Returns the tokens, int64 (B,) on the device (a view of ``tokens``).
        """
        batch, rows, dev = self.batch, self.rows, self.device
        longest = max(len(s.prompt) for s in requests)
        ids = torch.zeros((batch, longest), dtype=torch.int64)  # right padding, never attended
        for r, s in enumerate(requests):
            ids[r, :len(s.prompt)] = torch.tensor(s.prompt)
        lengths = torch.tensor([len(s.prompt) for s in requests], dtype=torch.int32)
        params = [s.sampling for s in requests] + [SamplingParams(temperature=0.0)] * (rows - batch)
        self.temperature[:rows] = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        self.top_k[:rows] = torch.tensor([p.top_k for p in params], dtype=torch.int64)
        self.top_p[:rows] = torch.tensor([p.top_p for p in params], dtype=torch.float64)
        self.seed[:rows] = torch.tensor([p.seed for p in params], dtype=torch.int64)
        self.offset[:rows] = 0
        self.tokens[:rows] = 0
        self.cache.lens[:rows] = 0  # padding rows start empty
        logits = self.model.prefill(ids.to(dev), lengths.to(dev), self.cache)
        self._sample_into(logits, batch)
        return self.tokens[:batch]

    def step(self) -> torch.Tensor:
        """One decode step for every row (finished ones too: shapes stay static). Returns the new
        tokens, int64 (B,) on the device (a view of ``tokens``, overwritten by the next step)."""
        if self.use_graph:
            self.graphs[self.rows].replay()
        else:
            self.decode_step(self.rows)
        return self.tokens[:self.batch]


class TokenReader:
    """Copies each step's tokens to the host without stalling the device.

    On CUDA: a non-blocking copy into one of two pinned buffers and an event, so the host can read
    step n while the device runs step n + 1. Elsewhere: a plain copy.
    """

    def __init__(self, rows: int, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._buffers = [torch.empty(rows, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
        self._next = 0

    def submit(self, tokens: torch.Tensor) -> int | list[int]:
        """Start copying ``tokens`` (int64 (B,)); returns a ticket for ``read``."""
        if not self.cuda:
            return tokens.tolist()
        i, self._next = self._next, 1 - self._next
        self._buffers[i].copy_(tokens, non_blocking=True)
        self._events[i].record()
        return i

    def read(self, ticket: int | list[int]) -> list[int]:
        """The tokens of a submitted copy, waiting for it if needed."""
        if not self.cuda:
            return ticket
        self._events[ticket].synchronize()
        return self._buffers[ticket].tolist()
