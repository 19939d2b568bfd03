"""A GPT-2 inference runtime: the model (``engine.model``), the step core (``engine.core``), and
the commands with their library faces: ``generate``, ``score``/``perplexity``, the server
(``engine.serve``) and the CLI."""

import sys
import types

from .interrupt import exit_on_ctrl_c_while_starting

exit_on_ctrl_c_while_starting()  # before the imports below, which take a command's first second or two

from .core.request import Request, SamplingParams  # noqa: E402
from .core.scheduler import Scheduler, scheduler_for  # noqa: E402
from .errors import (CheckpointError, ConfigError, ContextLengthError, EngineError, NumericalError,  # noqa: E402
                     ParameterError, QueueFullError)
from .generation import GenerationOutput, generate  # noqa: E402
from .model.config import CONFIGS, GPT2Config  # noqa: E402
from .model.gpt2 import GPT2  # noqa: E402
from .model.loader import load_model  # noqa: E402
from .scoring import Perplexity, Score, perplexity, score  # noqa: E402
from .tokenizer import EOT_ID, decode, encode  # noqa: E402

__all__ = [
    "CONFIGS", "EOT_ID", "GPT2", "CheckpointError", "ConfigError", "ContextLengthError", "EngineError",
    "GPT2Config", "GenerationOutput", "NumericalError", "ParameterError", "Perplexity", "QueueFullError", "Request",
    "SamplingParams",
    "Scheduler", "Score", "decode", "encode", "generate", "load_model", "perplexity", "scheduler_for", "score",
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
