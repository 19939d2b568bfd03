"""nanoGPT ``ckpt.pt`` and llm.c ``.bin`` checkpoints, written here from a random HF model in each
project's published layout, load into the engine with HF's logits; a broken file is a clear error."""

import warnings

import numpy as np
import pytest
import torch

import engine
from engine.generate import main
from engine.errors import CheckpointError

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LLMC_KINDS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
              "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
              "mlp.c_proj.weight", "mlp.c_proj.bias")


def _linear_layout(hf_model) -> dict[str, torch.Tensor]:
    """HF's state dict in nanoGPT's / llm.c's naming and nn.Linear layout ([out, in])."""
    return {k: (v.t().contiguous() if k.endswith(CONV1D) else v.clone()) for k, v in hf_model.state_dict().items()
            if not k.endswith((".attn.bias", ".attn.masked_bias"))}


def write_nanogpt(hf_model, path, compiled=True, mask_buffers=True):
    """nanoGPT train.py's checkpoint: model (maybe torch.compile'd: _orig_mod.), model_args, optimizer, ..."""
    cfg = hf_model.config
    state = _linear_layout(hf_model)
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied, one tensor under two names
    if mask_buffers:
        t = cfg.n_positions
        for i in range(cfg.n_layer):
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(t, t)).view(1, 1, t, t)
    if compiled:
        state = {"_orig_mod." + k: v for k, v in state.items()}
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.n_positions,
                      bias=True, vocab_size=cfg.vocab_size, dropout=0.0)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 6e-4, "params": [0, 1]}]},
                "model_args": model_args, "iter_num": 5000, "best_val_loss": torch.tensor(2.85),
                "config": {"dataset": "openwebtext", "batch_size": 12}}, path)


def write_llmc(hf_model, path, dtype="float32"):
    """llm.c train_gpt2.py's write_model: 256-int32 header, then each kind of tensor for every layer."""
    cfg = hf_model.config
    p = {k.removeprefix("transformer."): v for k, v in _linear_layout(hf_model).items()}
    vocab, padded = cfg.vocab_size, -(-cfg.vocab_size // 128) * 128
    p["wte.weight"] = torch.cat([p["wte.weight"], torch.zeros(padded - vocab, cfg.n_embd)])
    header = np.zeros(256, dtype=np.int32)
    header[:8] = [20240326, {"float32": 3, "bfloat16": 5}[dtype], cfg.n_positions, vocab, cfg.n_layer, cfg.n_head,
                  cfg.n_embd, padded]
    order = [p["wte.weight"], p["wpe.weight"]]
    for kind in LLMC_KINDS:
        order += [p[f"h.{i}.{kind}"] for i in range(cfg.n_layer)]
    order += [p["ln_f.weight"], p["ln_f.bias"]]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for t in order:
            t = t.to(torch.float32 if dtype == "float32" else torch.bfloat16).contiguous()
            f.write(t.view(torch.int16).numpy().tobytes() if dtype == "bfloat16" else t.numpy().tobytes())


def _hf_logits(hf_model, ids, dtype=torch.float32):
    with torch.no_grad():
        if dtype == torch.float32:
            return hf_model(ids).logits
        rounded = type(hf_model)(hf_model.config).eval()  # HF on the bf16-rounded weights, in fp32
        rounded.load_state_dict({k: v.to(dtype).float() for k, v in hf_model.state_dict().items()})
        return rounded(ids).logits


IDS = torch.randint(0, 50257, (2, 13), generator=torch.Generator().manual_seed(3))


def _assert_logits_match(model, want, tol=1e-5):
    got = model(IDS)
    rel = (got - want).norm() / want.norm()
    assert rel <= tol, f"relative error {rel:.2e}"


@pytest.mark.parametrize("compiled,mask_buffers", [(True, True), (False, False)])
def test_nanogpt_checkpoint_gives_hf_logits(hf_model, tmp_path, compiled, mask_buffers):
    path = tmp_path / "ckpt.pt"
    write_nanogpt(hf_model, path, compiled, mask_buffers)
    with pytest.warns(UserWarning, match="erf"):
        model = engine.load_model(path, device="cpu", dtype=torch.float32)
    _assert_logits_match(model, _hf_logits(hf_model, IDS))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llmc_model_gives_hf_logits(hf_model, tmp_path, dtype):
    path = tmp_path / ("gpt2_124M.bin" if dtype == "float32" else "gpt2_124M_bf16.bin")
    write_llmc(hf_model, path, dtype)
    model = engine.load_model(path, device="cpu", dtype=torch.float32)
    want = _hf_logits(hf_model, IDS, torch.float32 if dtype == "float32" else torch.bfloat16)
    _assert_logits_match(model, want)


def test_cli_serves_both_formats(hf_model, tmp_path, capsys):
    write_nanogpt(hf_model, tmp_path / "ckpt.pt")
    write_llmc(hf_model, tmp_path / "model.bin")
    outs = []
    for name in ("ckpt.pt", "model.bin"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(["--model", str(tmp_path / name), "--prompt", "Hello", "--max-new-tokens", "4",
                         "--temperature", "0", "--dtype", "float32"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()


def test_broken_files_are_clear_errors(hf_model, tmp_path):
    bin_path = tmp_path / "model.bin"
    write_llmc(hf_model, bin_path)
    data = bin_path.read_bytes()
    cases = {
        "truncated.bin": (data[:-100], "truncated or not an llm.c"),
        "version.bin": (data[:4] + (7).to_bytes(4, "little") + data[8:], "version 7"),
        "tiny.bin": (data[:4], "neither a nanoGPT"),
        "noise.bin": (b"\x00" * 2000, "neither a nanoGPT"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            engine.load_model(tmp_path / name, device="cpu", dtype=torch.float32)
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a nanoGPT checkpoint"):
        engine.load_model(tmp_path / "other.pt", device="cpu")
    write_nanogpt(hf_model, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del ckpt["model"]["_orig_mod.transformer.h.1.mlp.c_fc.bias"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing tensor h.1.mlp.c_fc.bias"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.load_model(tmp_path / "missing.pt", device="cpu", dtype=torch.float32)
