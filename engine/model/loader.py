"""``load_model``: a checkpoint source, a device, a dtype and a backend -> a ready GPT2."""

from __future__ import annotations

import os
import time
import warnings

import torch

import gpt2kernels

from ..errors import EngineError
from ..tokenizer import VOCAB_SIZE
from .backends import eager_linear, get_backend
from .cpu import DTYPE_NAMES, INT8, default_cpu_choice
from .gpt2 import GPT2
from .quantize import check_quantize, quantize_model
from .weights import LM_HEAD, load_state_dict

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
GPU_DEFAULT_DTYPE = torch.float16
# On CPU the default is measured per machine (engine.model.cpu); int8 weights on CPU compute in fp32,
# the quantised engine's only input dtype: any other would only add casts around every linear.
CPU_INT8_DTYPE = torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, quantize: str | None = None, backend: str = "eager"
                  ) -> tuple[torch.dtype, str | None, str]:
    """(the dtype a load with no dtype uses, its quantisation: ``quantize`` or the CPU's measured
    choice, why: for the CLI's report)."""
    if device.type == "cuda":
        return GPU_DEFAULT_DTYPE, quantize, "the GPU default"
    if quantize is not None and backend == "eager":
        return CPU_INT8_DTYPE, quantize, "int8 on CPU computes in float32"
    choice, measured = default_cpu_choice(eager_linear)
    why = "measured fastest on this CPU" if measured else "this CPU's measured fastest, cached"
    if choice == INT8 and backend == "eager" and quantize is None:
        return CPU_INT8_DTYPE, "int8-all", f"int8-all {why}"
    return DTYPE_NAMES.get(choice, torch.float32), quantize, why


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise EngineError(f"unknown dtype {dtype!r}; choose one of float32, float16, bfloat16")
        return DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise EngineError(f"unsupported dtype {dtype}; choose torch.float32, torch.float16 or torch.bfloat16")
    return dtype


def load_model(source: str | os.PathLike = "gpt2", device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, backend: str | None = None, seed: int = 0,
               quantize: str | None = None) -> GPT2:
    """Load GPT-2 weights and build the model, ready for inference.

    source: a local HF directory, a hub name (``gpt2``, ``openai-community/gpt2-xl``) or
    ``random:<size>`` (seeded random weights, no network). device: default cuda when available.
    dtype: float32/float16/bfloat16; default float16 on GPU, on CPU the dtype measured fastest on
    this machine (``engine.model.cpu``; float32 with ``quantize``), which may be ``int8-all`` with
    float32 activations where the int8 CPU step is fastest (``model.quantize`` says so).
    backend: ``eager`` or ``triton``, default triton on CUDA and eager elsewhere. quantize: None,
    ``"int8"`` (the four linears of every block) or ``"int8-all"`` (and the lm_head): weight-only
    int8 with per-output-channel scales computed here (``engine.model.quantize``). The model records its load time in
    ``model.load_seconds``, its backend's name in ``model.backend``, its quantisation in
    ``model.quantize`` and why it has its dtype in ``model.dtype_reason``.
    """
    start = time.perf_counter()
    try:
        device = torch.device(device) if device is not None else default_device()
    except RuntimeError as e:
        raise EngineError(f"invalid device {device!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise EngineError(f"device {device} is not supported: use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("device cuda was requested but this PyTorch sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise EngineError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    quantize = check_quantize(quantize)
    backend = backend or ("triton" if device.type == "cuda" else "eager")
    ops = get_backend(backend)
    dtype, quantize, dtype_reason = (parse_dtype(dtype), quantize, "requested") if dtype is not None \
        else default_dtype(device, quantize, backend)
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise EngineError("the triton backend needs a CUDA device (or TRITON_INTERPRET=1 for testing on CPU)")
    config, state = load_state_dict(source, seed=seed, random_dtype=dtype)
    if config.vocab_size > VOCAB_SIZE:
        warnings.warn(f"the model's vocabulary has {config.vocab_size} ids, GPT-2's tokenizer {VOCAB_SIZE}: "
                      f"sampled ids >= {VOCAB_SIZE} have no text and decode to nothing", stacklevel=2)
    with torch.device("meta"):
        model = GPT2(config, ops)
    input_major = device.type == "cpu" and dtype == torch.float32
    lm_head = state.pop(LM_HEAD, None)  # present only when untied
    # popped one by one, so that each source tensor is freed once placed: peak ~ one copy of the weights
    state = {name: _place(state.pop(name), device, dtype, input_major) for name in list(state)}
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False).eval()
    # A tied head gets its input-major fp32 copy only if it stays a float: int8-all quantises wte itself.
    if lm_head is not None or (input_major and quantize != "int8-all"):
        head = model.wte.weight if lm_head is None else lm_head
        model.lm_head_weight = _place(head.t(), device, dtype, input_major=False).t() if input_major \
            else _place(head, device, dtype, input_major=False)
    model.backend = backend
    model.quantize = None
    if quantize is not None:
        quantize_model(model, quantize)
    model.dtype_reason = dtype_reason
    gpt2kernels.sampling.load_extension()  # a first run compiles it: count that as loading, not as prefill
    model.load_seconds = time.perf_counter() - start
    return model


def _place(t: torch.Tensor, device: torch.device, dtype: torch.dtype, input_major: bool) -> torch.Tensor:
    """Move and cast a weight once, choosing its memory layout.

    Matmul weights arrive as (out, in) views. On CPU in fp32, MKL's GEMV streams ``x @ W[in, out]``
    at ~19 GB/s but ``x @ W[out, in].T`` at ~11 (measured on the 2-core CI machine), so there they
    stay input-major views; everywhere else (fp16/bf16 on CPU, all GPU kernels) (out, in) is
    contiguous. The tied lm_head gets its own input-major copy, since the embedding lookup needs
    ``wte`` row-major.
    """
    t = t.to(device=device, dtype=dtype)
    if input_major and t.dim() == 2 and t.t().is_contiguous():
        return t
    return t.contiguous()
