"""A minimal GPT-2 inference runtime: checkpoints, tokenizer, static KV cache, generation, CLI."""

from .config import CONFIGS, GPT2Config
from .errors import (CheckpointError, ConfigError, ContextLengthError, EngineError, NumericalError, ParameterError,
                     QueueFullError)
from .generation import GenerationOutput, generate
from .loader import load_model
from .model import GPT2
from .request import Request, SamplingParams
from .scheduler import Scheduler
from .scoring import Perplexity, Score, perplexity, score
from .tokenizer import EOT_ID, decode, encode

__all__ = [
    "CONFIGS", "EOT_ID", "GPT2", "CheckpointError", "ConfigError", "ContextLengthError", "EngineError",
    "GPT2Config", "GenerationOutput", "NumericalError", "ParameterError", "Perplexity", "QueueFullError", "Request", "SamplingParams",
    "Scheduler", "Score", "decode", "encode", "generate", "load_model", "perplexity", "score",
]
