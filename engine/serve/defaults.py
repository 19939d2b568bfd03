"""The server's defaults, shared by ``python -m engine.serve`` and its Ray Serve replicas."""

from __future__ import annotations

MAX_WAITING = 256  # requests queued beyond the batch before the server answers 503


def server_dtype(device: str | None, quantize: str | None = None) -> str | None:
    """The server's default dtype; None: the loader's default. On CPU that default where it is
    ``int8-all`` (the fused int8 step measured fastest here, ``engine.model.cpu``), else the float
    dtype whose batched GEMMs are fast there: bfloat16 where the processor has native bf16
    (AVX512-BF16, AMX), else float32 (CPU fp16 GEMMs beyond 16 rows run upcast to fp32 anyway). At
    16 rows of gpt2 on a 2-core EPYC with AVX512-BF16: 50 ms a step in bf16, 97 in fp32, 132 in fp16.
    Elsewhere, or with ``quantize`` (int8 on CPU computes in float32), None."""
    import torch

    from ..model.cpu import cpu_flags
    from ..model.loader import default_device, default_dtype

    if quantize or (device or default_device().type).split(":")[0] != "cpu":
        return None
    if default_dtype(torch.device("cpu"))[1] == "int8-all":
        return None
    return "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"


def server_max_batch(device_type: str) -> int:
    """Requests decoded together by default: 64 on CUDA (the largest graph bucket), 16 on CPU."""
    return 64 if device_type == "cuda" else 16
