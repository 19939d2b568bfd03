"""How many threads a CPU decode step uses: the cores other processes leave free.

A decode step is ~150 small ops op by op, each ending in an OpenMP barrier (or 60-120 parallel
loops of the fused int8 step's worker team, each ending in a wait for its workers). When another
process keeps a core busy, the OS deschedules one of our threads for whole time slices and every
barrier waits for it. Measured on the 2-core EPYC, gpt2 fp32 at batch 1 with one core kept busy:
51 ms a token at 2 threads, 25 at 1 (31 quiet either way: the step is bound by memory bandwidth,
which one core nearly saturates here); at batch 8, 201 ms against 72. So each CPU step runs
under ``step_threads``, which reads how busy the processor is (``/proc/stat``, less this
process's own time) at most once a second and runs the step on the cores left free, never on
more threads than PyTorch has. ``pin_threads`` (the CLI's ``--threads``), or ``OMP_NUM_THREADS``
in the environment, fixes the count instead.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable

import torch

from ..model.cpu import SHORTEST_READING_SECONDS, LoadMeter, free_cores, read_proc_stat, usable_cores

SAMPLE_SECONDS = 1.0  # how often the load is re-read: /proc/stat costs ~20 µs, a step ~5 ms on gpt2 int8


class ThreadChooser:
    """PyTorch's thread count for CPU steps, from how many of ``cores`` other processes keep busy.

    ``read_stat`` gives the processor's (busy, idle) seconds, ``own_seconds`` this process's CPU
    seconds, ``clock`` the wall time: the three clocks a test replaces.
    """

    def __init__(self, cores: int | None = None, max_threads: int | None = None,
                 read_stat: Callable[[], tuple[float, float] | None] = read_proc_stat,
                 own_seconds: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.monotonic,
                 pinned: bool | None = None):
        self.cores = usable_cores() if cores is None else cores
        self.max_threads = max_threads or torch.get_num_threads()
        self.meter = LoadMeter(read_stat, own_seconds, clock)
        self.pinned = "OMP_NUM_THREADS" in os.environ if pinned is None else pinned
        self.choice = self.max_threads
        self._measured = False  # whether choice comes from a reading yet
        self._last_free = self.max_threads  # the free cores the last reading found

    def pin(self, threads: int) -> None:
        """Use ``threads`` from now on, whatever the load (the user's choice)."""
        self.pinned, self.choice = True, threads
        self.max_threads = threads
        torch.set_num_threads(threads)

    def threads(self) -> int:
        """The thread count for the next step: the cores others leave free (rounded, at least 1, at
        most ``max_threads``), re-read at most every ``SAMPLE_SECONDS``."""
        if self.pinned:
            return self.choice
        window = SAMPLE_SECONDS if self._measured else SHORTEST_READING_SECONDS  # the first: from creation
        last = self.meter.last_reading
        if last is not None and self.meter.clock() - last < window:
            return self.choice
        busy = self.meter.others_busy()
        if busy is not None:
            free = free_cores(self.cores, busy, self.max_threads)
            # Fewer threads only when two readings in a row say so: a load that came and went
            # within the last second (a benchmark's peer process, a compile) is not worth a slower step.
            self.choice = free if not self._measured else max(free, self._last_free)
            self._last_free, self._measured = free, True
        return self.choice


_CHOOSER: ThreadChooser | None = None


def chooser() -> ThreadChooser:
    """This process's one chooser (threads are a process-wide setting), made on first use."""
    global _CHOOSER
    if _CHOOSER is None:
        _CHOOSER = ThreadChooser()
    return _CHOOSER


def pin_threads(threads: int) -> None:
    """Fix PyTorch's thread count for this process's CPU steps (``--threads``)."""
    chooser().pin(threads)


def start_sampling() -> None:
    """Take the first reading now (a runner on CPU is being made), so that the first step already
    knows the load."""
    chooser().threads()


@contextlib.contextmanager
def step_threads():
    """Run a CPU step at ``chooser().threads()`` threads, then give PyTorch its count back (so that
    the rest of the process, and what it caches per thread count, never sees the step's choice)."""
    before, n = torch.get_num_threads(), chooser().threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)  # ~0.1 µs a pair here
    try:
        yield
    finally:
        torch.set_num_threads(before)
