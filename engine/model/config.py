"""GPT-2 hyper-parameters: the four released sizes and any HF ``config.json``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

from ..checks import is_int, is_number
from ..errors import ConfigError


_TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5
    n_inner: int | None = None  # MLP width; None means 4 * n_embd

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "layer_norm_epsilon":
                ok = is_number(v) and v > 0
            else:
                ok = is_int(v) or (f.name == "n_inner" and v is None)
            if not ok:
                kind = "a number > 0" if f.name == "layer_norm_epsilon" else "an integer"
                raise ConfigError(f"{f.name} must be {kind}, got {v!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for f in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "n_inner"):
            if getattr(self, f) is not None and getattr(self, f) <= 0:
                raise ConfigError(f"{f} must be positive, got {getattr(self, f)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, hf: dict) -> "GPT2Config":
        """Build from the dict of an HF ``config.json``; refuses ``model_type`` other than gpt2."""
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json must hold a JSON object, got a {type(hf).__name__}")
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ConfigError(f"model_type is {hf.get('model_type')!r}, only 'gpt2' is supported")
        # HF GPT-2 configs may omit fields and use `n_ctx` as an alias of `n_positions`.
        act = hf.get("activation_function", "gelu_new")
        if act not in _TANH_GELU_NAMES:
            raise ConfigError(f"activation_function {act!r} is not GPT-2's tanh GELU")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise ConfigError(f"config sets {flag}=true, which this engine does not implement")
        if hf.get("scale_attn_weights", True) is False:
            raise ConfigError("config sets scale_attn_weights=false, which this engine does not implement")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names}
        if "n_positions" not in kwargs and "n_ctx" in hf:
            kwargs["n_positions"] = hf["n_ctx"]
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GPT2Config":
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_hf(json.load(f))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


CONFIGS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
}


def named_config(name: str) -> GPT2Config:
    """The config of a released size; accepts ``openai-community/`` prefixed names."""
    short = name.split("/")[-1]
    if short not in CONFIGS:
        raise ConfigError(f"unknown model name {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[short]
