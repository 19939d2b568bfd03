"""The server's defaults, shared by ``python -m engine.serve`` and its Ray Serve replicas."""

from __future__ import annotations

MAX_WAITING = 256  # requests queued beyond the batch before the server answers 503


def server_dtype(device: str | None, quantize: str | None = None) -> str | None:
    """The server's default dtype: on CPU the one whose batched GEMMs are fast there, bfloat16 where
    the processor has native bf16 (AVX512-BF16, AMX), else float32 (CPU fp16 GEMMs beyond 16 rows run
    upcast to fp32 anyway); elsewhere, or with ``quantize`` (int8 on CPU computes in float32), the
    loader's default (None). At 16 rows of gpt2 on a 2-core EPYC with AVX512-BF16: 50 ms a step in
    bf16, 97 in fp32, 132 in fp16."""
    from ..model.cpu import cpu_flags
    from ..model.loader import default_device

    if quantize or (device or default_device().type).split(":")[0] != "cpu":
        return None
    return "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"


def server_max_batch(device_type: str) -> int:
    """Requests decoded together by default: 64 on CUDA (the largest graph bucket), 16 on CPU."""
    return 64 if device_type == "cuda" else 16
