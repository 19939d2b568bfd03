"""llama.cpp as a CPU peer: greedy decode tok/s of a GGUF model at batch 1 and 8, timed like benchmarks.e2e.

A row group of ``benchmarks.e2e`` on CPU (impl ``llama.cpp``, dtypes ``q8_0`` and ``f16``) when
llama-cpp-python is installed and e2e is told where llama.cpp's converter is; standalone too:

    python -m benchmarks.e2e --models gpt2 --dtypes fp32 int8-all q8_0 f16 \
        --llama-convert vendor/llama.cpp/convert_hf_to_gguf.py
    python -m benchmarks.peer_llama_cpp --gguf gpt2-q8_0.gguf gpt2-f16.gguf --threads 2

llama-cpp-python has no wheel here and builds from its source distribution (~17 minutes on 2
cores: ``pip wheel --no-deps llama-cpp-python``); the converter and its ``gguf`` package are in
that distribution (``vendor/llama.cpp/convert_hf_to_gguf.py``, ``vendor/llama.cpp/gguf-py``:
``pip download --no-deps --no-binary :all: llama-cpp-python``). ``convert`` writes the GGUF of the
same random weights e2e saves (seed 0), with GPT-2's tokenizer files beside them.

Per batch: every row prefilled with its own prompt in one llama_decode, then ``new_tokens - 1``
steps of one llama_decode for all rows, each row's next token the argmax of its logits (numpy over
llama.cpp's logits buffer, as llama-cpp-python's own sampler reads it). decode tok/s = rows x
steps / the steps' time. In e2e each measurement runs in a fresh process (like CTranslate2's):
llama.cpp's thread pool then never competes with PyTorch's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OUTTYPES = ("q8_0", "f16")


def convert(ckpt: Path, outtype: str, converter: Path) -> Path:
    """The GGUF (``outtype``: q8_0 or f16) of an HF checkpoint directory, written once beside it by
    llama.cpp's ``convert_hf_to_gguf.py`` (``converter``) with its own gguf-py."""
    from .peer_ctranslate2 import save_gpt2_tokenizer

    out = Path(ckpt).parent / f"{Path(ckpt).name}-{outtype}.gguf"
    if not out.exists():
        if not (Path(ckpt) / "vocab.json").exists():
            save_gpt2_tokenizer(ckpt)
        env = {**os.environ, "PYTHONPATH": str(Path(converter).parent / "gguf-py")}
        r = subprocess.run([sys.executable, str(converter), str(ckpt), "--outtype", outtype, "--outfile", str(out)],
                           env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"llama.cpp's converter failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return out


def measure(gguf: Path, threads: int, ids: list[list[int]], new_tokens: int) -> tuple[float, float, list[int], float]:
    """(prefill ms, decode tok/s summed over the rows, row 0's tokens, load s), in a fresh process:
    a warm-up run, then the timed one."""
    from .peer_ctranslate2 import measure_in_process

    return measure_in_process("llama.cpp", ["benchmarks.peer_llama_cpp", "--worker", str(gguf), str(threads),
                                            str(new_tokens)], ids)


def _worker(gguf: str, threads: int, new_tokens: int) -> None:
    import llama_cpp
    from llama_cpp import _internals as internals

    prompts = json.loads(sys.stdin.read())
    llama_cpp.llama_backend_init()
    start = time.perf_counter()
    model = internals.LlamaModel(path_model=gguf, params=llama_cpp.llama_model_default_params(), verbose=False)
    ctx = _context(llama_cpp, internals, model, len(prompts), len(prompts[0]), new_tokens, threads)
    load_s = time.perf_counter() - start
    run_once(llama_cpp, internals, ctx, model.n_vocab(), prompts, new_tokens)  # warm-up: the timed call
    prefill_s, decode_s, tokens = run_once(llama_cpp, internals, ctx, model.n_vocab(), prompts, new_tokens)
    ctx.close()
    print(json.dumps({"prefill_ms": prefill_s * 1e3, "decode_tok_s": len(prompts) * (new_tokens - 1) / decode_s,
                      "tokens": tokens, "load_s": load_s}))


def _context(llama_cpp, internals, model, rows: int, prompt_len: int, new_tokens: int, threads: int):
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = rows * (prompt_len + new_tokens) + 16
    params.n_batch = params.n_ubatch = max(512, rows * prompt_len)
    params.n_seq_max = rows
    params.kv_unified = True
    params.n_threads = params.n_threads_batch = threads
    return internals.LlamaContext(model=model, params=params, verbose=False)


def run_once(llama_cpp, internals, ctx, vocab: int, prompts: list[list[int]],
             new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds: the prompts and the first tokens, decode seconds for new_tokens - 1 steps,
    row 0's tokens)."""
    rows = len(prompts)
    ctx.kv_cache_clear()
    prefill_start = time.perf_counter()
    batch = internals.LlamaBatch(n_tokens=max(512, rows * len(prompts[0])), embd=0, n_seq_max=rows, verbose=False)
    for seq, prompt in enumerate(prompts):
        batch.add_sequence(prompt, seq, logits_all=False)
    ctx.decode(batch)
    last = [(seq + 1) * len(prompts[0]) - 1 for seq in range(rows)]  # each row's logits index

    def argmax(i: int) -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, i), shape=(vocab,)).argmax())

    tokens = [argmax(i) for i in last]
    row0 = [tokens[0]]
    start = time.perf_counter()
    prefill = start - prefill_start
    for step in range(new_tokens - 1):
        b = batch.batch
        b.n_tokens = rows
        for seq in range(rows):
            b.token[seq], b.pos[seq], b.seq_id[seq][0], b.n_seq_id[seq], b.logits[seq] = \
                tokens[seq], len(prompts[0]) + step, seq, 1, True
        ctx.decode(batch)
        tokens = [argmax(seq) for seq in range(rows)]
        row0.append(tokens[0])
    return prefill, time.perf_counter() - start, row0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # one measurement for e2e: ``measure``
        return _worker(argv[1], int(argv[2]), int(argv[3]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", nargs="+", required=True)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    import llama_cpp
    from llama_cpp import _internals as internals

    llama_cpp.llama_backend_init()
    for path in args.gguf:
        model = internals.LlamaModel(path_model=path, params=llama_cpp.llama_model_default_params(), verbose=False)
        vocab = model.n_vocab()
        for rows in args.batch:
            rng = np.random.default_rng(rows)
            prompts = [[int(t) for t in rng.integers(0, vocab, args.prompt_len)] for _ in range(rows)]
            ctx = _context(llama_cpp, internals, model, rows, args.prompt_len, args.new_tokens, args.threads)
            run_once(llama_cpp, internals, ctx, vocab, prompts, args.new_tokens)  # warm-up
            times = [run_once(llama_cpp, internals, ctx, vocab, prompts, args.new_tokens)[1]
                     for _ in range(args.repeats)]
            tok_s = rows * (args.new_tokens - 1) / statistics.median(times)
            print(f"llama.cpp {path.rsplit('/', 1)[-1]} batch {rows} threads {args.threads}: decode {tok_s:.1f} tok/s",
                  flush=True)
            ctx.close()


if __name__ == "__main__":
    main()
