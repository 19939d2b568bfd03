"""Weight-only int8 for a loaded model: ``load_model(..., quantize="int8" | "int8-all")``.

``int8`` quantises the four linears of every block (c_attn, attention c_proj, c_fc, MLP c_proj);
``int8-all`` the lm_head too (an int8 copy beside ``wte``, which the embedding lookup keeps in the
model dtype). Embeddings, LayerNorms and biases stay in the model dtype. Scales are symmetric per
output channel, computed at load from any checkpoint (``gpt2kernels.quantize_int8``).

Two forms, one per backend:
- triton (GPU): the int8 weight and its fp32 scales; our linear kernels widen the weight in
  registers and scale in the epilogue (``gpt2kernels.linear``), keeping every fusion.
- eager (CPU): ``PackedInt8Linear``, the same int8 values prepacked once for PyTorch's quantised
  CPU engine (fbgemm on x86): each call quantises the activations to uint8 (per tensor, as
  CTranslate2 and ONNX Runtime do) and multiplies int8 by int8 into int32 (AVX-512 VNNI where the
  processor has it). On the 2-core AMD EPYC (AVX-512 VNNI) gpt2's linears for one token took 2.3 ms
  this way, against 5.7 ms for ``_weight_int8pack_mm`` (bf16 activations, int8 weights), 7.0 ms
  in fp16, 9.9 ms in bf16 and 14.4 ms in fp32.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

import gpt2kernels

from ..errors import EngineError
from . import cpu_step
from .cpu import has_vnni

QUANTIZE_MODES = ("int8", "int8-all")
_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default  # resolved once: ~1 µs a call saved
# PyTorch's quantised CPU engines, fastest first where several exist (fbgemm: x86 with AVX2;
# qnnpack: ARM). onednn was 1.6x slower than fbgemm on gpt2's decode shapes here.
CPU_ENGINES = ("fbgemm", "x86", "qnnpack")


def check_quantize(mode: str | None) -> str | None:
    """``mode`` if it is None or one of ``QUANTIZE_MODES``; else EngineError naming it."""
    if mode is not None and mode not in QUANTIZE_MODES:
        raise EngineError(f"unknown quantize mode {mode!r}; choose one of {', '.join(QUANTIZE_MODES)} (or none)")
    return mode


def cpu_engine() -> str | None:
    """The quantised CPU engine ``PackedInt8Linear`` uses here, or None when this PyTorch has none."""
    supported = torch.backends.quantized.supported_engines
    return next((e for e in CPU_ENGINES if e in supported), None)


@contextlib.contextmanager
def _engine(name: str):
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        with warnings.catch_warnings():  # quantised tensor creation warns of its deprecation
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.quantized.engine = old


class PackedInt8Linear:
    """An int8 linear weight prepacked for the CPU's quantised engine, with its bias folded in.

    Called as ``(x, bias, activation, residual)`` like ``gpt2kernels.linear_ref``; ``bias`` must be the
    tensor it was packed with (or None, then none is added). x: (..., K) any float dtype, computed
    in fp32 (the engine's only input dtype) and returned in x's dtype.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, engine: str):
        n = q.shape[0]
        with _engine(engine):
            qt = torch._make_per_channel_quantized_tensor(q.contiguous(), scale.double(),
                                                          torch.zeros(n, dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(qt, bias.float() if bias is not None else None)
        self.engine = engine
        self.bias = bias
        self.scale = scale
        self.shape = q.shape
        self.dtype = torch.int8
        self.device = q.device
        # Without VNNI, fbgemm sums pairs of uint8 x int8 products in int16, which saturates unless
        # activations keep to 7 bits; with it, the products accumulate in int32 and all 8 bits are safe.
        self.reduce_range = not has_vnni() if engine in ("fbgemm", "x86") else False

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        if bias is not None and bias is not self.bias:
            raise ValueError("PackedInt8Linear was packed with another bias (or none); pass the one it was packed with")
        # A decode step's (B, K) fp32 rows go straight in: ~50 calls a token, each reshape or cast costs a few µs.
        x2 = x if x.dim() == 2 and x.dtype == torch.float32 else x.reshape(-1, x.shape[-1]).float()
        y = _LINEAR_DYNAMIC(x2, self.packed, self.reduce_range)
        if x2 is not x:
            y = y.view(*x.shape[:-1], self.shape[0])
        if bias is None and self.bias is not None:
            y = y - self.bias.float()  # folded in at packing; this call asked for none
        if activation == "gelu_tanh":
            y = F.gelu(y, approximate="tanh")
        elif activation is not None:
            raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
        if residual is not None:
            y += residual
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def int8(self) -> torch.Tensor:
        """The (N, K) int8 values."""
        with _engine(self.engine):
            return torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()


def dequantize(weight, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A quantised weight (int8 tensor with its scales, or ``PackedInt8Linear``) as a (N, K) ``dtype`` tensor."""
    if isinstance(weight, PackedInt8Linear):
        return gpt2kernels.dequantize_int8(weight.int8(), weight.scale, dtype)
    return gpt2kernels.dequantize_int8(weight, scale, dtype)


def _linears(model):
    """(``h.{i}.{name}``, module) of every block's four linears (``cpu_step.LINEARS``)."""
    for i, blk in enumerate(model.h):
        for name in cpu_step.LINEARS:
            yield f"h.{i}.{name}", blk.get_submodule(name)


def quantize_model(model, mode: str) -> None:
    """Quantise ``model``'s weights in place (``QUANTIZE_MODES``): int8 tensors and scales for the
    triton backend, ``PackedInt8Linear`` for eager on CPU; one weight at a time, so the extra memory
    is one weight's copy."""
    check_quantize(mode)
    packed = model.backend == "eager" and model.device.type == "cpu"
    engine = cpu_engine() if packed else None
    if packed and engine is None:
        raise EngineError("this PyTorch build has no quantised CPU engine (fbgemm, qnnpack): int8 is unavailable; "
                          "load without quantize")
    int8 = {}  # name -> (int8 weight, scales), for the fused CPU step
    for name, p in _linears(model):
        q, scale = gpt2kernels.quantize_int8(p.weight)
        bias = getattr(p, "bias", None)
        del p.weight
        if packed:
            p.weight = PackedInt8Linear(q, scale, bias, engine)
            int8[name] = q, scale
        else:
            p.weight = torch.nn.Parameter(q, requires_grad=False)
            p.scale = scale
    head = None
    if mode == "int8-all":
        q, scale = gpt2kernels.quantize_int8(model._lm_head_weight())
        if packed:
            model.lm_head_weight = PackedInt8Linear(q, scale, None, engine)
            model.lm_head_scale = None
            head = q, scale
        else:
            model.lm_head_weight, model.lm_head_scale = q, scale
    model.quantize = mode
    if packed:
        model.cpu_step = cpu_step.build(model, int8, head)
