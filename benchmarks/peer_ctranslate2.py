"""CTranslate2 as a CPU peer of benchmarks.e2e: conversion of the shared checkpoint, and one measurement per process.

Each measurement runs in a fresh process (``python -m benchmarks.peer_ctranslate2 ...``, ids as JSON on
stdin, results as JSON on stdout): CTranslate2 ships its own OpenMP runtime, whose idle threads kept
competing with PyTorch's after its runs. In one process, our int8 decode fell from ~100 to ~60 tok/s
once CTranslate2 had generated, and stayed there (2-core EPYC); OMP_WAIT_POLICY=PASSIVE cured that
but slowed PyTorch's many small ops by a third. A process per measurement gives each engine the
machine alone and its default threading, while the round-robin still spreads drift over both.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def convert(ckpt: Path) -> Path:
    """The CTranslate2 model directory for an HF checkpoint (converted once, beside it)."""
    from ctranslate2.converters import TransformersConverter

    out = Path(ckpt).parent / f"{Path(ckpt).name}-ct2"
    if not (out / "model.bin").exists():
        save_gpt2_tokenizer(ckpt)
        TransformersConverter(str(ckpt)).convert(str(out), force=True)
    return out


def save_gpt2_tokenizer(ckpt) -> None:
    """GPT-2's tokenizer files beside the checkpoint (the converter reads its vocabulary), from the
    encoder.json / vocab.bpe that the engine's offline tokenizer uses.

    Written as HF's own GPT-2 files (vocab.json, merges.txt), which every transformers version the
    test extra allows reads; GPT2Tokenizer's constructor is not used, since it took file paths
    before transformers 5 and takes the vocabulary itself since. Loading and saving them back adds
    the installed version's tokenizer_config.json and special tokens."""
    from transformers import GPT2Tokenizer

    from engine.tokenizer import bpe_files

    files = bpe_files()
    ckpt = Path(ckpt)
    (ckpt / "vocab.json").write_bytes(files["encoder.json"])
    (ckpt / "merges.txt").write_bytes(files["vocab.bpe"])
    GPT2Tokenizer.from_pretrained(ckpt).save_pretrained(ckpt)


def measure(model_dir: Path, ckpt: Path, compute_type: str, threads: int, ids: list[list[int]],
            new_tokens: int) -> tuple[float, float, list[int], float]:
    """(prefill ms, decode tok/s summed over the rows, row 0's tokens, load s), measured in a fresh process."""
    return measure_in_process("CTranslate2", ["benchmarks.peer_ctranslate2", str(model_dir), str(ckpt), compute_type,
                                              str(threads), str(new_tokens)], ids)


def measure_in_process(peer: str, module_args: list[str], ids: list[list[int]]
                       ) -> tuple[float, float, list[int], float]:
    """Run ``python -m *module_args`` with the prompts' ids as JSON on stdin; its last stdout line is
    a JSON object with prefill_ms, decode_tok_s, tokens and load_s, returned in that order. A
    failure raises RuntimeError naming ``peer`` and its last line of stderr."""
    r = subprocess.run([sys.executable, "-m", *module_args], input=json.dumps(ids), capture_output=True, text=True,
                       check=False, cwd=Path(__file__).resolve().parents[1])
    if r.returncode != 0:
        raise RuntimeError(f"{peer} worker failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["prefill_ms"], out["decode_tok_s"], out["tokens"], out["load_s"]


def _worker(argv: list[str]) -> None:
    import ctranslate2
    from transformers import GPT2Tokenizer

    model_dir, ckpt, compute_type, threads, new_tokens = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4])
    ids = json.loads(sys.stdin.read())
    start = time.perf_counter()
    generator = ctranslate2.Generator(model_dir, device="cpu", compute_type=compute_type, intra_threads=threads)
    load_s = time.perf_counter() - start
    prompts = [GPT2Tokenizer.from_pretrained(ckpt).convert_ids_to_tokens(row) for row in ids]

    def generate(n):
        return generator.generate_batch(prompts, max_length=n, min_length=n, sampling_topk=1,
                                        include_prompt_in_result=False, end_token=[])

    generate(new_tokens)  # warm-up: the very call that is timed
    start = time.perf_counter()
    generate(1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = generate(new_tokens)
    full = time.perf_counter() - start
    print(json.dumps({"prefill_ms": first * 1e3, "decode_tok_s": len(ids) * (new_tokens - 1) / (full - first),
                      "tokens": out[0].sequences_ids[0], "load_s": load_s}))


if __name__ == "__main__":
    _worker(sys.argv[1:])
