"""Decode attention's split count: µs per call at each number of KV splits, to place the boundary
between one program per head and split-KV.

    python -m benchmarks.sweep_decode_attention         # GPU

Per (batch, heads, cache length) of GPT-2 decode (head dim 64, fp16, every row at the full length),
``gpt2kernels.decode_attention`` with its split count forced to 1, 2, 4, ... 32, each timed as CUDA-graph
replays of 8 calls over their own caches (device time; 8 caches exceed the L2 at batch 8). ``rule`` is
the count ``decode_splits`` picks. Needs a GPU.
"""

from __future__ import annotations

import contextlib

import torch

import gpt2kernels
import gpt2kernels.attention as kattention

from .report import write_results
from .roofline import copy_gbps
from .timing import graph_bench

CASES = [(1, 12), (1, 25), (8, 12), (8, 25)]  # (batch, heads): gpt2 and gpt2-xl
LENGTHS = [128, 256, 512, 1024]
SPLITS = [1, 2, 4, 8, 16, 32]
CALLS = 8


@contextlib.contextmanager
def forced_splits(splits: int):
    """decode_attention with ``splits`` KV splits whatever its rule says."""
    rule = kattention.decode_splits
    kattention.decode_splits = lambda rows, max_len, sms: splits
    try:
        yield
    finally:
        kattention.decode_splits = rule


def main():
    if not torch.cuda.is_available():
        print("sweep_decode_attention needs a GPU: nothing measured")
        return
    roof = copy_gbps("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for b, h in CASES:
        for length in LENGTHS:
            g = torch.Generator(device="cuda").manual_seed(length)
            caches = [torch.randn(2, b, h, length, 64, device="cuda", dtype=torch.float16, generator=g)
                      for _ in range(CALLS)]
            q = torch.randn(b, h, 1, 64, device="cuda", dtype=torch.float16, generator=g)
            lens = torch.full((b,), length, dtype=torch.int32, device="cuda")
            want = gpt2kernels.decode_attention_ref(q, caches[0][0], caches[0][1], lens)
            row = {"batch": b, "heads": h, "length": length, "rule": kattention.decode_splits(b * h, length, sms),
                   "kv_us": 2 * b * h * length * 64 * 2 / (roof * 1e3)}
            for splits in SPLITS:
                if splits > 1 and length // splits < 64:
                    continue
                with forced_splits(splits):
                    got = gpt2kernels.decode_attention(q, caches[0][0], caches[0][1], lens, check_lens=False)
                    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
                    us = graph_bench(lambda: [gpt2kernels.decode_attention(q, c[0], c[1], lens, check_lens=False)
                                              for c in caches], "cuda")["ms"] * 1e3 / CALLS
                row[f"s{splits}_us"] = us
            print(row, flush=True)
            rows.append(row)
    cols = ["batch", "heads", "length", "rule", "kv_us", *[f"s{s}_us" for s in SPLITS]]
    write_results("decode_attention_splits", "cuda", rows, cols, {"copy_gbps": roof, "calls_per_graph": CALLS},
                  notes="µs per decode_attention call (fp16, D 64, one query per row, every row at `length`) with "
                        "its KV split count forced; rule: the count decode_splits picks; kv_us: the K+V bytes at "
                        "the copy bandwidth measured in this run.")


if __name__ == "__main__":
    main()
