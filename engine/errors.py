"""Errors a user can cause. The CLI prints these as one line; everything else is a bug."""


class EngineError(ValueError):
    """Base class of every error caused by the caller's input (not by a bug)."""


class ConfigError(EngineError):
    """A model name or config.json that does not describe a GPT-2."""


class CheckpointError(EngineError):
    """A checkpoint that is missing, corrupt, or does not match its config."""


class ContextLengthError(EngineError):
    """Prompt plus new tokens do not fit in the model's positions."""


class ParameterError(EngineError):
    """A generation parameter out of its range; ``param`` names it (as the API spells it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class NumericalError(EngineError):
    """The model produced NaN or only -inf logits for a request (weights out of range for the dtype)."""


class QueueFullError(EngineError):
    """The scheduler's waiting queue is full: try again later."""
