"""python -m engine.generate: streams text, prints stats, and turns every user mistake into one line."""

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.generate import main

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


def test_num_samples_are_labelled_and_each_equals_a_single_run_with_its_seed(tiny_checkpoint, capsys):
    args = ["--model", str(tiny_checkpoint), "--prompt", "x", "--max-new-tokens", "6", "--no-stop-at-eos"]
    assert main(args + ["--num-samples", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    samples = out.split("=== sample ")[1:]
    assert len(samples) == 3
    for i, sample in enumerate(samples):
        header, text = sample.split("\n", 1)
        assert header == f"{i + 1}/3, seed {1 + i} ==="
        assert main(args + ["--seed", str(1 + i)]) == 0
        assert capsys.readouterr().out == text.removesuffix("\n") if i < 2 else text


def test_echo_is_the_default_and_no_echo_prints_the_completion_alone(tiny_checkpoint, capsys):
    args = ["--model", str(tiny_checkpoint), "--prompt", "Once upon", "--max-new-tokens", "5", "--seed", "3",
            "--no-stop-at-eos"]
    assert main(args) == 0
    echoed = capsys.readouterr().out
    assert main(args + ["--no-echo"]) == 0
    alone = capsys.readouterr().out
    assert echoed == "Once upon" + alone and len(alone) > 1


def test_stdin_prompt_loses_the_newline_echo_adds(tiny_checkpoint, capsys):
    args = ["--model", str(tiny_checkpoint), "--max-new-tokens", "4", "--seed", "0", "--dtype", "float32"]
    r = _cli(*args, stdin="Piped in\n")
    assert r.returncode == 0, r.stderr
    assert main(args + ["--prompt", "Piped in"]) == 0
    assert r.stdout == capsys.readouterr().out


def test_an_unseeded_run_shows_a_seed_that_reproduces_it(tiny_checkpoint, capsys):
    import re
    args = ["--model", str(tiny_checkpoint), "--prompt", "x", "--max-new-tokens", "8", "--no-stop-at-eos"]
    assert main(args) == 0
    first = capsys.readouterr()
    seed = re.search(r"\] seed (\d+) \| load .* \| total \d+\.\d\d s$", first.err.strip()).group(1)
    assert main(args + ["--seed", seed]) == 0
    assert capsys.readouterr().out == first.out


def test_json_output_for_scripts(tiny_checkpoint, capsys):
    import json
    args = ["--model", str(tiny_checkpoint), "--prompt", "x", "--max-new-tokens", "5", "--seed", "4",
            "--no-stop-at-eos", "--threads", "1"]
    assert main(args + ["--no-echo", "--num-samples", "2"]) == 0
    streamed = capsys.readouterr()
    assert "1 thread]" in streamed.err
    assert main(args + ["--json", "--num-samples", "2"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.splitlines()[-1])
    assert captured.err == "" and len(captured.out.splitlines()) == 1
    assert [s["seed"] for s in result["samples"]] == [4, 5] and result["seed"] == 4 and result["threads"] == 1
    assert all(len(s["tokens"]) == 5 and s["finish_reason"] == "length" for s in result["samples"])
    texts = [s["text"] for s in result["samples"]]
    assert streamed.out == f"=== sample 1/2, seed 4 ===\n{texts[0]}\n\n=== sample 2/2, seed 5 ===\n{texts[1]}\n"
    assert result["prompt"] == "x" and result["prompt_tokens"] == 1 and result["new_tokens"] == 10
    assert result["total_seconds"] >= result["prefill_seconds"] + result["decode_seconds"] > 0


def test_ctrl_c_keeps_the_text_and_prints_the_stats():
    proc = subprocess.Popen([sys.executable, "-m", "engine.generate", "--model", "random:gpt2", "--dtype", "float32",
                             "--prompt", "Count:", "--max-new-tokens", "1000", "--no-stop-at-eos", "--seed", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.read(len("Count:") + 1).startswith("Count:")  # the echo and the first token are out
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    stats = err.strip().splitlines()[-1]
    assert stats.endswith("| interrupted") and "seed 2" in stats
    new = int(re.search(r"\| (\d+) new tok", stats).group(1))
    assert 1 <= new < 1000


def test_python_dash_m_engine_and_the_console_script_run_the_commands(tiny_checkpoint, capsys):
    from importlib.metadata import entry_points

    from engine.cli import entry
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("gpt2engine") == "engine.cli:entry", "reinstall: pip install -e ."
    for command, words in [("eval", "Perplexity"), ("serve", "Serve GPT-2")]:
        with pytest.raises(SystemExit) as e:
            entry([command, "--help"])
        assert e.value.code == 0 and words in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "engine", "--model", str(tiny_checkpoint), "--prompt", "hi",
                        "--max-new-tokens", "2", "--seed", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("hi") and "seed 0" in r.stderr, r.stderr
    script = Path(sys.executable).with_name("gpt2engine")
    r = subprocess.run([str(script), "eval", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: gpt2engine eval" in r.stdout and "examples:" in r.stdout
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: gpt2engine generate" in r.stdout and "(default: 100)" in r.stdout


def test_importing_the_cli_module_keeps_engine_generate_the_function():
    code = ("from engine.generate import main; import engine.generate; import engine; "
            "assert engine.generate.__module__ == 'engine.generation', engine.generate; "
            "from engine import generate; assert callable(generate) and generate is engine.generation.generate")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_output_the_terminal_cannot_encode_is_replaced(tiny_checkpoint):
    r = _cli("--model", str(tiny_checkpoint), "--prompt", "日本 café", "--max-new-tokens", "3", "--seed", "0",
             env={"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and r.stdout.startswith("?? caf?"), r.stderr


def test_broken_checkpoints_are_one_line_and_warnings_too(tiny_checkpoint, tmp_path, capsys):
    import json

    import torch
    from safetensors.torch import load_file, save_file
    state = load_file(tiny_checkpoint / "model.safetensors")
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    cases = {
        "nan": (config, {**state, "transformer.h.0.ln_1.weight": torch.full((96,), float("nan"))},
                "h.0.ln_1.weight holds NaN"),
        "list": ([config], state, "must hold a JSON object"),
        "types": ({**config, "n_head": "3"}, state, "n_head must be an integer, got '3'"),
    }
    for name, (cfg, tensors, match) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        save_file(tensors, tmp_path / name / "model.safetensors")
        assert main(["--model", str(tmp_path / name), "--prompt", "hi"]) == 2
        assert match in _one_clean_line(capsys.readouterr().err)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    torch.save({**state, "args": argparse.Namespace(lr=1)}, pickled / "pytorch_model.bin")
    assert main(["--model", str(pickled), "--prompt", "hi"]) == 2
    assert "holds Python objects besides tensors" in _one_clean_line(capsys.readouterr().err)
    padded = tmp_path / "padded"
    padded.mkdir()
    (padded / "config.json").write_text(json.dumps({**config, "vocab_size": 50304}))
    save_file({**state, "transformer.wte.weight": torch.randn(50304, 96) * 0.02}, padded / "model.safetensors")
    r = _cli("--model", str(padded), "--prompt", "hi", "--max-new-tokens", "2")
    warning = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert r.returncode == 0 and len(warning) == 1 and "decode to nothing" in warning[0], r.stderr


@pytest.mark.parametrize("args,match", [
    (["--top-p", "1.5"], "--top-p must be in"),
    (["--top-p", "0"], "--top-p must be in"),
    (["--temperature", "-1"], "--temperature must be"),
    (["--temperature", "nan"], "--temperature must be"),
    (["--top-k", "-3"], "--top-k must be"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be"),
    (["--max-new-tokens", "200"], "more than the model's context of 128"),
    (["--seed", str(2**64)], "--seed must be an integer in [0, 2^64)"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2^64)"),
    (["--device", "meta"], "device meta is not supported: use cpu or cuda"),
    (["--device", "mps"], "device mps is not supported"),
    (["--threads", "0"], "--threads must be an integer >= 1"),
    (["--dtype", "int8"], "invalid choice"),
    (["--quantize", "int4"], "argument --quantize: invalid choice: 'int4' (choose from 'int8', 'int8-all')"),
    (["--quantize", ""], "argument --quantize: invalid choice"),
    (["--backend", "cuda"], "invalid choice"),
    (["--device", "cuda:7"], "cuda"),
    (["--bogus-flag"], "unrecognized arguments"),
    (["--max-new-tokens", "abc"], "--max-new-tokens must be an integer >= 1, got 'abc'"),
    (["--top-p", "x"], "--top-p must be a number in (0, 1], got 'x'"),
    (["--seed", "x"], "--seed must be an integer in [0, 2^64), got 'x'"),
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
    assert " cpu eager, " in default.err and "] seed 1 | load" in default.err
    assert "graph" not in default.err
    assert main(args + ["--no-cuda-graph"]) == 0  # accepted on CPU too, where it changes nothing
    assert capsys.readouterr().out == default.out


def test_triton_without_a_gpu_is_one_line():
    r = _cli("--model", "random:gpt2", "--prompt", "hi", "--backend", "triton", env={"TRITON_INTERPRET": "0"})
    assert r.returncode == 2 and "the triton backend needs a CUDA device" in _one_clean_line(r.stderr)


@pytest.mark.parametrize("command", ["engine.generate", "engine.eval"])
def test_text_that_is_not_utf8_is_refused_wherever_it_comes_from(tmp_path, command):
    """Stdin used to be decoded with replacement ('caf? ??') where --prompt-file refused the same
    bytes. Read before the model loads: the unknown model name is never reached."""
    bad = b"caf\xe9 \xff\xfe"
    path = tmp_path / "bad.txt"
    path.write_bytes(bad)
    option = "--prompt-file" if command == "engine.generate" else "--text-file"
    sources = [([], bad, "standard input"), ([option, str(path)], None, f"{option} {path}")]
    if command == "engine.generate":
        sources.append((["--prompt", bad], None, "--prompt"))  # argv bytes, as a shell passes them
    for args, stdin, source in sources:
        r = subprocess.run([sys.executable, "-m", command, "--model", "gpt5", *args], input=stdin or b"",
                           capture_output=True, cwd=ROOT, timeout=300)
        line = _one_clean_line(r.stderr.decode())
        assert r.returncode == 2 and line == (f"error: {source} is not UTF-8 text: byte 0xe9 at offset 3 "
                                              "(invalid continuation byte)"), line


def test_an_empty_prompt_is_said_in_one_line_from_every_source(tiny_checkpoint, tmp_path):
    """From --prompt "", an empty file or empty stdin alike: a note, then text from <|endoftext|>."""
    args = ["--model", str(tiny_checkpoint), "--max-new-tokens", "3", "--seed", "0", "--dtype", "float32"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    runs = {"--prompt": _cli(*args, "--prompt", ""), f"--prompt-file {empty}": _cli(*args, "--prompt-file", str(empty)),
            "standard input": _cli(*args, stdin="")}
    for source, r in runs.items():
        assert r.returncode == 0, r.stderr
        notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
        assert notes == [f"note: the prompt ({source}) is empty: generating from <|endoftext|>"], r.stderr
        assert r.stdout == runs["--prompt"].stdout and r.stdout.strip()


@pytest.mark.parametrize("command", [["-m", "engine.generate"], ["-m", "engine", "eval"], ["gpt2engine", "serve"]])
def test_ctrl_c_while_starting_exits_130_without_a_traceback(command):
    """Sent while the command still imports torch and Triton (its first second or two; later, the
    model load): 'interrupted' and 130, as a Ctrl-C during generation, never a KeyboardInterrupt
    traceback from inside an import."""
    argv = [sys.executable, *command] if command[0] == "-m" else [str(Path(sys.executable).with_name(command[0])),
                                                                   *command[1:]]
    for delay in (0.3, 0.8):
        proc = subprocess.Popen(argv + ["--model", "random:gpt2"], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "Traceback" not in err and err.strip() == "interrupted", (delay, err)


def test_importing_engine_leaves_ctrl_c_alone(tmp_path):
    """Only our commands exit on Ctrl-C while starting; a program importing engine keeps Python's
    handler, also one run as ``python -m theirs`` whose package imports engine."""
    code = "import signal, engine; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "__init__.py").write_text("import engine\n")
    (tmp_path / "theirs" / "__main__.py").write_text(code + "\n")
    for argv in (["-c", code], ["-m", "theirs"]):
        r = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.stdout.strip() == "True", (argv, r.stderr)


@pytest.mark.parametrize("word,hint", [("evaluate", "did you mean 'eval'? "), ("gen", "did you mean 'generate'? "),
                                       ("Hello", "")])
def test_an_unknown_command_is_one_line_with_a_suggestion(word, hint):
    from engine.cli import entry

    r = subprocess.run([sys.executable, "-m", "engine", word, "--model", "gpt2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and _one_clean_line(r.stderr) == (
        f"error: unknown command '{word}': {hint}commands: generate, eval, serve (generate is the default: "
        "give its prompt with --prompt)")
    assert entry([word]) == 2


@pytest.mark.parametrize("command", [[], ["generate"], ["eval"], ["serve"]])
def test_version(command, capsys):
    import torch

    from engine.cli import entry

    with pytest.raises(SystemExit) as e:
        entry([*command, "--version"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and re.fullmatch(r"gpt2engine \S+ \(torch \S+, triton \S+, Python 3\.\d+\.\d+\)\n", out)
    assert f"torch {torch.__version__}" in out
