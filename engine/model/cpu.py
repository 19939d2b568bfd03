"""What this processor does fast: its instruction-set flags, and the CPU default dtype chosen by timing.

No one dtype is fastest on every CPU: on the 2-core AMD EPYC (AVX-512 with BF16, no FP16) gpt2
decoded at 48.7 tok/s in fp16, 30.2 in bf16 and 24.1 in fp32 at batch 1, but bf16 led at batch 8
(183 against 77 in fp32 and 72 in fp16); on a 2-core Xeon fp32 led at batch 1 (40.1 against 37.3
and 37.7). So the default is measured on the machine itself: the first CPU load with no dtype times
gpt2's products (one layer's MLP, weighted by its 12 layers, and the lm_head) through the eager
backend in each dtype at 1 and 8 rows, and picks the dtype
that is fastest overall among those never slower than fp32 (fp32 itself when none is), on the
cores other processes leave free. The choice is cached per processor, PyTorch version and thread
count when it was measured on a quiet machine, so later loads only read it.

int8 competes too where the int8 CPU step is compiled (``gpt2kernels.cpu_decode``): its GEMV on
the same shapes and rows. Chosen, a load with no dtype quantises every linear and the lm_head
(``int8-all``: greedy tokens equal to fp32 on >= 95 % of 128 steps, perplexity within 2 %) and
decodes in one C++ call a step; on the 2-core EPYC gpt2 then decoded at 349 tok/s at batch 1
against 76 in bf16, its float choice. An explicit dtype keeps float weights.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from gpt2kernels import cpu_decode, quantize_int8

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INT8 = "int8"  # the int8-all model with its fused CPU step: a choice beside DTYPE_NAMES
# (out, in, times per token) of gpt2's products: an MLP (c_fc, c_proj: 2/3 of a layer's weights) in
# each of 12 layers, and the lm_head, 30% of the weights alone and unlike the rest: its fp16 GEMV
# was 1.8x faster than bf16 here while the MLP's was 1.1x slower.
PROBE_SHAPES = ((3072, 768, 12), (768, 3072, 12), (50257, 768, 1))
PROBE_ROWS = (1, 8)    # batch 1 (interactive) and 8 (a small batch): the two regimes the choice must serve
PROBE_REPEATS = 5      # the fastest of 5 after a warm-up (a run another process preempted only
                       # lengthens itself): ~0.5 s in all on the 2-core EPYC
SHORTEST_READING_SECONDS = 0.1  # a load reading's shortest window: 10 ticks of /proc/stat's 100 Hz
QUIET_CORES = 0.5  # others' load (cores) above which a probe's choice serves this process but is not cached
CACHE_VERSION = 4  # 3: int8 among the choices; 4: its GEMV on every thread (the first build ran on one)


@functools.cache
def _cpuinfo_lines() -> tuple[str, ...]:
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def _cpuinfo(*keys: str) -> str | None:
    """The value of the first ``/proc/cpuinfo`` line starting with one of ``keys``; None where there is none."""
    return next((line.split(":", 1)[1] for line in _cpuinfo_lines() if line.startswith(keys) and ":" in line), None)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The processor's feature flags (``/proc/cpuinfo``); empty where that file does not exist."""
    return frozenset((_cpuinfo("flags", "Features") or "").split())


def has_vnni() -> bool:
    """Whether the processor multiplies uint8 by int8 into int32 in one instruction (AVX-512 / AVX VNNI)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_name() -> str:
    name = (_cpuinfo("model name") or "").strip()
    return name or platform.processor() or platform.machine() or "unknown cpu"


def read_proc_stat() -> tuple[float, float] | None:
    """(busy, idle) seconds of every CPU together since boot, from ``/proc/stat``; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]] + [0] * (8 - len(fields[1:9]))
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (user + nice + system + irq + softirq + steal) / hz, (idle + iowait) / hz


class LoadMeter:
    """How busy other processes keep the processor: ``/proc/stat``'s busy time less this process's own.

    ``read_stat`` gives the processor's (busy, idle) seconds, ``own_seconds`` this process's CPU
    seconds, ``clock`` the wall time: the three clocks a test replaces.
    """

    def __init__(self, read_stat: Callable[[], tuple[float, float] | None] = read_proc_stat,
                 own_seconds: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.monotonic):
        self.read_stat, self.own_seconds, self.clock = read_stat, own_seconds, clock
        self._last = None  # (wall, busy, own) at the last reading

    @property
    def last_reading(self) -> float | None:
        """The wall time of the last reading, None before the first."""
        return self._last[0] if self._last else None

    def others_busy(self) -> float | None:
        """Cores' worth of CPU time other processes used since the last call (None at the first, or
        without ``/proc/stat``)."""
        stat = self.read_stat()
        if stat is None:
            return None
        now, own = self.clock(), self.own_seconds()
        last, self._last = self._last, (now, stat[0], own)
        if last is None or now <= last[0]:
            return None
        return max(0.0, (stat[0] - last[1]) - (own - last[2])) / (now - last[0])


def free_cores(cores: int, others_busy: float, max_threads: int) -> int:
    """Threads for the cores other processes leave free: rounded, at least 1, at most ``max_threads``."""
    return max(1, min(max_threads, round(cores - others_busy)))


def usable_cores() -> int:
    """The cores this process may run on (its affinity), or every core where that is unknown."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "gpt2engine" / "cpu_dtype.json"


def _cache_key() -> str:
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))
    threads = torch.get_num_threads()
    return f"v{CACHE_VERSION}|{cpu_name()}|{' '.join(flags)}|torch {torch.__version__}|threads {threads}"


def probe_dtypes(linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 int8: bool | None = None) -> dict[str, tuple[float, ...]]:
    """Seconds of gpt2's products for one token (``PROBE_SHAPES``, each a median, weighted by how
    often a token runs it) through ``linear(x, weight)`` (the eager backend's, passed in: this module
    sits below the backends), per dtype name, at each of ``PROBE_ROWS`` rows; with ``int8`` (default:
    where the int8 CPU step is compiled) also ``INT8``'s, through its GEMV."""
    if int8 is None:
        int8 = cpu_decode.available()
    gen = torch.Generator().manual_seed(0)
    weights = [(0.02 * torch.randn(n, k, generator=gen), times) for n, k, times in PROBE_SHAPES]
    # name -> [(product of x, x's dtype, times per token)]
    products = {name: [(functools.partial(linear, weight=w.to(dtype)), dtype, times) for w, times in weights]
                for name, dtype in DTYPE_NAMES.items()}
    if int8:
        products[INT8] = [(_int8_product(w), torch.float32, times) for w, times in weights]
    result = {}
    for name, funcs in products.items():
        per_rows = []
        for rows in PROBE_ROWS:
            total = 0.0
            for (f, dtype, times), (_, k, _) in zip(funcs, PROBE_SHAPES):
                x = torch.randn(rows, k, generator=gen).to(dtype)
                f(x)  # warm-up
                samples = []
                for _ in range(PROBE_REPEATS):
                    start = time.perf_counter()
                    f(x)
                    samples.append(time.perf_counter() - start)
                total += times * min(samples)
            per_rows.append(total)
        result[name] = tuple(per_rows)
    return result


def _int8_product(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    q, scale = quantize_int8(w)
    packed, colsum = cpu_decode.pack_int8(q)
    return lambda x: cpu_decode.int8_linear(x, packed, colsum, scale, None, w.shape[1])


def choose_dtype(times: dict[str, tuple[float, ...]]) -> str:
    """The choice never slower than float32 at any row count and fastest by the geometric mean
    of its time ratios to float32; float32 when no other qualifies."""
    base = times["float32"]

    def ratios(name):
        return [t / b for t, b in zip(times[name], base)]

    qualified = [n for n in times if all(r <= 1.0 for r in ratios(n))]
    return min(qualified, key=lambda n: statistics.geometric_mean(ratios(n)), default="float32")


def default_cpu_choice(linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       meter: LoadMeter | None = None) -> tuple[str, bool]:
    """(this machine's CPU default: a ``DTYPE_NAMES`` name or ``INT8``, whether it was measured now
    rather than read from the cache); a measurement times ``linear`` (``probe_dtypes``).

    It runs on the cores other processes leave free, as the steps will (``engine.core.cpu_threads``),
    and is cached only when they left every core free (``meter``: others' load, ``LoadMeter``). A
    probe on a busy machine once timed the int8 GEMV at 2 threads 75x slower than it runs (each
    parallel loop waited for its descheduled thread), picked bf16, and cached it for good.
    """
    path, key = _cache_file(), _cache_key()
    choices = set(DTYPE_NAMES) | ({INT8} if cpu_decode.available() else set())
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and cached.get("dtype") in choices:
            return cached["dtype"], False
    except (OSError, ValueError, AttributeError):
        pass
    meter = meter or LoadMeter()
    meter.others_busy()
    time.sleep(SHORTEST_READING_SECONDS)
    before = meter.others_busy()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads if before is None else free_cores(usable_cores(), before, threads))
    try:
        times = probe_dtypes(linear, int8=INT8 in choices)
    finally:
        torch.set_num_threads(threads)
    during = meter.others_busy()
    choice = choose_dtype(times)
    if all(load is None or load < QUIET_CORES for load in (before, during)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"key": key, "dtype": choice, "seconds": times}, indent=1))
        except OSError:
            pass  # an unwritable cache only costs the probe again next time
    return choice, True
