"""The model: GPT-2's configuration (``config``), checkpoints (``weights``, ``loader``), the network
over pluggable kernels (``gpt2``, ``backends``: eager PyTorch or our Triton kernels), its KV cache
(``cache``), int8 weights (``quantize``) with their one-call CPU decode step (``cpu_step``) and the
CPU's measured defaults (``cpu``)."""

from .cache import KVCache
from .config import CONFIGS, GPT2Config
from .gpt2 import GPT2, Block, decode_layer
from .loader import load_model

__all__ = ["CONFIGS", "GPT2", "Block", "GPT2Config", "KVCache", "decode_layer", "load_model"]
