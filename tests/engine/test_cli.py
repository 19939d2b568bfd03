"""python -m engine.generate: streams text, prints stats, and turns every user mistake into one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, stdin=None, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "engine.generate", *args], capture_output=True, text=True,
                          input=stdin, cwd=ROOT, env=env, timeout=300)


def _one_clean_line(stderr):
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_generates_random_gpt2_with_network_off():
    r = _cli("--model", "random:gpt2", "--prompt", "Hello", "--max-new-tokens", "8", "--seed", "0",
             env={"HF_HUB_OFFLINE": "1", "TIKTOKEN_CACHE_DIR": "", "HTTPS_PROXY": "http://127.0.0.1:9"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "decode" in r.stderr and "tok/s" in r.stderr and "prefill" in r.stderr


def test_prompt_from_stdin_and_file(tiny_checkpoint, tmp_path, capsys):
    args = ["--model", str(tiny_checkpoint), "--max-new-tokens", "5", "--temperature", "0", "--dtype", "float32"]
    f = tmp_path / "prompt.txt"
    f.write_text("From a file 日本")
    assert main(args + ["--prompt-file", str(f)]) == 0
    from_file = capsys.readouterr().out
    assert main(args + ["--prompt", "From a file 日本"]) == 0
    assert capsys.readouterr().out == from_file
    r = _cli(*args, stdin="From a file 日本")
    assert r.returncode == 0 and r.stdout == from_file


def test_sampling_controls_and_stop(tiny_checkpoint, capsys):
    args = ["--model", str(tiny_checkpoint), "--prompt", "x", "--max-new-tokens", "30", "--temperature", "0",
            "--dtype", "float32", "--no-stop-at-eos"]
    assert main(args) == 0
    full = capsys.readouterr().out
    stop = full[6:9]
    assert main(args + ["--stop", stop, "--stop", "\x01", "--repetition-penalty", "1.0", "--min-p", "0.0"]) == 0
    assert capsys.readouterr().out == full[:full.index(stop)] + "\n"
    assert main(args + ["--frequency-penalty", "2", "--presence-penalty", "1"]) == 0
    assert capsys.readouterr().out != full


def test_num_samples(tiny_checkpoint, capsys):
    assert main(["--model", str(tiny_checkpoint), "--prompt", "x", "--max-new-tokens", "4",
                 "--num-samples", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== sample") == 3


@pytest.mark.parametrize("args,match", [
    (["--top-p", "1.5"], "--top-p must be in"),
    (["--top-p", "0"], "--top-p must be in"),
    (["--temperature", "-1"], "--temperature must be"),
    (["--temperature", "nan"], "--temperature must be"),
    (["--top-k", "-3"], "--top-k must be"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be"),
    (["--max-new-tokens", "200"], "exceeds the model's context of 128 positions"),
    (["--dtype", "int8"], "invalid choice"),
    (["--backend", "cuda"], "invalid choice"),
    (["--device", "cuda:7"], "cuda"),
    (["--bogus-flag"], "unrecognized arguments"),
    (["--max-new-tokens", "abc"], "--max-new-tokens must be an integer >= 1, got 'abc'"),
    (["--top-p", "x"], "--top-p must be a number in (0, 1], got 'x'"),
    (["--seed", "x"], "invalid int value"),
    (["--min-p", "1.5"], "--min-p must be in [0, 1]"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be in (0, inf), got 0"),
    (["--presence-penalty", "3"], "--presence-penalty must be in [-2, 2]"),
    (["--frequency-penalty", "x"], "--frequency-penalty must be a number in [-2, 2]"),
    (["--stop", ""], "stop must be a non-empty string"),
    (["--max-time", "-1"], "--max-time must be in (0, inf), got -1"),
    (["--temperature", "inf"], "--temperature must be in [0, inf), got inf"),
])
def test_user_mistakes_are_one_line(tiny_checkpoint, capsys, args, match):
    assert main(["--model", str(tiny_checkpoint), "--prompt", "hi"] + args) == 2
    captured = capsys.readouterr()
    assert match in _one_clean_line(captured.err) and captured.out == ""


@pytest.mark.parametrize("model,match", [
    ("gpt5", "unknown model name 'gpt5'"),
    ("random:gpt2-huge", "unknown model name"),
    ("./no/such/dir", "does not exist"),
    ("openai-community/gpt2-large", "not in the local Hugging Face cache"),
])
def test_bad_models_are_one_line(model, match):
    r = _cli("--model", model, "--prompt", "hi", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": "/nonexistent"})
    assert r.returncode == 2 and match in _one_clean_line(r.stderr)


def test_corrupt_checkpoint_is_one_line(tiny_checkpoint, tmp_path):
    (tmp_path / "config.json").write_bytes((tiny_checkpoint / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes((tiny_checkpoint / "model.safetensors").read_bytes()[:5000])
    r = _cli("--model", str(tmp_path), "--prompt", "hi")
    assert r.returncode == 2 and "corrupt or truncated" in _one_clean_line(r.stderr)


def test_missing_prompt_file_is_one_line(capsys):
    assert main(["--model", "random:gpt2", "--prompt-file", "/no/such/file"]) == 2
    assert "cannot read --prompt-file" in _one_clean_line(capsys.readouterr().err)


def test_cpu_defaults_to_eager_without_graphs(tiny_checkpoint, capsys):
    args = ["--model", str(tiny_checkpoint), "--prompt", "x", "--max-new-tokens", "3", "--seed", "1"]
    assert main(args) == 0
    default = capsys.readouterr()
    assert " eager] load" in default.err and "graph" not in default.err
    assert main(args + ["--no-cuda-graph"]) == 0  # accepted on CPU too, where it changes nothing
    assert capsys.readouterr().out == default.out


def test_triton_without_a_gpu_is_one_line():
    r = _cli("--model", "random:gpt2", "--prompt", "hi", "--backend", "triton", env={"TRITON_INTERPRET": "0"})
    assert r.returncode == 2 and "the triton backend needs a CUDA device" in _one_clean_line(r.stderr)
