"""The batch-1 decode GEMV (gpt2kernels.gemv): every prologue and epilogue, against float64;
the launch rule's CPU proxies (programs per SM, tiles in registers); and, compiled ahead of time for
Hopper, the order programmatic dependent launch needs (weights loaded before the wait)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt2kernels
from gpt2kernels.gemv import GEMV_MAX_ROWS, TILE_ELEMENTS, gemv_applies, gemv_config
from gpt2kernels.linear import linear_ref

from .helpers import assert_close_to, poison_empty

ROOT = Path(__file__).resolve().parents[2]
# No tl.dot here, so bf16 runs in the interpreter too.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLS = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# (N, K): one output column; gpt2-xl's width; K beyond one tile in every dtype (4231: 2 tiles of 4096
# at 16 bits, 3 of 2048 at fp32), an odd N.
SHAPES = [(1, 96), (37, 1600), (45, 4231)]


def _inputs(m, n, k, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = 1.0 + torch.randn(m, k, generator=g)  # a mean away from zero, for the LayerNorm
    w = torch.randn(n, k, generator=g) / k**0.5
    b = 0.5 * torch.randn(n, generator=g)
    r = torch.randn(m, n, generator=g)
    ln_w, ln_b = 1 + 0.3 * torch.randn(k, generator=g), 0.3 * torch.randn(k, generator=g)
    return [t.to(device, dtype) for t in (x, w, b, r, ln_w, ln_b)]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_linear(n, k, dtype, device, monkeypatch):
    """Bias + GELU, bias + residual (the two c_proj), and neither (the lm_head)."""
    x, w, b, r, _, _ = _inputs(1, n, k, dtype, device, seed=n + k)
    assert gemv_applies(1, k, dtype, norm=False)
    x64, w64, b64, r64 = (t.double() for t in (x, w, b, r))
    poison_empty(monkeypatch)
    assert_close_to(gpt2kernels.linear(x, w, b, "gelu_tanh"), linear_ref(x64, w64, b64, "gelu_tanh"), TOLS[dtype])
    assert_close_to(gpt2kernels.linear(x, w, b, None, r), linear_ref(x64, w64, b64, None, r64), TOLS[dtype])
    assert_close_to(gpt2kernels.linear(x, w), linear_ref(x64, w64), TOLS[dtype])


@pytest.mark.parametrize("n,k", [(1, 96), (37, 1600), (45, 769)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_layer_norm_prologue(n, k, dtype, device, monkeypatch):
    """The LayerNorm is computed in the kernel from one wide load of the row, its output rounded to
    x's dtype as a separate LayerNorm's would be."""
    x, w, b, _, ln_w, ln_b = _inputs(1, n, k, dtype, device, seed=n + k)
    assert gemv_applies(1, k, dtype, norm=True)
    h = gpt2kernels.layer_norm_ref(x.double(), ln_w.double(), ln_b.double(), 1e-5).to(dtype).double()
    poison_empty(monkeypatch)
    assert_close_to(gpt2kernels.ln_linear(x, ln_w, ln_b, w, b, "gelu_tanh"),
                    linear_ref(h, w.double(), b.double(), "gelu_tanh"), TOLS[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_int8_weights(dtype, device, monkeypatch):
    x, w, b, r, ln_w, ln_b = _inputs(1, 200, 1600, dtype, device, seed=6)
    q, scale = gpt2kernels.quantize_int8(w.float())
    poison_empty(monkeypatch)
    assert_close_to(gpt2kernels.linear(x, q, b, None, r, weight_scale=scale),
                    linear_ref(x.double(), q, b.double(), None, r.double(), weight_scale=scale), TOLS[dtype])
    h = gpt2kernels.layer_norm_ref(x.double(), ln_w.double(), ln_b.double(), 1e-5).to(dtype).double()
    assert_close_to(gpt2kernels.ln_linear(x, ln_w, ln_b, q, b, "gelu_tanh", weight_scale=scale),
                    linear_ref(h, q, b.double(), "gelu_tanh", weight_scale=scale), TOLS[dtype])


@pytest.mark.parametrize("slot", [0, 2])
def test_gemv_qkv_append_writes_the_new_token_and_nothing_else(slot, device, monkeypatch):
    """Batch 1 writes its key and value at its length in its own slot of a larger cache."""
    b, h, d, max_len, dtype = 1, 3, 32, 21, torch.float16
    c = h * d
    x, w, bias, _, ln_w, ln_b = _inputs(b, 3 * c, c, dtype, device, seed=b)
    lens = torch.tensor([7 + 7 * slot], dtype=torch.int32, device=device)
    store = torch.full((2, 3, h, max_len, d), float("nan"), dtype=dtype, device=device)
    normed = gpt2kernels.layer_norm_ref(x.double(), ln_w.double(), ln_b.double(), 1e-5).to(dtype).double()
    want = linear_ref(normed, w.double(), bias.double()).view(b, 3, h, d)
    poison_empty(monkeypatch)
    q = gpt2kernels.ln_qkv_append(x, ln_w, ln_b, w, bias, store[0, slot:slot + 1], store[1, slot:slot + 1], lens)
    assert_close_to(q, want[:, 0].reshape(b, c), TOLS[dtype])
    pos = int(lens[0]) - 1
    assert_close_to(store[0, slot, :, pos], want[0, 1], TOLS[dtype])
    assert_close_to(store[1, slot, :, pos], want[0, 2], TOLS[dtype])
    assert store.isnan().sum() == store.numel() - 2 * b * c  # no other position, head or slot written


def test_gemv_is_deterministic(device):
    """One program reduces each output in a fixed order, with no atomics: the same bits every launch."""
    x, w, b, _, ln_w, ln_b = _inputs(1, 45, 1600, torch.float16, device, seed=3)
    first = gpt2kernels.ln_linear(x, ln_w, ln_b, w, b, "gelu_tanh")
    assert all(torch.equal(first, gpt2kernels.ln_linear(x, ln_w, ln_b, w, b, "gelu_tanh")) for _ in range(2))


def test_which_products_take_the_gemv():
    assert gemv_applies(1, 768, torch.float16, norm=True) and gemv_applies(1, 3072, torch.bfloat16, False)
    assert GEMV_MAX_ROWS == 1  # 8 rows were slower than the tiled kernel on an H200 (gemv.py)
    assert not gemv_applies(2, 768, torch.float16, norm=False)  # the tiled kernel's
    assert not gemv_applies(0, 768, torch.float16, norm=False)
    assert not gemv_applies(1, 768, torch.float64, norm=False)  # gradcheck's dtype: the tiled kernel
    assert not gemv_applies(1, 5000, torch.float32, norm=True)  # a LayerNorm row wider than an fp32 tile
    assert gemv_applies(1, 5000, torch.float32, norm=False)  # without it, K is walked in tiles


@pytest.mark.parametrize("c", [768, 1024, 1280, 1600])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_launches_fill_an_h100_with_tiles_in_registers(c, dtype):
    """CPU proxies of a decode GEMV's speed at GPT-2's shapes: at least one program per SM of an H100
    (132 SMs) for every layer and the lm_head; each tile within the register budget; the LayerNorm'd
    rows (K = C) whole in one tile; all of K in one tile at 16 bits (the weights all load before the wait)."""
    for n, k in [(3 * c, c), (c, c), (4 * c, c), (c, 4 * c), (50257, c)]:
        block_n, block_k = gemv_config(n, k, dtype, sms=132)
        assert -(-n // block_n) >= 132, (n, k, block_n)
        assert block_n * block_k <= TILE_ELEMENTS[dtype.itemsize]
        assert block_k >= k or (dtype == torch.float32 and k > c), (n, k, block_k)
    assert gemv_applies(1, c, dtype, norm=True)


def test_pdl_weights_load_before_the_wait_in_hopper_ptx():
    """Compiled ahead of time (batch 1's fused QKV projection, decode attention, and the tiled linear at
    decode sizes), for sm_90: the GEMV issues its weight loads before ``griddepcontrol.wait`` and triggers
    its dependents; decode attention and the tiles wait before any load (a tile's weights may be any
    caller's: nothing is read early); sm_80 builds carry no PDL instruction, nor do prefill tiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = """
from gpt2kernels import aot
jobs = aot.aot_recording().jobs.values()
for arch in aot.ARCHS:
    for kernel, label, part in (("gemv_kernel", "[fp16,", "KV_CACHE=True"), ("decode_attn_fwd_kernel", "[fp16,", ""),
                                ("linear_fwd_kernel", "[fp16,", "BLOCK_M=16,"),
                                ("linear_fwd_kernel", "[fp16,", "BLOCK_M=128,")):
        job = next(j for j in jobs if j.arch == arch and j.label.startswith(kernel + label) and part in j.label)
        r = aot.compile_job(job)
        print(arch, kernel + part.rstrip(","), r.get("PRE", -1), r.get("TRIGGER", -1))
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {tuple(line.split()[:2]): tuple(map(int, line.split()[2:])) for line in r.stdout.splitlines()}
    assert all(rows[key] == (-1, -1) for key in rows if key[0] == "80"), rows
    pre, trigger = rows[("90", "gemv_kernelKV_CACHE=True")]
    assert pre >= 1 and trigger == 1  # its weight tile
    assert rows[("90", "decode_attn_fwd_kernel")] == (0, 1)
    assert rows[("90", "linear_fwd_kernelBLOCK_M=16")] == (0, 1)
    assert rows[("90", "linear_fwd_kernelBLOCK_M=128")] == (-1, -1)  # a prefill tile: no PDL
    assert len(rows) == 8
