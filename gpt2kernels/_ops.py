"""What every kernel module shares: the op namespace, how a kernel becomes a public op, and input checks."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator

import torch
import triton
import triton.language as tl
from triton import knobs

NS = "gpt2engine"  # torch.ops.gpt2engine.<op>; the C++ sampler registers under NS + "_C"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The ops with a backward also take float64, so that torch.autograd.gradcheck runs (in the interpreter).
TRAIN_DTYPES = FLOAT_DTYPES + (torch.float64,)
# Whether the kernels defined after this import run in Triton's interpreter: ``triton.jit`` makes
# that choice when each kernel is defined (TRITON_INTERPRET=1 at import), so it is read once, here.
INTERPRETED = bool(knobs.runtime.interpret)


def check_device(op: str, t: torch.Tensor) -> None:
    """Raise ValueError saying what to do when ``t``'s device cannot run ``op``'s Triton kernels:
    CUDA tensors always can, CPU tensors only in the interpreter (tests); elsewhere Triton itself
    would fail with "0 active drivers"."""
    if not isinstance(t, torch.Tensor) or t.device.type == "cuda" or (INTERPRETED and t.device.type == "cpu"):
        return
    raise ValueError(
        f"gpt2kernels.{op} runs Triton GPU kernels, and its input is on {t.device}: pass CUDA tensors; "
        f"or for tests set TRITON_INTERPRET=1 before importing gpt2kernels (Triton's interpreter runs the "
        f"kernels on CPU tensors, slowly); or call gpt2kernels.{op}_ref, the eager PyTorch reference")


def kernel_op(name: str, mutates_args: tuple[str, ...] = (),
              inference_only: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator: register the function as the custom op ``NS::name`` (``torch.ops.gpt2engine.name``,
    which torch.compile and ``opcheck`` see) and return a plain function that calls it.

    The returned function keeps the decorated one's name, docstring and signature, so ``help()`` and
    ``inspect.signature`` show them rather than ``CustomOpDef``'s; its ``op`` attribute is the
    ``CustomOpDef`` (``op.register_fake``). The op first checks that its first argument's device can
    run the kernels (``check_device``), so a CPU tensor gets that error however the op is reached.

    ``inference_only``: the op has no backward, and this says what to train with instead. Called with
    an input that requires grad while grad mode is on, it raises at once, naming the op (a mutating op
    can carry no autograd formula, so this is where it can say so); a functional op reached through
    ``torch.ops`` raises the same when its backward runs.
    """
    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            check_device(name, args[0])
            return fn(*args, **kwargs)

        schema = torch.library.infer_schema(fn, mutates_args=mutates_args)  # fn's module resolves its annotations
        op = torch.library.custom_op(f"{NS}::{name}", checked, mutates_args=mutates_args, schema=schema)
        message = f"gpt2kernels.{name} is inference-only and has no backward: {inference_only}"
        if inference_only is not None and not mutates_args:
            def backward(ctx, *grads):
                raise RuntimeError(message)

            op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)

        @functools.wraps(fn)
        def public(*args, **kwargs):
            if inference_only is not None and torch.is_grad_enabled() and any(
                    isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values())):
                raise RuntimeError(message + " (or call it under torch.no_grad() for inference)")
            return op(*args, **kwargs)

        public.op = op
        return public
    return register


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


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where kernels accumulate sums and statistics: float64 for float64 inputs (gradcheck), float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    """``acc_dtype`` as the Triton type a kernel's ``ACC`` constexpr takes."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot``'s input_precision: IEEE for fp32 operands (fp32 is the correctness path, not TF32);
    None (the default) for fp16/bf16, where the setting does not apply."""
    return "ieee" if dtype == torch.float32 else None


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 132 (an H100 SXM) for the CPU interpreter, so that
    the launch heuristics, split-K and split-KV included, take their GPU branches in CPU tests."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


# Programmatic dependent launch (PDL) for the decode kernels, on by default where the GPU has it;
# GPT2KERNELS_PDL=0 in the environment, or ``programmatic_dependent_launch(False)``, turns it off.
_PDL = [os.environ.get("GPT2KERNELS_PDL", "1") != "0"]


def use_pdl(device: torch.device) -> bool:
    """Whether decode kernels on ``device`` launch with PDL (``launch_pdl=True``, ``USE_PDL``): a
    kernel may then start while the previous one finishes, issue the loads that depend on nothing
    earlier (its weights), and wait (``gdc_wait``) before reading anything the step wrote. Needs
    sm_90 (Hopper) or later; never in the interpreter."""
    return (_PDL[0] and not INTERPRETED and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (9, 0))


@contextlib.contextmanager
def programmatic_dependent_launch(enabled: bool) -> Iterator[None]:
    """Within the block, decode kernels use PDL where the GPU has it (``enabled``) or never: for
    measuring what it gains. A CUDA graph keeps the launches it captured."""
    before, _PDL[0] = _PDL[0], enabled
    try:
        yield
    finally:
        _PDL[0] = before


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
