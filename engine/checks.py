"""The argument checks every entry point shares: integers that are not bools, token ids in the
vocabulary. Each raises ``ParameterError`` naming the parameter."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Sequence

from .errors import ParameterError


def is_int(value) -> bool:
    """An integer (Python's or numpy's), but not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number (int or float, Python's or numpy's), but not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)


def has_type(value, kinds: tuple[type, ...]) -> bool:
    """``isinstance(value, kinds)``, except that a bool (an int to Python) only passes for ``bool``."""
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


def check_int(name: str, value, low: int, high: float = math.inf, rule: str | None = None) -> int:
    """``value`` as an int when it is an integer in [low, high]; ParameterError naming ``name``
    otherwise, saying the ``rule`` (default "an integer >= low" or "an integer in [low, high]")."""
    rule = rule or (f"an integer >= {low}" if high == math.inf else f"an integer in [{low}, {high}]")
    if not is_int(value) or not low <= value <= high:
        raise ParameterError(name, f"{name} must be {rule}, got {value!r}")
    return int(value)


def check_prompt_ids(ids: Sequence[int], vocab_size: int, what: str = "the prompt", param: str = "prompt",
                     note: str = "", allow_empty: bool = False) -> None:
    """ParameterError naming ``param`` unless ``ids`` is a list of token ids in [0, vocab_size), not
    empty unless ``allow_empty``; ``note`` follows the bad id in the message."""
    if not ids and not allow_empty:
        raise ParameterError(param, f"{what} is empty (start from <|endoftext|> instead)")
    bad = next((t for t in ids if not (is_int(t) and 0 <= t < vocab_size)), None)
    if bad is not None:
        raise ParameterError(param, f"{what} holds token id {bad!r}{note}, outside the model's vocabulary of "
                                    f"{vocab_size} tokens [0, {vocab_size})")
