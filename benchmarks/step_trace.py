"""What one decode step dispatches: every op with its shapes, host syncs, and the kernels it launches.

    python -m benchmarks.step_trace --model gpt2 --backend triton   # kernels per decode step, per layer, outside

The CPU-measurable proxy for the GPU's decode speed: on a GPU a step costs about one launch gap per
kernel even inside a CUDA graph, and a host sync inside the step makes a graph impossible. Runs on
random weights; without a GPU the Triton kernels run under the interpreter (counts are the same).
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only make views or allocate: no kernel on a GPU.
NO_KERNEL = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::slice", "aten::select", "aten::expand",
    "aten::permute", "aten::transpose", "aten::t", "aten::unsqueeze", "aten::squeeze", "aten::as_strided",
    "aten::alias", "aten::detach", "aten::unbind", "aten::split", "aten::empty", "aten::empty_like",
    "aten::new_empty", "aten::empty_strided", "aten::lift_fresh", "aten::_reshape_alias", "aten::promote_types",
}
# Ops that wait for the device (a value read on the host): never inside a decode step.
HOST_SYNC = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select",
             "aten::_assert_async", "aten::equal"}


def _shapes(value):
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), tuple(value.stride()), str(value.dtype))
    if isinstance(value, (list, tuple)):
        return tuple(_shapes(v) for v in value)
    return value if isinstance(value, (int, float, bool, str, type(None))) else type(value).__name__


def _compiled(func) -> bool:
    """An op of the compiled csrc library (the sampler): one CUDA kernel launch per call."""
    return func.namespace.endswith("_C")


class OpTrace(TorchDispatchMode):
    """Records ``(op, argument shapes, depth)`` for every op dispatched inside it; ``depth`` 1 marks
    the ops run inside a custom op (our kernels' launchers), which it enters too. Compiled (csrc)
    ops are recorded but not entered: each launches exactly one kernel (csrc/sampling_cuda.cu)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple, int]] = []
        self._depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((func.name(), _shapes((args, sorted(kwargs.items()))), self._depth))
        if func.namespace in ("aten", "prims") or _compiled(func):
            return func(*args, **kwargs)
        self._depth += 1
        try:  # run the custom op's own implementation with this mode still on, to see inside it
            keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA if _on_cuda(args) else torch._C.DispatchKey.CPU)
            with self:
                return func.redispatch(keys, *args, **kwargs)
        finally:
            self._depth -= 1

    def host_syncs(self) -> list[str]:
        return [name for name, _, _ in self.ops if name.split(".")[0] in HOST_SYNC]

    def kernels(self) -> list[str]:
        """The ops that launch a kernel outside Triton: aten ops other than views and allocations,
        inside our launchers too, and each compiled (csrc) op once. Triton launches are counted by
        ``gpt2kernels.aot.record_launches``."""
        return [name for name, _, _ in self.ops
                if (name.split("::")[0] in ("aten", "prims") and name.split(".")[0] not in NO_KERNEL)
                or name.split("::")[0].endswith("_C")]

    def custom_ops(self) -> list[str]:
        return [name for name, _, depth in self.ops if depth == 0 and name.split("::")[0] not in ("aten", "prims")]


def _on_cuda(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)


@contextlib.contextmanager
def _launches_untraced():
    """Triton launches run with the dispatch mode off: the interpreter moves tensors through aten
    ops of its own (set_, copy_) that no GPU launch has."""
    from torch.utils._python_dispatch import _disable_current_modes
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def untraced(run):
        def wrapper(self, *args, **kwargs):
            with _disable_current_modes():
                return run(self, *args, **kwargs)
        return wrapper

    for cls, run in originals.items():
        cls.run = untraced(run)
    try:
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run


def trace_step(step, execute: bool = True) -> tuple[OpTrace, list]:
    """Run ``step()`` once under an ``OpTrace`` and ``record_launches``: (the trace, Triton launches).
    execute=False records the Triton launches without running them (their outputs are garbage)."""
    from gpt2kernels.aot import record_launches

    with record_launches(execute=execute) as launches, _launches_untraced(), OpTrace() as trace:
        step()
    return trace, launches.launches


def step_kernels(step, execute: bool = True) -> int:
    """Kernels ``step()`` launches: Triton launches plus the trace's other kernels."""
    trace, launches = trace_step(step, execute)
    return len(trace.kernels()) + len(launches)


@contextlib.contextmanager
def _first_layers(model, n: int):
    """The model with only its first ``n`` blocks (the cache keeps all of its layers)."""
    blocks = model.h
    model.h = torch.nn.ModuleList(list(blocks)[:n])
    try:
        yield
    finally:
        model.h = blocks


def kernel_budget(model, batch: int, penalized: bool = False, greedy: bool = False) -> dict:
    """Kernels in one decode step of ``batch`` rows of ``model`` after a 5-token prompt: the total,
    those each layer adds (the step with 2 layers minus the step with 1) and those outside the layers.
    ``penalized``: the step of a batch with repetition/presence/frequency penalties; ``greedy``: of
    a greedy batch (temperature 0), otherwise sampled.

    Without a GPU the Triton launches are recorded, not interpreted (minutes at gpt2's width): no
    launch and no op of the step depends on a kernel's output values (the step has no host sync).
    """
    from engine.core.request import Request, SamplingParams
    from engine.core.runner import admit_batch, runner_for

    runner = runner_for(model)
    sampling = [SamplingParams(temperature=0.0 if greedy else 0.7, top_k=40, seed=r,
                               repetition_penalty=1.2 if penalized else 1.0) for r in range(batch)]
    requests = [Request([1, 2, 3, 4, 5], 8, s) for s in sampling]
    from gpt2kernels.aot import record_launches

    execute = model.device.type == "cuda"
    with record_launches(execute=execute):  # the prefill too: only the step's launches are counted
        plan = admit_batch(runner, requests)

    def step():
        runner._decode_step(plan.rows, plan.penalized, plan.logprobs, plan.greedy)

    total = step_kernels(step, execute)
    with _first_layers(model, 1):
        one = step_kernels(step, execute)
    with _first_layers(model, 2):
        two = step_kernels(step, execute)
    per_layer = two - one
    return {"kernels": total, "per_layer": per_layer, "outside_layers": one - per_layer,
            "layers": model.config.n_layer}


def count(model_name: str, backend: str, batch: int, dtype: str) -> dict:
    """The kernel budget of a random-weight ``model_name``'s sampled decode step (and the total of its
    greedy step, ``greedy_kernels``), and the host syncs of its decode step."""
    import engine

    model = engine.load_model(f"random:{model_name}", dtype=dtype, backend=backend)
    budget = kernel_budget(model, batch)
    greedy = kernel_budget(model, batch, greedy=True)["kernels"]
    trace, _ = trace_step(lambda: engine.core.runner.runner_for(model)._decode_step(batch), model.device.type == "cuda")
    return {"model": model_name, "backend": backend, "batch": batch, **budget, "greedy_kernels": greedy,
            "host_syncs": trace.host_syncs()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["gpt2"])
    p.add_argument("--backend", nargs="+", default=["eager", "triton"])
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    for name in args.model:
        for backend in args.backend:
            for batch in args.batch:
                print(count(name, backend, batch, args.dtype), flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    main()
