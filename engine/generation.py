"""``generate``: prefill a batch of prompts, then decode one token per step with streaming text."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from kernels import check_sampling_params

from .cache import StaticKVCache
from .errors import ContextLengthError, EngineError
from .model import GPT2
from .tokenizer import EOT_ID, StreamDecoder, decode, encode

Prompts = str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor


@dataclass
class GenerationOutput:
    tokens: list[list[int]]          # new tokens per row; a row that stopped at EOS ends with it
    texts: list[str] | None          # their text (EOS left out) when the prompts were text
    prompt_tokens: list[list[int]]
    prefill_seconds: float           # prompt forward plus the first token's sampling
    decode_seconds: float            # every later step
    decode_steps: int

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second summed over the batch, decode steps only."""
        rows = len(self.tokens)
        return self.decode_steps * rows / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def _prompt_ids(prompts: Prompts, allow_special: bool, vocab_size: int) -> tuple[list[list[int]], bool]:
    """Token ids per row, and whether the prompts were text."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32):
            raise EngineError(f"token prompts must be an integer tensor (B, T), got {prompts.dtype} {list(prompts.shape)}")
        prompts = prompts.tolist()
    prompts = list(prompts)
    if not prompts:
        raise EngineError("no prompts given")
    is_text = all(isinstance(p, str) for p in prompts)
    if is_text:
        rows = [encode(p, allow_special=allow_special) for p in prompts]
    else:
        rows = [list(p) for p in prompts]
        for r, ids in enumerate(rows):
            if any(isinstance(i, str) for i in ids) or any(not 0 <= int(i) < vocab_size for i in ids):
                raise EngineError(f"prompt row {r} holds ids outside [0, {vocab_size}) or mixes text and ids")
        rows = [[int(i) for i in ids] for ids in rows]
    return [ids or [EOT_ID] for ids in rows], is_text  # an empty prompt starts from <|endoftext|>


def check_context(prompt_len: int, max_new_tokens: int, n_positions: int) -> None:
    """Raise ContextLengthError when a prompt plus the new tokens exceed the model's positions."""
    if prompt_len + max_new_tokens > n_positions:
        raise ContextLengthError(
            f"prompt of {prompt_len} tokens plus {max_new_tokens} new tokens = {prompt_len + max_new_tokens} "
            f"exceeds the model's context of {n_positions} positions")


def generate(model: GPT2, prompts: Prompts, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
             on_text: Callable[[int, str], None] | None = None, allow_special: bool = False) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens for each prompt.

    prompts: a string, a list of strings, or token ids (a list of lists, or an int tensor (B, T));
    ragged batches are fine. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.
    seed: the same seed reproduces the same tokens (None draws one). on_text(row, piece) receives
    streamed text as it is generated; the pieces of a row concatenate to its final text.
    ``<|endoftext|>`` inside a text prompt is plain text unless ``allow_special``.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise EngineError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    check_sampling_params(temperature, top_k, top_p)
    cfg = model.config
    rows, is_text = _prompt_ids(prompts, allow_special, cfg.vocab_size)
    longest = max(len(ids) for ids in rows)
    check_context(longest, max_new_tokens, cfg.n_positions)
    seed = secrets.randbits(63) if seed is None else int(seed)

    batch, device = len(rows), model.device
    cache = StaticKVCache(cfg, batch, longest + max_new_tokens, model.dtype, device)
    input_ids = torch.zeros((batch, longest), dtype=torch.long)  # right padding, never attended
    for r, ids in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
    lengths = torch.tensor([len(ids) for ids in rows], dtype=torch.int32, device=device)
    input_ids = input_ids.to(device)

    out: list[list[int]] = [[] for _ in rows]
    finished = [False] * batch
    decoders = [StreamDecoder() for _ in rows] if on_text else None

    def accept(tokens: torch.Tensor) -> None:
        for r, tok in enumerate(tokens.tolist()):
            if finished[r]:
                continue
            if tok < 0:
                raise RuntimeError(f"row {r}: the model produced NaN or all -inf logits")
            out[r].append(tok)
            if stop_at_eos and tok == EOT_ID:
                finished[r] = True
            elif decoders:
                piece = decoders[r].push(tok)
                if piece:
                    on_text(r, piece)

    def sample(logits: torch.Tensor, step: int) -> torch.Tensor:
        return model.ops.sample(logits, temperature, top_k, top_p, seed, step)

    start = time.perf_counter()
    tokens = sample(model.prefill(input_ids, lengths, cache), 0)
    accept(tokens)
    prefill_done = time.perf_counter()
    steps = 0
    for step in range(1, max_new_tokens):
        if all(finished):
            break
        tokens = sample(model.decode(tokens, cache), step)
        accept(tokens)
        steps += 1
    end = time.perf_counter()
    if decoders:
        for r, d in enumerate(decoders):
            tail = d.flush()
            if tail:
                on_text(r, tail)

    texts = [decode([t for t in toks if t != EOT_ID or not stop_at_eos]) for toks in out] if is_text else None
    return GenerationOutput(tokens=out, texts=texts, prompt_tokens=rows, prefill_seconds=prefill_done - start,
                            decode_seconds=end - prefill_done, decode_steps=steps)
