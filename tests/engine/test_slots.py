"""Per-slot state: one table of controls, and a free that resets everything an assign set."""

import dataclasses
import inspect

import torch

import gpt2kernels
from engine.core.request import SamplingParams
from engine.core.slots import SlotState


def _busy(state: SlotState, slots):
    """Give ``slots`` values unlike any free one, as requests and decode steps leave them."""
    params = [SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, seed=99, repetition_penalty=1.3,
                             presence_penalty=0.5, frequency_penalty=-0.5) for _ in slots]
    state.assign(slots, params, [[1, 2, 3]] * len(slots))
    index = torch.tensor(slots)
    state.tokens[index], state.offset[index] = 17, 4
    state.counts[index, 5] = 3
    state.logprob_out[index] = -1.5


def test_free_resets_every_tensor_assign_and_a_step_touch():
    fresh, state = SlotState(6, 50, torch.device("cpu")), SlotState(6, 50, torch.device("cpu"))
    _busy(state, [1, 2, 4])
    assert all(not torch.equal(state.tensors[name][1], fresh.tensors[name][1]) for name in state.tensors)
    state.free([1, 4])
    for name, tensor in state.tensors.items():
        assert torch.equal(tensor[[0, 1, 3, 4, 5]], fresh.tensors[name][[0, 1, 3, 4, 5]]), name
        assert not torch.equal(tensor[2], fresh.tensors[name][2]), name  # slot 2 still holds its request


def test_the_controls_are_listed_once():
    """Every control of the kernels' tables is a per-slot tensor in its dtype, a SamplingParams
    field, a CLI option and a server parameter; a free slot holds its free value."""
    from engine.generate import build_parser

    controls = gpt2kernels.CONTROLS
    state = SlotState(3, 10, torch.device("cpu"))
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    options = build_parser().parse_args([])
    for c in controls:
        assert state.tensors[c.name].dtype == c.dtype and bool((state.tensors[c.name] == c.free).all())
        assert c.name in fields and getattr(SamplingParams(), c.name) == c.off
        assert getattr(options, c.name) == c.off
    assert fields == {c.name for c in controls} | {"seed"}
    penalty_params = list(inspect.signature(gpt2kernels.apply_penalties).parameters)[4:]  # after the state
    assert [c.name for c in gpt2kernels.PENALTY_CONTROLS] == [p + "_penalty" for p in penalty_params]
