"""Fused GPU kernels for transformer inference (Triton) and the sampler, each with its eager reference.

Importable on its own: nothing here imports the ``engine`` runtime.
"""

from .loss import cross_entropy, cross_entropy_ref, linear_cross_entropy, linear_cross_entropy_ref
from .embedding import decode_embed, decode_embed_ref
from .attention import (decode_attention, decode_attention_ref, flash_attention, flash_attention_ref,
                        flash_attention_with_lse)
from . import attention_backward  # noqa: F401  (registers flash_attention's backward)
from .layernorm import add_layer_norm, add_layer_norm_ref, layer_norm, layer_norm_ref
from .linear import (gelu_mlp, gelu_mlp_ref, linear, linear_ref, ln_linear, ln_linear_argmax, ln_linear_argmax_ref,
                     ln_linear_ref, ln_qkv_append, ln_qkv_append_ref, qkv_append_ref)
from .quantize import dequantize_int8, quantize_int8
from .matmul import matmul, matmul_ref
from . import linear_backward  # noqa: F401  (registers linear's and gelu_mlp's backward)
from ._ops import prepare_device, programmatic_dependent_launch
from .hf import patch_hf_gpt2
from .penalties import CONTROLS, PENALTY_CONTROLS, apply_penalties, apply_penalties_ref, check_penalties
from .sampling import SAMPLING_CONTROLS, SamplingControl, check_sampling_params, greedy_ref, sample, sample_ref

__all__ = [
    "CONTROLS", "PENALTY_CONTROLS", "SAMPLING_CONTROLS", "SamplingControl", "add_layer_norm", "add_layer_norm_ref",
    "apply_penalties", "apply_penalties_ref", "check_penalties", "check_sampling_params", "cross_entropy",
    "cross_entropy_ref", "decode_attention", "decode_attention_ref", "decode_embed", "decode_embed_ref",
    "dequantize_int8", "flash_attention", "flash_attention_ref", "flash_attention_with_lse", "gelu_mlp", "gelu_mlp_ref",
    "greedy_ref", "layer_norm", "layer_norm_ref", "linear", "linear_cross_entropy", "linear_cross_entropy_ref",
    "linear_ref", "ln_linear", "ln_linear_argmax", "ln_linear_argmax_ref", "ln_linear_ref", "ln_qkv_append",
    "ln_qkv_append_ref", "matmul", "matmul_ref", "patch_hf_gpt2", "prepare_device", "programmatic_dependent_launch",
    "qkv_append_ref", "quantize_int8", "sample", "sample_ref",
]
