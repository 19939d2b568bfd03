"""Every benchmark runs end to end at small sizes on CPU, so a GPU session finds it working."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.report import device_slug
import engine

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [
    ["benchmarks.bench_layernorm", "--smoke"],
    ["benchmarks.bench_linear", "--smoke"],
    ["benchmarks.bench_decode_layer", "--smoke"],
    ["benchmarks.bench_attention", "--smoke"],
    ["benchmarks.bench_sampling", "--smoke"],
    ["benchmarks.bench_sampling", "--smoke", "--sweep"],
    ["benchmarks.bench_cross_entropy", "--smoke"],
    ["benchmarks.bench_backward", "--smoke"],
    ["benchmarks.bench_train", "--smoke"],
    ["benchmarks.sweep_decode_gemv", "--smoke"],
    ["benchmarks.sweep_decode_attention", "--smoke"],
    ["benchmarks.sweep_decode_attention", "--smoke", "--blocks"],
    ["benchmarks.serve_load", "--smoke"],
    ["benchmarks.e2e", "--models", "gpt2", "--dtypes", "fp32", "--batch", "1", "2", "--prompt-len", "5",
     "--new-tokens", "4", "--repeats", "1"],
])
def test_benchmark_runs(args, tmp_path):
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if args[0] == "benchmarks.e2e":  # written under the device it ran on: cpu/, or the GPU's name
        device = device_slug("cuda" if torch.cuda.is_available() else "cpu")
        assert (tmp_path / device / "e2e.json").exists() and (tmp_path / device / "e2e.md").exists()
        rows = json.loads((tmp_path / device / "e2e.json").read_text())["rows"]
        sampled = [r for r in rows if r["sampling"] == "T=0.8,top_k=50,top_p=0.95"]
        assert sampled and all(r["batch"] == 1 and r["sampled_vs_greedy"] > 0 for r in sampled)
        assert {r["impl"] for r in sampled} <= {r["impl"] for r in rows if r["sampling"] == "greedy"}


def test_the_peers_gpt2_tokenizer_is_ours(tmp_path):
    """save_gpt2_tokenizer writes files that HF's GPT2Tokenizer reads back as GPT-2's own BPE
    (it used to call a constructor whose arguments changed in transformers 5)."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer, GPT2Tokenizer

    from benchmarks.peer_ctranslate2 import save_gpt2_tokenizer

    save_gpt2_tokenizer(tmp_path)
    text = "Hello, my name is 日本 <|endoftext|> café\\n\\n  spaces"
    for tokenizer in (GPT2Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert tokenizer.encode(text) == engine.encode(text, allow_special=True), type(tokenizer)
        assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256


def test_llama_cpp_rows_only_where_it_runs(tmp_path):
    """llama.cpp runs only its own formats, and only they run on it; without llama-cpp-python or
    its converter its rows are left out with the reason (as CTranslate2's are)."""
    from benchmarks import e2e

    cpu = torch.device("cpu")
    assert e2e.applies("llama.cpp", "q8_0", cpu) and e2e.applies("llama.cpp", "f16", cpu)
    assert not e2e.applies("llama.cpp", "fp16", cpu) and not e2e.applies("eager", "q8_0", cpu)
    assert not e2e.applies("hf", "f16", cpu) and not e2e.applies("ct2", "q8_0", cpu)
    why = e2e.missing_peers(["eager", "llama.cpp"], str(tmp_path / "no_such_converter.py"))
    assert set(why) == {"llama.cpp"} and ("not installed" in why["llama.cpp"] or "--llama-convert" in why["llama.cpp"])
    config = engine.CONFIGS["gpt2"]  # q8_0: 34 bytes per 32 weights; f16 2 bytes and an f16 cache in both
    weights = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 50257 * 768
    assert e2e.llama_step_bytes(config, "q8_0", 1, 0) == pytest.approx(weights * 34 / 32)
    assert e2e.llama_step_bytes(config, "f16", 2, 10) == pytest.approx(2 * weights + 2 * 2 * 12 * 10 * 768 * 2)
