"""llama.cpp as a CPU peer: greedy decode tok/s of a GGUF model at batch 1 and 8, timed like benchmarks.e2e.

    python -m benchmarks.peer_llama_cpp --gguf gpt2-q8_0.gguf gpt2-f16.gguf --threads 2

Not part of the test suite or of e2e's round-robin: llama-cpp-python has no wheel here and builds from
its source distribution (~20 minutes on 2 cores: ``pip install llama-cpp-python``), and its GGUF files
come from llama.cpp's ``convert_hf_to_gguf.py`` (in that source distribution, ``vendor/llama.cpp``):

    python -c "from pathlib import Path; from benchmarks.e2e import save_random_checkpoint; \
        from benchmarks.peer_ctranslate2 import save_gpt2_tokenizer; \
        save_gpt2_tokenizer(save_random_checkpoint('gpt2', Path('/tmp/gpt2')))"
    PYTHONPATH=vendor/llama.cpp/gguf-py python vendor/llama.cpp/convert_hf_to_gguf.py /tmp/gpt2 --outtype q8_0 \
        --outfile gpt2-q8_0.gguf

The same random weights as e2e (seed 0). Per batch: every row prefilled with its own random prompt in
one llama_decode, then ``new_tokens - 1`` steps of one llama_decode for all rows, each row's next token
the argmax of its logits (numpy over llama.cpp's logits buffer, as llama-cpp-python's own sampler reads
it). decode tok/s = rows x steps / the steps' time, medians of ``--repeats`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _context(llama_cpp, internals, model, rows: int, prompt_len: int, new_tokens: int, threads: int):
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = rows * (prompt_len + new_tokens) + 16
    params.n_batch = params.n_ubatch = max(512, rows * prompt_len)
    params.n_seq_max = rows
    params.kv_unified = True
    params.n_threads = params.n_threads_batch = threads
    return internals.LlamaContext(model=model, params=params, verbose=False)


def run_once(llama_cpp, internals, ctx, vocab: int, prompts: list[list[int]],
             new_tokens: int) -> tuple[float, list[int]]:
    """(decode seconds for new_tokens - 1 steps, row 0's tokens)."""
    rows = len(prompts)
    ctx.kv_cache_clear()
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
    for step in range(new_tokens - 1):
        b = batch.batch
        b.n_tokens = rows
        for seq in range(rows):
            b.token[seq], b.pos[seq], b.seq_id[seq][0], b.n_seq_id[seq], b.logits[seq] = \
                tokens[seq], len(prompts[0]) + step, seq, 1, True
        ctx.decode(batch)
        tokens = [argmax(seq) for seq in range(rows)]
        row0.append(tokens[0])
    return time.perf_counter() - start, row0


def main(argv=None):
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
            times = [run_once(llama_cpp, internals, ctx, vocab, prompts, args.new_tokens)[0]
                     for _ in range(args.repeats)]
            tok_s = rows * (args.new_tokens - 1) / statistics.median(times)
            print(f"llama.cpp {path.rsplit('/', 1)[-1]} batch {rows} threads {args.threads}: decode {tok_s:.1f} tok/s",
                  flush=True)
            ctx.close()


if __name__ == "__main__":
    main()
