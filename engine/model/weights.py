"""Find, read and validate GPT-2 checkpoints.

Sources: a local HF directory (``model.safetensors``, a sharded ``model.safetensors.index.json``
or ``pytorch_model.bin``), a nanoGPT ``ckpt.pt`` or llm.c ``.bin`` file (``training_formats``), a
hub name resolved through ``huggingface_hub``, or ``random:<size>``.
The result is always a state dict in the engine's layout: HF names without the ``transformer.``
prefix, the four Conv1D weights seen in the ``nn.Linear`` layout [out, in] (as transposed views,
so the loader decides once whether to copy them), and ``lm_head.weight`` only when it is not tied to ``wte``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import torch

from ..errors import CheckpointError
from .config import GPT2Config, named_config
from .training_formats import read_training_checkpoint

RANDOM_PREFIX = "random:"
HUB_ORG = "openai-community"
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old .bin files
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF GPT-2 checkpoint (HF layout, no prefix) and its shape."""
    c, f = config.n_embd, config.mlp_width
    shapes = {"wte.weight": (config.vocab_size, c), "wpe.weight": (config.n_positions, c)}
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (c,), p + "ln_1.bias": (c,),
            p + "attn.c_attn.weight": (c, 3 * c), p + "attn.c_attn.bias": (3 * c,),
            p + "attn.c_proj.weight": (c, c), p + "attn.c_proj.bias": (c,),
            p + "ln_2.weight": (c,), p + "ln_2.bias": (c,),
            p + "mlp.c_fc.weight": (c, f), p + "mlp.c_fc.bias": (f,),
            p + "mlp.c_proj.weight": (f, c), p + "mlp.c_proj.bias": (c,),
        })
    shapes.update({"ln_f.weight": (c,), "ln_f.bias": (c,)})
    return shapes


def random_hf_state_dict(config: GPT2Config, seed: int = 0,
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded random weights in HF layout, initialised as HF does (normal(0, 0.02), scaled c_proj).

    Each tensor is drawn in fp32 and cast to ``dtype`` at once, so the values do not depend on
    ``dtype`` beyond its rounding and the peak memory is the result plus one fp32 tensor.

    LayerNorm weights and biases are drawn near (1, 0) rather than set exactly, so that a test
    that swaps gamma and beta, or forgets one, still fails.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(config).items():
        if ".ln_" in name or name.startswith("ln_f"):
            base = 1.0 if name.endswith("weight") else 0.0
            t = base + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
            t = std * torch.randn(shape, generator=g)
        out[name] = t.to(dtype)
    return out


def resolve_source(source: str | os.PathLike) -> tuple[GPT2Config, Path | None]:
    """Map ``source`` to (config, checkpoint directory); the directory is None for ``random:``."""
    source = str(source)
    if source.startswith(RANDOM_PREFIX):
        return named_config(source[len(RANDOM_PREFIX):]), None
    path = Path(source).expanduser()
    if path.exists():
        return _local_config(path), path
    if source.startswith((".", "/", "~")) or os.sep in source.rstrip("/").split("/", 1)[-1]:
        raise CheckpointError(f"checkpoint directory {source} does not exist")
    if "/" not in source:
        named_config(source)  # raises a clear error for an unknown name
        source = f"{HUB_ORG}/{source}"
    directory = _hub_snapshot(source)
    return _local_config(directory), directory


def _local_config(path: Path) -> GPT2Config:
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (expected an HF model directory, a nanoGPT ckpt.pt "
                              "or an llm.c .bin)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path} has no config.json")
    return GPT2Config.from_json_file(cfg)


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"cannot fetch {repo_id!r}: huggingface_hub is not installed; "
            "pass a local model directory or random:gpt2") from None
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({reason}); pass a local model directory or random:gpt2") from None


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of an HF checkpoint directory, preferring safetensors."""
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            break
    else:
        raise CheckpointError(f"{directory} holds none of {', '.join(WEIGHT_FILES)}")
    path = directory / name
    if name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path} is not a valid safetensors index: {e}") from None
        tensors = {}
        for shard in sorted(set(map(str, weight_map.values()))):
            shard_path = (directory / shard).resolve()
            if not shard_path.is_relative_to(directory.resolve()):  # an index must not reach outside its model
                raise CheckpointError(f"{path} names shard {shard!r}, outside the model directory")
            tensors.update(_read_safetensors(shard_path))
        return tensors
    if name.endswith(".safetensors"):
        return _read_safetensors(path)
    return _read_bin(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint shard {path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated: {e}") from None


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e).lower() and "weights only" not in str(e).lower():
            raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint: {_first_line(e)}") from None
        raise CheckpointError(f"{path} holds Python objects besides tensors and was not unpickled (unpickling can "
                              "run code; convert it to safetensors, or re-save its state dict alone)") from None
    except Exception as e:  # zip and storage errors all mean an unreadable file
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint: {_first_line(e)}") from None
    # Training scripts often save {"state_dict": ...} or {"model": ...}; the weights are inside.
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model"):
        state = next(iter(state.values()))
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (it holds a {type(state).__name__})")
    odd = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise CheckpointError(f"{path} is not a state dict of tensors: entry {odd!r} holds a "
                              f"{type(state[odd]).__name__}")
    return state


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


LM_HEAD = "lm_head.weight"
MAX_LISTED_PROBLEMS = 5  # a gpt2-xl checkpoint against the gpt2 config has ~600; the summary says why


def to_engine_layout(hf_state: dict[str, torch.Tensor], config: GPT2Config) -> dict[str, torch.Tensor]:
    """Validate an HF state dict against ``config`` and convert it to the engine's layout.

    Raises CheckpointError naming how the checkpoint's sizes differ from the config's, then the
    first few missing, unexpected or mis-shaped tensors. An ``lm_head.weight`` equal to ``wte``
    (tied, as GPT-2's) is dropped; a different one (a fine-tune with ``tie_word_embeddings=False``)
    is kept under ``LM_HEAD``.
    """
    state = {}
    for name, t in hf_state.items():
        name = name.removeprefix("transformer.")
        if name.endswith(IGNORED_SUFFIXES):
            continue
        state[name] = t
    lm_head = state.pop(LM_HEAD, None)
    expected = expected_shapes(config)
    if lm_head is not None:
        expected[LM_HEAD] = expected["wte.weight"]
        state[LM_HEAD] = lm_head
    problems = [f"missing tensor {n} (expected shape {list(s)})" for n, s in expected.items() if n not in state]
    problems += [f"unexpected tensor {n} with shape {list(t.shape)}" for n, t in state.items() if n not in expected]
    problems += [f"tensor {n} has shape {list(state[n].shape)}, expected {list(s)}"
                 for n, s in expected.items() if n in state and tuple(state[n].shape) != s]
    if problems:
        listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"; and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise CheckpointError(f"checkpoint does not match its config{_size_summary(state, config)}: {listed}{more}")
    for name in state:
        if not state[name].is_floating_point():
            raise CheckpointError(f"tensor {name} has non-float dtype {state[name].dtype}")
        if not bool(torch.isfinite(state[name]).all()):  # ~0.1 s for gpt2; a NaN weight only shows as NaN logits
            raise CheckpointError(f"tensor {name} holds NaN or infinite values")
        if name.endswith(CONV1D_WEIGHTS):
            state[name] = state[name].t()  # a view: the loader picks the memory layout
    if lm_head is not None and torch.equal(lm_head, state["wte.weight"]):
        del state[LM_HEAD]
    return state


def _size_summary(state: dict[str, torch.Tensor], config: GPT2Config) -> str:
    """" (config has 12 layers, checkpoint has 2; ...)": the sizes that differ, read off the tensors."""
    layers = {int(n.split(".")[1]) for n in state if n.startswith("h.") and n.split(".")[1].isdigit()}
    found = {"layers": max(layers) + 1 if layers else 0}
    if "wte.weight" in state and state["wte.weight"].dim() == 2:
        found["vocabulary"], found["width"] = state["wte.weight"].shape
    if "wpe.weight" in state and state["wpe.weight"].dim() == 2:
        found["positions"] = state["wpe.weight"].shape[0]
    wanted = {"layers": config.n_layer, "vocabulary": config.vocab_size, "width": config.n_embd,
              "positions": config.n_positions}
    diffs = [f"config has {wanted[k]} {k}, checkpoint has {v}" for k, v in found.items() if v != wanted[k]]
    return f" ({'; '.join(diffs)})" if diffs else ""


def load_state_dict(source: str | os.PathLike, seed: int = 0,
                    random_dtype: torch.dtype = torch.float32) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """Resolve ``source`` and return (config, state dict in the engine layout, on CPU); ``random:``
    weights are made in ``random_dtype``."""
    path = Path(str(source)).expanduser()
    if not str(source).startswith(RANDOM_PREFIX) and path.is_file():
        config, hf_state = read_training_checkpoint(path)
        return config, to_engine_layout(hf_state, config)
    config, directory = resolve_source(source)
    hf_state = random_hf_state_dict(config, seed, random_dtype) if directory is None else read_checkpoint(directory)
    return config, to_engine_layout(hf_state, config)
