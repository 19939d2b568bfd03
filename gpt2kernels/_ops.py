"""What every kernel module shares: the op namespace and input checks."""

from __future__ import annotations

import functools

import torch
import triton

NS = "gpt2engine"  # torch.ops.gpt2engine.<op>; the C++ sampler registers under NS + "_C"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t: torch.Tensor, *, dtypes=FLOAT_DTYPES, ndim: int | None = None,
                 shape: tuple[int, ...] | None = None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, last_dim_contiguous: bool = True) -> None:
    """Raise ValueError naming ``name`` when ``t`` is not what a kernel needs."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}, supported: {', '.join(map(str, dtypes))}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {list(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all inputs on one device)")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def row_settings(n: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for a kernel that holds one row of ``n`` elements in registers.

    About 8 elements per thread: 4 warps for GPT-2's 768, 8 for 1600, up to 32 warps (1024 threads,
    the most a block may have) for the widest rows.
    """
    block = triton.next_power_of_2(n)
    return block, min(32, max(1, block // 256))


def dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot``'s input_precision: IEEE for fp32 operands (fp32 is the correctness path, not TF32);
    None (the default) for fp16/bf16, where the setting does not apply."""
    return "ieee" if dtype == torch.float32 else None


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 132 (an H100 SXM) for the CPU interpreter, so that
    the launch heuristics, split-K and split-KV included, take their GPU branches in CPU tests."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


_COUNTERS: dict[torch.device, torch.Tensor] = {}
# Counters allocated at once: more output tiles than any split launch has (split-K and split-KV
# only run while their programs are a few per SM, ~300 on today's largest GPUs; gpt2-xl decode
# attention at batch 64 has 1600 rows). Larger requests grow the buffer.
COUNTERS = 4096


def prepare_device(device: torch.device) -> None:
    """Allocate what the kernels keep per device (the arrival counters) now, so that a decode loop
    or a CUDA graph capture after it never allocates or fills memory."""
    arrival_counters(device, COUNTERS)


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 (n,) zeros on ``device``, for kernels whose programs count their arrivals per output
    tile (the last one to arrive reduces the others' partials) and reset them to zero before exiting.

    One buffer per device, shared by every such launch: launches on one stream never overlap, and
    each leaves the counters at zero. Kernels running concurrently on two streams of one device
    must not both use it. Allocated (a fill kernel) the first time a size is needed: a CUDA graph
    warm-up allocates it before the capture, which then only refers to it.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[device] = torch.zeros(max(n, COUNTERS), dtype=torch.int32, device=device)
    return buf[:n]
