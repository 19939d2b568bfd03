"""The benchmarks' timers: CUDA via triton's do_bench or CUDA-graph replay, CPU via perf_counter."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


# Set by kernel_cli.parse when the kernels run in the Triton interpreter: its timings mean nothing,
# so each function runs once, which is all a smoke run must show.
RUN_ONCE = False


def bench(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, reps: int = 10) -> dict:
    """Median and 20/80 % quantiles of ``fn``'s run time in ms.

    On CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). On CPU:
    ``time.perf_counter`` over ``reps`` runs after ``warmup`` unmeasured ones.
    """
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        fn()  # any JIT compile (Triton, torch.compile) happens here, outside do_bench's estimate
        torch.cuda.synchronize(device)
        median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"ms": median, "ms_p20": p20, "ms_p80": p80}
    if RUN_ONCE:
        warmup, reps = 0, 1
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {"ms": statistics.median(times), "ms_p20": q[1], "ms_p80": q[7]}


def graph_bench(fn: Callable[[], object], device: torch.device | str, replays: int = 20, **cpu_reps) -> dict:
    """Median and 20/80 % quantiles, in ms, of one call of ``fn`` replayed from a CUDA graph: device
    time alone, without Python or launch overhead, which at decode sizes is most of what ``bench``
    sees (an H200 run timed a 5-kernel decode layer at ~500 µs through Python; its graphed step says
    ~60). ``fn`` must be capturable (no host syncs or allocations that escape the graph's pool); it
    should rotate over enough data to exceed the L2, as a real decode step does. On CPU: ``bench``
    with ``cpu_reps`` (its warmup and reps).
    """
    if torch.device(device).type != "cuda":
        return bench(fn, device, **cpu_reps)
    fn()  # compiles and lazily allocated buffers (the kernels' arrival counters) stay out of the graph
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=10)
    return {"ms": statistics.median(times), "ms_p20": q[1], "ms_p80": q[7]}


def wall(fn: Callable[[], object], device: torch.device | str) -> tuple[object, float]:
    """(result, seconds) of one call, synchronising CUDA around it."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start
