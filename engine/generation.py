"""``generate``: the loop around the runner: prefill a batch of prompts, then step until every row is done."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from gpt2kernels.sampling import as_int64

from .checks import check_int, check_prompt_ids, is_int
from .errors import NumericalError, ParameterError
from .model.gpt2 import GPT2
from .core.request import SEED_LIMIT, Request, check_logprobs, check_max_time, check_seed, sampling_params, stop_strings
from .core.scheduler import check_context, scheduler_for
from .tokenizer import EOT_ID, encode

Prompts = str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor


@dataclass
class GenerationOutput:
    tokens: list[list[int]]          # new tokens per row; a row that stopped at EOS ends with it
    texts: list[str] | None          # with text prompts: their text (without EOS, a stop string and what follows)
    prompt_tokens: list[list[int]]
    prefill_seconds: float           # prompt forward plus the first token's sampling
    decode_seconds: float            # every later step
    decode_steps: int
    capture_seconds: float = 0.0     # CUDA-graph capture before the prefill (0 when reused or off)
    finish_reasons: list[str] | None = None  # per row: "stop" (EOS or a stop string), "length", "time", "cancelled"
    logprobs: list[list[float]] | None = None  # with logprobs=True: per row, each new token's log p
    top_logprobs: list[list[list[tuple[int, float]]]] | None = None  # per row, per token: (id, log p), likeliest first
    seeds: list[int] | None = None   # each row's seed, in [0, 2^64): pass them back as ``seed`` to reproduce the run

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second summed over the batch, decode steps only."""
        rows = len(self.tokens)
        return self.decode_steps * rows / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def _prompt_ids(prompts: Prompts, allow_special: bool, vocab_size: int) -> tuple[list[list[int]], bool]:
    """Token ids per row, and whether the prompts were text; ParameterError("prompts") for anything
    else: other types, bools or floats as ids, a mix of text and ids, ids outside the vocabulary."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32):
            raise ParameterError("prompts", f"token prompts must be an integer tensor (B, T), "
                                            f"got {prompts.dtype} {list(prompts.shape)}")
        prompts = prompts.tolist()
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and all(map(is_int, prompts))):
        prompts = [prompts]  # one prompt: a string, or a flat list of ids
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ParameterError("prompts", "prompts must be a string, a list of strings, a list of token-id lists "
                                        f"or an integer tensor, got {_describe(prompts)}")
    is_text = all(isinstance(p, str) for p in prompts)
    if is_text:
        rows = [encode(p, allow_special=allow_special) for p in prompts]
    else:
        for r, p in enumerate(prompts):
            if not isinstance(p, (list, tuple)) or not all(map(is_int, p)):
                raise ParameterError("prompts", f"prompt {r} must be a string or a list of int token ids like the "
                                                f"others, got {_describe(p)}")
        rows = [[int(t) for t in p] for p in prompts]
    rows = [ids or [EOT_ID] for ids in rows]  # an empty prompt starts from <|endoftext|>
    for r, ids in enumerate(rows):
        note = " (an empty prompt starts from it)" if ids == [EOT_ID] else ""
        check_prompt_ids(ids, vocab_size, f"prompt {r}", "prompts", note)
    return rows, is_text


def _describe(v) -> str:
    """A short description of a value of the wrong kind, for an error message."""
    if isinstance(v, (list, tuple)):
        inner = sorted({type(x).__name__ for x in v})
        return f"a {type(v).__name__} of {', '.join(inner) or 'nothing'}"
    return f"{type(v).__name__} {v!r}"[:80]


def _seeds(seed: int | Sequence[int] | None, rows: int) -> list[int]:
    """Each row's seed in [0, 2^64): a list as given, an int s as s + r for row r (mod 2^64), None drawn at random."""
    if seed is None:
        seed = secrets.randbits(63)
    if isinstance(seed, (list, tuple)):
        if len(seed) != rows:
            raise ParameterError("seed", f"seed must be an int or a list of {rows} ints (one per prompt), got {seed!r}")
        return [check_seed(s) for s in seed]
    return [(check_seed(seed) + r) % SEED_LIMIT for r in range(rows)]


def generate(model: GPT2, prompts: Prompts, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | Sequence[int] | None = None, stop_at_eos: bool = True,
             on_text: Callable[[int, str], None] | None = None, allow_special: bool = False,
             cuda_graph: bool | None = None, min_p: float = 0.0, repetition_penalty: float = 1.0,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0, stop: str | Sequence[str] | None = None,
             max_time: float | None = None, logprobs: bool = False, top_logprobs: int = 0,
             cancel: threading.Event | None = None) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens for each prompt, through the model's scheduler
    (``engine.core.scheduler_for``): a batch of its own when the model is idle, or joining the
    running batch of a server that serves the same model in this process.

    prompts: a string, a list of strings, or token ids (a list of lists, or an int tensor (B, T));
    ragged batches are fine, and identical prompts share one prefill. temperature 0 is greedy;
    top_k 0, top_p 1 and min_p 0 disable those filters. repetition_penalty (HF's: > 1 discourages
    the prompt's and the output's tokens), presence_penalty and frequency_penalty (OpenAI's, in
    [-2, 2], over the output's tokens) act on the logits first; 1, 0 and 0 disable them.
    seed: per prompt, a list of ints in [0, 2^64); an int s seeds prompt r with s + r; None draws one. A prompt's
    random draws depend only on its own seed, never on its row or the other prompts of the batch
    (its logits, up to the matmuls' rounding, which depends on the batch size: see the README).
    stop: a string or list of strings; a row ends where one appears in its text, which leaves it
    out. max_time: seconds after which every row ends ("time"). on_text(row, piece) receives
    streamed text as it is generated; the pieces of a row concatenate to its final text.
    ``<|endoftext|>`` inside a text prompt is plain text unless ``allow_special``.
    cuda_graph: replay the decode step as a CUDA graph (None: on for a CUDA model).
    logprobs: also return each new token's log-probability under the distribution it was drawn
    from (log-softmax of the penalised logits over the temperature, 1 when greedy; top-k/top-p/
    min-p do not renormalise it), and with ``top_logprobs`` = n in [1, 20] the n likeliest tokens'
    at each step: computed on the device in the step, read with its tokens.
    cancel: an event (anything with ``is_set()``), set from another thread or a signal handler:
    every unfinished row then ends at the next step with finish reason "cancelled", keeping what it
    produced. ``seeds`` in the output reproduce an unseeded run.
    Bad parameters raise ``ParameterError`` (an ``EngineError``) naming them.
    """
    check_int("max_new_tokens", max_new_tokens, 1)
    sampling = sampling_params(temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                               frequency_penalty)
    stops = stop_strings(stop)
    check_max_time(max_time)
    want_logprobs = check_logprobs(logprobs, top_logprobs)
    cfg = model.config
    rows, is_text = _prompt_ids(prompts, allow_special, cfg.vocab_size)
    check_context(max(len(ids) for ids in rows), max_new_tokens, cfg.n_positions)
    seeds = _seeds(seed, len(rows))
    if cuda_graph is None:
        cuda_graph = model.device.type == "cuda"

    def streamer(r):
        return None if on_text is None else lambda piece: on_text(r, piece)

    seqs = [Request(ids, max_new_tokens, replace(sampling, seed=as_int64(s)), stop_at_eos, on_text=streamer(r),
                    stop=stops,
                    max_time=max_time, keep_text=is_text, logprobs=want_logprobs)
            for r, (ids, s) in enumerate(zip(rows, seeds))]
    scheduler = scheduler_for(model)
    capture_seconds = scheduler.size_for(seqs, cuda_graph)
    start = time.monotonic()
    scheduler.submit(seqs, queue_limit=False)
    scheduler.run(seqs, cancel)
    end = time.monotonic()
    failed = next((s for s in seqs if s.error is not None), None)
    if failed is not None:
        raise NumericalError(failed.error)
    first_tokens = max((s.first_token_at for s in seqs if s.first_token_at is not None), default=end)
    return GenerationOutput(tokens=[s.tokens for s in seqs], texts=[s.text for s in seqs] if is_text else None,
                            prompt_tokens=rows, prefill_seconds=first_tokens - start,
                            decode_seconds=end - first_tokens, decode_steps=max(len(s.tokens) for s in seqs) - 1,
                            capture_seconds=capture_seconds, finish_reasons=[s.finish_reason for s in seqs],
                            logprobs=None if want_logprobs is None else [s.token_logprobs for s in seqs],
                            top_logprobs=None if not want_logprobs else [s.top_logprobs for s in seqs],
                            seeds=seeds)
