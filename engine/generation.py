"""``generate``: the loop around the runner: prefill a batch of prompts, then step until every row is done."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, replace
from numbers import Integral
from typing import Callable, Sequence

import torch

from gpt2kernels.sampling import as_int64

from .errors import ContextLengthError, ParameterError
from .model import GPT2
from .request import SEED_LIMIT, Request, check_logprobs, check_max_time, check_seed, sampling_params, stop_strings
from .runner import Runner, TokenReader
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


def _is_id(v) -> bool:
    """An integer token id: int, numpy's integers, but not bool."""
    return isinstance(v, Integral) and not isinstance(v, bool)


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
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and all(map(_is_id, prompts))):
        prompts = [prompts]  # one prompt: a string, or a flat list of ids
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ParameterError("prompts", "prompts must be a string, a list of strings, a list of token-id lists "
                                        f"or an integer tensor, got {_describe(prompts)}")
    is_text = all(isinstance(p, str) for p in prompts)
    if is_text:
        rows = [encode(p, allow_special=allow_special) for p in prompts]
    else:
        for r, p in enumerate(prompts):
            if not isinstance(p, (list, tuple)) or not all(map(_is_id, p)):
                raise ParameterError("prompts", f"prompt {r} must be a string or a list of int token ids like the "
                                                f"others, got {_describe(p)}")
        rows = [[int(t) for t in p] for p in prompts]
    rows = [ids or [EOT_ID] for ids in rows]  # an empty prompt starts from <|endoftext|>
    for r, ids in enumerate(rows):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            start = " (an empty prompt starts from it)" if bad == EOT_ID else ""
            raise ParameterError("prompts", f"prompt {r} holds token id {bad}{start}, outside the model's vocabulary "
                                            f"of {vocab_size} tokens")
    return rows, is_text


def _describe(v) -> str:
    """A short description of a value of the wrong kind, for an error message."""
    if isinstance(v, (list, tuple)):
        inner = sorted({type(x).__name__ for x in v})
        return f"a {type(v).__name__} of {', '.join(inner) or 'nothing'}"
    return f"{type(v).__name__} {v!r}"[:80]


def check_context(prompt_len: int, max_new_tokens: int, n_positions: int) -> None:
    """Raise ContextLengthError unless the prompt and the new tokens fit the model's positions.

    The last new token is sampled, never fed back, so it needs no position: as in HF, a prompt of
    ``n_positions`` tokens may still get one new token.
    """
    if prompt_len + max_new_tokens - 1 > n_positions:
        raise ContextLengthError(
            f"prompt of {prompt_len} tokens plus {max_new_tokens} new tokens needs {prompt_len + max_new_tokens - 1} "
            f"positions (the last new token needs none), more than the model's context of {n_positions}")


def _seeds(seed: int | Sequence[int] | None, rows: int) -> list[int]:
    """Each row's seed in [0, 2^64): a list as given, an int s as s + r for row r (mod 2^64), None drawn at random."""
    if seed is None:
        seed = secrets.randbits(63)
    if isinstance(seed, (list, tuple)):
        if len(seed) != rows:
            raise ParameterError("seed", f"seed must be an int or a list of {rows} ints (one per prompt), got {seed!r}")
        return [check_seed(s) for s in seed]
    return [(check_seed(seed) + r) % SEED_LIMIT for r in range(rows)]


def runner_for(model: GPT2) -> Runner:
    """The model's runner, made on first use: its cache and CUDA graphs are reused by later calls."""
    if getattr(model, "runner", None) is None:
        model.runner = Runner(model)
    return model.runner


def generate(model: GPT2, prompts: Prompts, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | Sequence[int] | None = None, stop_at_eos: bool = True,
             on_text: Callable[[int, str], None] | None = None, allow_special: bool = False,
             cuda_graph: bool | None = None, min_p: float = 0.0, repetition_penalty: float = 1.0,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0, stop: str | Sequence[str] | None = None,
             max_time: float | None = None, logprobs: bool = False, top_logprobs: int = 0,
             cancel: threading.Event | None = None) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens for each prompt.

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
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ParameterError("max_new_tokens", f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
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

    seqs = [Request(ids, max_new_tokens, replace(sampling, seed=as_int64(s)), stop_at_eos, on_text=streamer(r), stop=stops,
                    max_time=max_time, keep_text=is_text, logprobs=want_logprobs)
            for r, (ids, s) in enumerate(zip(rows, seeds))]
    runner = runner_for(model)
    capture_seconds = runner.prepare(seqs, cuda_graph)
    reader = TokenReader(len(seqs), model.device)
    lp_reader = None if want_logprobs is None else \
        TokenReader(len(seqs), model.device, runner.logprob_out.shape[1], torch.float32)

    def submit(tokens: torch.Tensor) -> tuple:
        return reader.submit(tokens), lp_reader and lp_reader.submit(runner.logprob_out[:len(seqs)])

    def accept(ticket: tuple) -> None:
        tokens = reader.read(ticket[0])
        rows_lp = lp_reader.read(ticket[1]) if lp_reader else [None] * len(seqs)
        for seq, tok, lp in zip(seqs, tokens, rows_lp):
            seq.accept(tok, lp)

    start = time.perf_counter()
    accept(submit(runner.start(seqs)))
    prefill_done = time.perf_counter()
    # On CUDA the host reads step n while the device runs step n + 1 (so it never idles on Python);
    # a batch that finished at step n then runs one step more, whose tokens are ignored.
    lookahead = model.device.type == "cuda"
    pending, steps = None, 0
    while steps < max_new_tokens - 1 and not all(s.finished for s in seqs):
        if cancel is not None and cancel.is_set():
            for s in seqs:
                s.finish("cancelled")
            break
        ticket = submit(runner.step())
        steps += 1
        if lookahead:
            ticket, pending = pending, ticket
        if ticket is not None:
            accept(ticket)
    if pending is not None:
        accept(pending)
    end = time.perf_counter()

    return GenerationOutput(tokens=[s.tokens for s in seqs], texts=[s.text for s in seqs] if is_text else None,
                            prompt_tokens=rows, prefill_seconds=prefill_done - start,
                            decode_seconds=end - prefill_done, decode_steps=steps, capture_seconds=capture_seconds,
                            finish_reasons=[s.finish_reason for s in seqs],
                            logprobs=None if want_logprobs is None else [s.token_logprobs for s in seqs],
                            top_logprobs=None if not want_logprobs else [s.top_logprobs for s in seqs],
                            seeds=seeds)
