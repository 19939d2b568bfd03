"""What this processor does fast: its instruction-set flags, and the CPU default dtype chosen by timing.

No one dtype is fastest on every CPU: on the 2-core AMD EPYC (AVX-512 with BF16, no FP16) gpt2
decoded at 48.7 tok/s in fp16, 30.2 in bf16 and 24.1 in fp32 at batch 1, but bf16 led at batch 8
(183 against 77 in fp32 and 72 in fp16); on a 2-core Xeon fp32 led at batch 1 (40.1 against 37.3
and 37.7). So the default is measured on the machine itself: the first CPU load with no dtype times
gpt2's products (one layer's MLP, weighted by its 12 layers, and the lm_head) through the eager
backend in each dtype at 1 and 8 rows, and picks the dtype
that is fastest overall among those never slower than fp32 (fp32 itself when none is). The choice
is cached per processor, PyTorch version and thread count, so later loads only read it.

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
PROBE_REPEATS = 5      # medians of 5 after a warm-up: ~0.5 s in all on the 2-core EPYC
CACHE_VERSION = 4  # 3: int8 among the choices; 4: its GEMV on every thread (the extension built with OpenMP)


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
                total += times * statistics.median(samples)
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


def default_cpu_choice(linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[str, bool]:
    """(this machine's CPU default: a ``DTYPE_NAMES`` name or ``INT8``, whether it was measured now
    rather than read from the cache); a measurement times ``linear`` (``probe_dtypes``)."""
    path, key = _cache_file(), _cache_key()
    choices = set(DTYPE_NAMES) | ({INT8} if cpu_decode.available() else set())
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and cached.get("dtype") in choices:
            return cached["dtype"], False
    except (OSError, ValueError, AttributeError):
        pass
    times = probe_dtypes(linear, int8=INT8 in choices)
    choice = choose_dtype(times)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "dtype": choice, "seconds": times}, indent=1))
    except OSError:
        pass  # an unwritable cache only costs the probe again next time
    return choice, True
