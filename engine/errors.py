"""Errors a user can cause. The CLI prints these as one line; everything else is a bug."""


class EngineError(ValueError):
    """Base class of every error caused by the caller's input (not by a bug)."""


class ConfigError(EngineError):
    """A model name or config.json that does not describe a GPT-2."""


class CheckpointError(EngineError):
    """A checkpoint that is missing, corrupt, or does not match its config."""


class ContextLengthError(EngineError):
    """Prompt plus new tokens do not fit in the model's positions."""
