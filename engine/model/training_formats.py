"""Read the two formats GPT-2 is trained in, into an HF-layout state dict the loader validates.

- nanoGPT's ``ckpt.pt`` (``train.py``): ``{"model": state_dict, "model_args": {n_layer, n_head,
  n_embd, block_size, bias, vocab_size, dropout}, "optimizer": ..., ...}``. Its linears are
  ``nn.Linear`` ([out, in], where HF's Conv1D is [in, out]); a ``torch.compile``d model's keys carry
  ``_orig_mod.``; ``attn.bias`` is a causal-mask buffer (older PyTorch); ``bias=False`` models have no
  biases (zeros here: the same function). nanoGPT's MLP uses the exact (erf) GELU, where GPT-2 and
  this engine use the tanh approximation: a warning says so.
- llm.c's ``gpt2_124M.bin`` / ``gpt2_124M_bf16.bin`` (``train_gpt2.py``'s ``write_model``): a
  header of 256 int32 (magic 20240326, version 3 = fp32 or 5 = bf16, block size, vocabulary,
  layers, heads, width, padded vocabulary), then every parameter in llm.c's order (each kind for
  all layers before the next kind), ``nn.Linear`` layout, ``wte`` padded to a multiple of 128 rows.

Both are read without running pickled code: ``torch.load(weights_only=True)`` and plain bytes.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError
from .config import GPT2Config

LINEARS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
COMPILED_PREFIX = "_orig_mod."
LLMC_MAGIC = 20240326
LLMC_VERSIONS = {3: torch.float32, 5: torch.bfloat16}
LLMC_HEADER_INTS = 256
# llm.c's parameter kinds in file order: (name in a block or at the top, shape from (V, T, C)), per layer when "h."
LLMC_ORDER = ("wte.weight", "wpe.weight", "h.ln_1.weight", "h.ln_1.bias", "h.attn.c_attn.weight", "h.attn.c_attn.bias",
              "h.attn.c_proj.weight", "h.attn.c_proj.bias", "h.ln_2.weight", "h.ln_2.bias", "h.mlp.c_fc.weight",
              "h.mlp.c_fc.bias", "h.mlp.c_proj.weight", "h.mlp.c_proj.bias", "ln_f.weight", "ln_f.bias")


def read_training_checkpoint(path: Path) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """(config, HF-layout state dict) of a nanoGPT ``.pt`` or llm.c ``.bin`` file, told apart by content."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) == 8 and int.from_bytes(head[:4], "little") == LLMC_MAGIC:
        return read_llmc(path)
    if head[:2] == b"PK" or path.suffix in (".pt", ".pth", ".ckpt"):  # torch.save writes a zip
        return read_nanogpt(path)
    raise CheckpointError(f"{path} is neither a nanoGPT checkpoint (torch.save zip) nor an llm.c model "
                          f"(magic {LLMC_MAGIC}); pass an HF model directory, a nanoGPT ckpt.pt or an llm.c .bin")


def _to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nn.Linear-layout GPT-2 names (``transformer.`` prefix optional) -> HF layout (Conv1D [in, out])."""
    out = {}
    for name, t in state.items():
        name = name.removeprefix("transformer.")
        out[name] = t.t() if name.endswith(LINEARS) and t.dim() == 2 else t
    return out


def read_nanogpt(path: Path) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds Python objects besides tensors and plain values, and was not "
                              f"unpickled (unpickling can run code): {str(e).splitlines()[0][:200]}") from None
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint: {str(e).splitlines()[0][:200]}") \
            from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(
            ckpt.get("model_args"), dict):
        keys = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a nanoGPT checkpoint: expected 'model' and 'model_args' entries, "
                              f"found {keys}")
    args = ckpt["model_args"]
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size") if k not in args]
    if missing:
        raise CheckpointError(f"{path}: model_args lacks {', '.join(missing)}")
    config = GPT2Config(n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"],
                        n_positions=args["block_size"], vocab_size=args["vocab_size"])
    state = {k.removeprefix(COMPILED_PREFIX): v for k, v in ckpt["model"].items()}
    state = {k: v for k, v in state.items() if not k.endswith(".attn.bias") or v.dim() != 4}  # the mask buffer
    state = _to_hf(state)
    if args.get("bias", True) is False:  # LayerNorm and Linear without bias: zeros compute the same
        _add_zero_biases(state, config)
    if "lm_head.weight" in state and "wte.weight" in state and torch.equal(state["lm_head.weight"],
                                                                             state["wte.weight"]):
        del state["lm_head.weight"]  # tied, as nanoGPT ties it
    warnings.warn("nanoGPT models use the exact (erf) GELU; this engine computes GPT-2's tanh approximation, "
                  "so logits differ slightly (~1e-3) from nanoGPT's own", stacklevel=3)
    return config, state


def _add_zero_biases(state: dict[str, torch.Tensor], config: GPT2Config) -> None:
    c, f = config.n_embd, config.mlp_width
    like = state.get("wte.weight", torch.empty(0))
    sizes = {"ln_1.bias": c, "attn.c_attn.bias": 3 * c, "attn.c_proj.bias": c, "ln_2.bias": c, "mlp.c_fc.bias": f,
             "mlp.c_proj.bias": c}
    for i in range(config.n_layer):
        for name, n in sizes.items():
            state.setdefault(f"h.{i}.{name}", torch.zeros(n, dtype=like.dtype))
    state.setdefault("ln_f.bias", torch.zeros(c, dtype=like.dtype))


def read_llmc(path: Path) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    data = path.read_bytes()
    header_bytes = 4 * LLMC_HEADER_INTS
    if len(data) < header_bytes:
        raise CheckpointError(f"{path} is truncated: {len(data)} bytes, shorter than llm.c's "
                              f"{header_bytes}-byte header")
    header = torch.frombuffer(bytearray(data[:header_bytes]), dtype=torch.int32)
    version = int(header[1])
    if version not in LLMC_VERSIONS:
        raise CheckpointError(f"{path} is llm.c model version {version}; supported: 3 (fp32) and 5 (bf16), "
                              "what llm.c's train_gpt2.py writes")
    dtype = LLMC_VERSIONS[version]
    block, vocab, layers, heads, width, padded = (int(v) for v in header[2:8])
    if not 0 < vocab <= padded:
        raise CheckpointError(f"{path}: header's vocabulary {vocab} and padded vocabulary {padded} are inconsistent")
    config = GPT2Config(n_layer=layers, n_head=heads, n_embd=width, n_positions=block, vocab_size=vocab)
    c = width
    shapes = {"wte.weight": (padded, c), "wpe.weight": (block, c), "ln_1.weight": (c,), "ln_1.bias": (c,),
              "attn.c_attn.weight": (3 * c, c), "attn.c_attn.bias": (3 * c,), "attn.c_proj.weight": (c, c),
              "attn.c_proj.bias": (c,), "ln_2.weight": (c,), "ln_2.bias": (c,), "mlp.c_fc.weight": (4 * c, c),
              "mlp.c_fc.bias": (4 * c,), "mlp.c_proj.weight": (c, 4 * c), "mlp.c_proj.bias": (c,),
              "ln_f.weight": (c,), "ln_f.bias": (c,)}
    names = []
    for kind in LLMC_ORDER:
        if kind.startswith("h."):
            names += [(f"h.{i}.{kind[2:]}", shapes[kind[2:]]) for i in range(layers)]
        else:
            names.append((kind, shapes[kind]))
    total = sum(torch.Size(s).numel() for _, s in names)
    expected = header_bytes + total * dtype.itemsize
    if len(data) != expected:
        raise CheckpointError(f"{path} has {len(data)} bytes; its header ({layers} layers, width {c}, "
                              f"{dtype}) implies {expected}: truncated or not an llm.c GPT-2 model")
    flat = torch.frombuffer(bytearray(data[header_bytes:]), dtype=dtype)
    state, offset = {}, 0
    for name, shape in names:
        n = torch.Size(shape).numel()
        state[name] = flat[offset:offset + n].view(shape)
        offset += n
    state["wte.weight"] = state["wte.weight"][:vocab]  # drop the padding rows
    return config, _to_hf(state)
