"""A minimal GPT-2 inference runtime: checkpoints, tokenizer, static KV cache, generation, CLI."""

import sys
import types

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
    "GPT2Config", "GenerationOutput", "NumericalError", "ParameterError", "Perplexity", "QueueFullError", "Request",
    "SamplingParams",
    "Scheduler", "Score", "decode", "encode", "generate", "load_model", "perplexity", "score",
]


class _Package(types.ModuleType):
    """``engine`` itself. Importing the CLI module ``engine.generate`` (``python -m engine.generate``,
    ``from engine.generate import main``) would make Python bind it to the package attribute
    ``generate``, hiding the function; the function is kept (the module stays in ``sys.modules``)."""

    def __setattr__(self, name, value):
        if name == "generate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
