"""Int8 GEMV and a whole GPT-2 decode step on CPU, in C++ (``csrc/decode_cpu.cpp``).

A batch-1 CPU decode step is ~150 small PyTorch ops; their dispatch cost about as much as the
weights' bytes (issue 34). ``Int8Decoder`` runs the whole step in one call instead: embedding,
every block and the lm_head, over weights packed once by ``pack_int8``, with the int8 x uint8
products of AVX-512 VNNI (AVX2 and portable C++ builds elsewhere, chosen at run time).

Numerics, shared by every build and by the references here:
- weights: int8 with one fp32 scale per output channel (``gpt2kernels.quantize_int8``);
- activations: each row quantised to uint8 before every linear, with scale (max - min) / 255 over
  the row and 0, and zero point round(-min / scale) (PyTorch's dynamic int8 scheme, fbgemm's, per
  row rather than per call);
- y = (sum_k xq w - zp * sum_k w) * x_scale * w_scale + bias, then the tanh GELU, then the
  residual; everything else (LayerNorm, attention, softmax) in fp32.

Packed layout (``pack_int8``): (ceil(N / 64), ceil(K / 4), 64, 4) int8, 64 output columns by 4
consecutive k per 256 bytes: one 64-byte load is the 16 columns x 4 k one vpdpbusd multiplies,
and a thread's share of the weight (a run of 64-column tiles) is one contiguous stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _extension
from ._ops import NS

LIB = NS + "_C"
ISA_NAMES = ("portable", "avx2", "avx512_vnni")  # csrc/decode_cpu.cpp's codes 0, 1, 2
TILE_COLUMNS = 64
K_GROUP = 4


def available() -> bool:
    """Whether the compiled extension (built or compiled on first use) has the int8 CPU step."""
    return _extension.load() and hasattr(getattr(torch.ops, LIB), "int8_linear")


def _ops():
    if not available():
        raise RuntimeError("the int8 CPU decode step is not in the compiled extension: it could not be compiled "
                           "(see the line gpt2engine printed), or a build from before it was loaded; rebuild with "
                           "`pip install -e . --no-build-isolation`")
    return getattr(torch.ops, LIB)


def cpu_isa() -> str:
    """The instruction set the int8 kernels use on this processor: one of ``ISA_NAMES``."""
    return ISA_NAMES[_ops().cpu_isa()]


def parallel_threads() -> int:
    """How many threads the step's parallel loops run on from the calling thread: its
    ``torch.get_num_threads()``, on a team of worker threads the calling thread owns
    (``csrc/thread_team.h``: they spin between a step's loops from any thread, where OpenMP's
    slept off the main thread)."""
    return _ops().parallel_threads()


def supported_isas() -> list[str]:
    """Every instruction set this processor can run the kernels in, portable first."""
    return list(ISA_NAMES[:_ops().cpu_isa() + 1])


def _isa_code(isa: str | None) -> int:
    if isa is None:
        return -1
    if isa not in ISA_NAMES:
        raise ValueError(f"isa must be None or one of {', '.join(ISA_NAMES)}, got {isa!r}")
    return ISA_NAMES.index(isa)


def pack_int8(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack an int8 (N, K) weight (nn.Linear layout) for the CPU kernels.

    Returns (packed: int8 (ceil(N / 64), ceil(K / 4), 64, 4), zero-padded; colsum: int32 (N,),
    each output column's sum of weights, which the zero point of the activations multiplies).
    """
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"q must be an int8 (N, K) tensor, got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    np_, kp = -(-n // TILE_COLUMNS) * TILE_COLUMNS, -(-k // K_GROUP) * K_GROUP
    padded = F.pad(q.cpu(), (0, kp - k, 0, np_ - n))
    packed = padded.view(np_ // TILE_COLUMNS, TILE_COLUMNS, kp // K_GROUP, K_GROUP).permute(0, 2, 1, 3).contiguous()
    return packed, q.cpu().sum(1, dtype=torch.int32)


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row of fp32 x (M, K) as uint8 codes, scale and zero point (the kernels' scheme).

    Returns (codes int64 (M, K) in [0, 255], scale fp32 (M,), zero point int64 (M,))."""
    lo = x.amin(1).clamp(max=0.0)
    hi = x.amax(1).clamp(min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    inv = 1.0 / scale
    zp = torch.round(-lo * inv)
    codes = (torch.round(x * inv[:, None]) + zp[:, None]).clamp(0, 255)
    return codes.long(), scale, zp.long()


def int8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                    activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``int8_linear`` in eager PyTorch (the oracle): x fp32 (M, K), q int8 (N, K), scale fp32 (N,),
    bias fp32 (N,) or None, residual fp32 (M, N) or None. Returns fp32 (M, N)."""
    codes, xs, zp = quantize_rows_ref(x.float())
    acc = codes.double() @ q.double().t() - zp[:, None].double() * q.double().sum(1)[None]  # exact integers
    y = acc.float() * (xs[:, None] * scale[None])
    if bias is not None:
        y = y + bias
    if activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        y = y + residual
    return y


def int8_linear(x: torch.Tensor, packed: torch.Tensor, colsum: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, k: int, activation: str | None = None,
                residual: torch.Tensor | None = None, isa: str | None = None) -> torch.Tensor:
    """activation(x @ W.T + bias) + residual for a ``pack_int8`` weight W, x quantised per row.

    x: fp32 (M, K) on CPU; packed, colsum from ``pack_int8``; scale fp32 (N,); bias fp32 (N,) or
    None; activation None or ``"gelu_tanh"``; residual fp32 (M, N) or None; isa: None (the best
    here) or one of ``supported_isas()``. Returns fp32 (M, N).
    """
    return _ops().int8_linear(x, packed, colsum, scale, bias, k, activation, residual, _isa_code(isa))


def decode_step_ref(wte: torch.Tensor, wpe: torch.Tensor, blocks: list[dict], ln_f: tuple[torch.Tensor, torch.Tensor],
                    head: tuple[torch.Tensor, torch.Tensor] | None, n_head: int, eps: float, tokens: torch.Tensor,
                    cache_lens: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """``Int8Decoder.step`` in eager PyTorch (the oracle), on ``Int8Decoder``'s arguments: appends
    ``tokens`` (B,) at each slot's length, advances ``cache_lens``, returns fp32 (B, vocab) logits
    (or (B, C) hidden states after ln_f with no ``head``)."""
    b, c = tokens.shape[0], wte.shape[1]
    d = c // n_head
    pos = cache_lens[:b].long()
    x = wte[tokens].float() + wpe[pos].float()
    cache_lens[:b] += 1
    rows = torch.arange(b)

    def linear(x, name, block, activation=None, residual=None):
        q, scale, bias = block[name]
        return int8_linear_ref(x, q, scale, bias, activation, residual)

    for i, block in enumerate(blocks):
        h = F.layer_norm(x, (c,), block["ln_1.weight"], block["ln_1.bias"], eps)
        q, k, v = linear(h, "attn.c_attn", block).split(c, dim=1)
        k_cache[i, rows, :, pos] = k.view(b, n_head, d)
        v_cache[i, rows, :, pos] = v.view(b, n_head, d)
        o = torch.empty(b, c)
        for r in range(b):
            n = int(pos[r]) + 1
            o[r] = F.scaled_dot_product_attention(q[r].view(n_head, 1, d), k_cache[i, r, :, :n],
                                                  v_cache[i, r, :, :n]).reshape(c)
        x = linear(o, "attn.c_proj", block, residual=x)
        h = F.layer_norm(x, (c,), block["ln_2.weight"], block["ln_2.bias"], eps)
        x = linear(linear(h, "mlp.c_fc", block, "gelu_tanh"), "mlp.c_proj", block, residual=x)
    x = F.layer_norm(x, (c,), ln_f[0], ln_f[1], eps)
    return x if head is None else int8_linear_ref(x, head[0], head[1])


# Each block's tensors in the order the C++ decoder reads them (csrc/decode_cpu.cpp, kTensorsPerLayer).
BLOCK_TENSORS = ("ln_1.weight", "ln_1.bias", "attn.c_attn", "attn.c_proj", "ln_2.weight", "ln_2.bias",
                 "mlp.c_fc", "mlp.c_proj")


class Int8Decoder:
    """GPT-2's weights packed for ``step``, one whole decode step in one C++ call.

    Built from plain tensors (no model class): ``blocks``, one dict per layer with the fp32
    LayerNorm vectors under ``ln_1.weight`` ... and each linear (``attn.c_attn``, ``attn.c_proj``,
    ``mlp.c_fc``, ``mlp.c_proj``) as (int8 (N, K) weight, fp32 (N,) scale, fp32 (N,) bias);
    ``head``: the lm_head as (int8 (vocab, C), fp32 (vocab,) scale), or None to have ``step``
    return the hidden states after ln_f. wte (vocab, C) and wpe (positions, C) are fp32.
    """

    def __init__(self, wte: torch.Tensor, wpe: torch.Tensor, blocks: list[dict],
                 ln_f: tuple[torch.Tensor, torch.Tensor], head: tuple[torch.Tensor, torch.Tensor] | None,
                 n_head: int, eps: float = 1e-5, isa: str | None = None):
        _ops()
        c = wte.shape[1]
        mlp = blocks[0]["mlp.c_fc"][0].shape[0]
        tensors = [_f32(wte), _f32(wpe)]
        for block in blocks:
            for name in BLOCK_TENSORS:
                value = block[name]
                if isinstance(value, tuple):
                    q, scale, bias = value
                    tensors += [*pack_int8(q), _f32(scale), _f32(bias) if bias is not None else torch.empty(0)]
                else:
                    tensors.append(_f32(value))
        tensors += [_f32(ln_f[0]), _f32(ln_f[1])]
        tensors += [*pack_int8(head[0]), _f32(head[1])] if head is not None else [torch.empty(0)] * 3
        shape = [len(blocks), n_head, c, mlp, wte.shape[0], wpe.shape[0]]
        self.width = wte.shape[0] if head is not None else c
        self._impl = getattr(torch.classes, LIB).Int8Decoder(shape, float(eps), tensors, _isa_code(isa))
        self.isa = ISA_NAMES[self._impl.isa()]

    def step(self, tokens: torch.Tensor, cache_lens: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             out: torch.Tensor) -> torch.Tensor:
        """One decode step for slots [0, B), in place.

        tokens: int64 (B,); cache_lens: int32 (slots >= B,), each row's cached length, advanced by
        one; k_cache, v_cache: fp32 (n_layer, slots, n_head, max_len, head_dim), each row's new key
        and value stored at its old length; out: fp32 (B, vocab) logits (or (B, C) hidden states
        after ln_f without a head), written and returned. All contiguous, on the CPU.
        """
        self._impl.step(tokens, cache_lens, k_cache, v_cache, out)
        return out


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()
