"""Every per-slot tensor of a decode batch in one place: the slot's latest token, its sampling and
penalty controls, its random stream and its penalty counts (vLLM keeps the same in ``InputBatch``).

The controls are not listed here: they are ``gpt2kernels``' tables (``CONTROLS``: the sampling
controls, then the penalties), so a new control needs no change in this module.
"""

from __future__ import annotations

from typing import Sequence

import torch

from gpt2kernels import CONTROLS, PENALTY_CONTROLS, SAMPLING_CONTROLS

from .request import SamplingParams

# Alternatives a step with log-probabilities records per row (OpenAI's API allows up to 20).
TOP_LOGPROBS = 20


class SlotState:
    """Per-slot device tensors, one row a slot, at fixed addresses (CUDA graphs capture them):

    - ``tokens`` int64 (S,): each slot's latest token, the decode step's input and output;
    - ``controls[name]`` (S,) in the control's dtype, for every sampling and penalty control;
    - ``seed`` int64 (S,) and ``offset`` int64 (S,): the slot's Philox key and the index of its
      request's next token;
    - ``counts`` int32 (S, V): how often each token was generated; ``prompt_mask`` bool (S, V):
      the prompt's tokens (the penalties' state);
    - ``logprob_out`` float32 (S, 1 + 2k), k = ``top_logprobs``: after a step with log-probabilities,
      [log p(token), the top k log p, their ids (as floats: exact below 2^24)], one buffer so the
      host reads it in one copy.

    A free slot holds each tensor's free value (greedy, no penalties, zero counts): ``free`` resets
    every tensor listed in ``free_values``, the same list the constructor fills from, so nothing
    ``assign`` sets can survive a ``free``.
    """

    def __init__(self, slots: int, vocab_size: int, device: torch.device):
        self.slots, self.device = slots, device
        self.top_logprobs = min(TOP_LOGPROBS, vocab_size)
        shapes = {"tokens": ((slots,), torch.int64), "seed": ((slots,), torch.int64),
                  "offset": ((slots,), torch.int64), "counts": ((slots, vocab_size), torch.int32),
                  "prompt_mask": ((slots, vocab_size), torch.bool),
                  "logprob_out": ((slots, 1 + 2 * self.top_logprobs), torch.float32)}
        shapes.update({c.name: ((slots,), c.dtype) for c in CONTROLS})
        self.tensors = {name: torch.zeros(shape, dtype=dtype, device=device) for name, (shape, dtype) in shapes.items()}
        # Each per-slot tensor's value in a free slot.
        self.free_values = {"tokens": 0, "seed": 0, "offset": 0, "counts": 0, "prompt_mask": False,
                            "logprob_out": 0.0} | {c.name: c.free for c in CONTROLS}
        self.free(range(slots))

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self.__dict__["tensors"][name]
        except KeyError:
            raise AttributeError(f"SlotState has no tensor {name!r}") from None

    def sampling_args(self, rows: slice | torch.Tensor) -> list[torch.Tensor]:
        """The sampling controls of ``rows``, in ``sample_next_``'s order (copies when ``rows`` is a tensor)."""
        return [self.tensors[c.name][rows] for c in SAMPLING_CONTROLS]

    def penalty_args(self, rows: slice | torch.Tensor) -> list[torch.Tensor]:
        """The penalty controls of ``rows``, in ``apply_penalties``' order."""
        return [self.tensors[c.name][rows] for c in PENALTY_CONTROLS]

    def assign(self, slots: Sequence[int], params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]]) -> None:
        """Give ``slots`` their requests' controls, seeds and prompts (for the repetition penalty),
        with no token generated yet (offset 0, zero counts)."""
        index = torch.tensor(list(slots), dtype=torch.int64, device=self.device)
        for c in CONTROLS:
            values = torch.tensor([getattr(p, c.name) for p in params], dtype=c.dtype)
            self.tensors[c.name][index] = values.to(self.device)
        self.seed[index] = torch.tensor([p.seed for p in params], dtype=torch.int64).to(self.device)
        self.offset[index] = 0
        self.counts[index] = 0
        mask = torch.zeros(len(prompts), self.prompt_mask.shape[1], dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            mask[i, list(prompt)] = True
        self.prompt_mask[index] = mask.to(self.device)

    def free(self, slots) -> None:
        """Reset ``slots`` to free rows: every per-slot tensor to its free value."""
        slots = list(slots)
        if not slots:
            return
        index = torch.tensor(slots, dtype=torch.int64, device=self.device)
        for name, value in self.free_values.items():
            self.tensors[name][index] = value
