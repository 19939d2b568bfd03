"""Log-likelihood of given text: ``score`` (per text, per token) and ``perplexity`` (over one long text).

Texts longer than the model's window are scored by the sliding-window method of HF's perplexity
guide: windows of ``window`` tokens starting every ``stride`` tokens; each window scores only the
tokens after the previous window's end, with the tokens before them as context. So every token is
scored once, with up to ``window - 1`` tokens of context, and the first token of the text is not
scored (nothing predicts it). With ``stride == window`` the windows do not overlap and, as in HF's
guide, the first token of each window is not scored either.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .errors import EngineError
from .model import GPT2
from .tokenizer import encode

IGNORE = -100  # a target that is not scored (kernels' and torch's ignore_index)


@dataclass(frozen=True)
class Window:
    begin: int   # the window is tokens [begin, end) of the text
    end: int
    first: int   # it scores tokens [first, end), each predicted from the tokens before it in the window


def windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The sliding windows over a text of ``n_tokens`` tokens (module docstring)."""
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append(Window(begin, end, first))
        if end >= n_tokens:
            return out
        prev_end, begin = end, begin + stride


def check_window(model: GPT2, window: int | None, stride: int | None) -> tuple[int, int]:
    """(window, stride) with defaults filled in (the model's positions; half of it, as HF's guide's
    512 at GPT-2's 1024); raises EngineError naming a bad one."""
    positions = model.config.n_positions
    window = positions if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= positions:
        raise EngineError(f"window must be an integer in [2, {positions}] (the model's positions), got {window}")
    stride = max(1, window // 2) if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window:
        raise EngineError(f"stride must be an integer in [1, window = {window}], got {stride}")
    return window, stride


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EngineError(f"batch_size must be an integer >= 1, got {batch_size}")


def _window_logprobs(model: GPT2, spans: list[tuple[Sequence[int], Window]], batch_size: int
                     ) -> Iterator[torch.Tensor]:
    """For each (text's ids, window), log p(token | the window's tokens before it) of the window's
    scored tokens, fp32 on the host, in order; ``batch_size`` windows a forward, shorter ones
    right-padded (padding is never attended by the positions before it, and is not scored)."""
    for i in range(0, len(spans), batch_size):
        batch = spans[i:i + batch_size]
        length = max(w.end - w.begin for _, w in batch)
        inputs = torch.zeros(len(batch), length, dtype=torch.int64)
        targets = torch.full((len(batch), length), IGNORE, dtype=torch.int64)
        for row, (ids, w) in enumerate(batch):
            inputs[row, :w.end - w.begin] = torch.tensor(ids[w.begin:w.end])
            # token p of the text is predicted at position p - 1 of the window
            targets[row, w.first - 1 - w.begin:w.end - 1 - w.begin] = torch.tensor(ids[w.first:w.end])
        logprobs = model.target_logprobs(inputs.to(model.device), targets.to(model.device)).cpu()
        for row, (_, w) in enumerate(batch):
            yield logprobs[row, w.first - 1 - w.begin:w.end - 1 - w.begin]


def _token_ids(model: GPT2, text: str | Sequence[int], what: str) -> list[int]:
    if isinstance(text, str):
        ids = encode(text)
    elif isinstance(text, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in text):
        ids = list(text)
    else:
        raise EngineError(f"{what} must be a string or a list of token ids, got {type(text).__name__}")
    vocab = model.config.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise EngineError(f"{what} holds token id {bad}, outside the model's vocabulary [0, {vocab})")
    return ids


@dataclass
class Score:
    tokens: list[int]
    token_logprobs: list[float]  # log p(tokens[i] | tokens[:i]) for i = 1 .. T - 1 (T - 1 values)
    total_logprob: float         # their sum: what HF's labels= loss counts, times -(T - 1)


def score(model: GPT2, texts: str | Sequence[int] | Sequence[str | Sequence[int]], window: int | None = None,
          stride: int | None = None, batch_size: int = 8) -> list[Score]:
    """Per text, the log-probability of each token given the ones before it, and their sum.

    texts: a string or a list of token ids (one text), or a list of those. Texts longer than
    ``window`` tokens (default: the model's positions) are scored with sliding windows of that
    size every ``stride`` tokens (default window // 2; it must be < window, so that every token
    after the first is scored). Windows of all texts run ``batch_size`` at a time.
    """
    if isinstance(texts, str) or (isinstance(texts, (list, tuple)) and texts and isinstance(texts[0], int)):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts:
        raise EngineError("texts must be a non-empty list of strings or of token-id lists")
    window, stride = check_window(model, window, stride)
    if stride >= window:
        raise EngineError(f"stride must be < window ({window}) to score every token, got {stride}")
    _check_batch_size(batch_size)
    all_ids = [_token_ids(model, t, f"texts[{i}]") for i, t in enumerate(texts)]
    owned = [(i, (ids, w)) for i, ids in enumerate(all_ids) for w in windows(len(ids), window, stride)]
    parts: list[list[torch.Tensor]] = [[] for _ in texts]
    logprobs = _window_logprobs(model, [span for _, span in owned], batch_size)
    for (owner, _), lp in zip(owned, logprobs):
        parts[owner].append(lp)
    out = []
    for ids, mine in zip(all_ids, parts):
        lp = torch.cat(mine) if mine else torch.zeros(0)
        out.append(Score(tokens=ids, token_logprobs=lp.tolist(), total_logprob=float(lp.double().sum())))
    return out


@dataclass
class Perplexity:
    tokens: int          # tokens scored
    loss: float          # mean negative log-likelihood, nats per token
    perplexity: float    # exp(loss)
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def perplexity(model: GPT2, text: str | Sequence[int], window: int | None = None, stride: int | None = None,
               batch_size: int = 1, progress: Callable[[int], None] | None = None) -> Perplexity:
    """Perplexity of one (long) text with sliding windows (module docstring): window defaults to
    the model's positions, stride to half of it. ``progress(n)`` is called as each batch of
    windows finishes, with the tokens it scored."""
    window, stride = check_window(model, window, stride)
    _check_batch_size(batch_size)
    ids = _token_ids(model, text, "text")
    if len(ids) < 2:
        raise EngineError(f"the text has {len(ids)} token(s): perplexity needs at least 2 (the first is not scored)")
    spans = [(ids, w) for w in windows(len(ids), window, stride)]
    start = time.perf_counter()
    total, count = 0.0, 0
    for lp in _window_logprobs(model, spans, batch_size):
        total -= float(lp.double().sum())
        count += len(lp)
        if progress is not None:
            progress(len(lp))
    loss = total / count
    return Perplexity(tokens=count, loss=loss, perplexity=math.exp(loss), seconds=time.perf_counter() - start)
