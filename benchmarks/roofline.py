"""The device's own ceilings, measured in the same run as the benchmark they judge."""

from __future__ import annotations

import torch

from .timing import bench


def copy_gbps(device: torch.device | str) -> float:
    """Achieved device-memory copy bandwidth (read + write bytes per second), in GB/s."""
    n = (1 << 28) if torch.device(device).type == "cuda" else (1 << 26)  # 1 GiB / 256 MiB fp32: beyond caches
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)["ms"]
    return 2 * src.numel() * src.element_size() / ms / 1e6


def matmul_tflops(device: torch.device | str, dtype: torch.dtype | None = None) -> float:
    """Achieved dense matmul throughput (torch.matmul, i.e. cuBLAS / MKL), in TFLOP/s."""
    cuda = torch.device(device).type == "cuda"
    dtype = dtype or (torch.float16 if cuda else torch.float32)
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench(lambda: a @ b, device)["ms"]
    return 2 * n**3 / ms / 1e9


def roofline(device: torch.device | str) -> dict:
    cuda = torch.device(device).type == "cuda"
    out = {"copy_gbps": copy_gbps(device), "matmul_tflops_fp32": matmul_tflops(device, torch.float32)}
    if cuda:
        out["matmul_tflops_fp16"] = matmul_tflops(device, torch.float16)
        out["matmul_tflops_bf16"] = matmul_tflops(device, torch.bfloat16)
    return out
