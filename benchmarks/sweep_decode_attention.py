"""Decode attention's split count and keys per block: µs per call at each number of KV splits, to
place the boundary between one program per head and split-KV; with ``--blocks``, at each (keys per
block, warps) with the splits the rule picks, since one program per head walks its keys one block at
a time (a chain of dependent loads, exps and sums: 3.5 µs at 128 keys for 0.09 µs of bytes).

    python -m benchmarks.sweep_decode_attention            # GPU: decode_attention_splits
    python -m benchmarks.sweep_decode_attention --blocks   # GPU: decode_attention_blocks
    python -m benchmarks.sweep_decode_attention --smoke    # CPU: every setting checked, interpreter

Per (batch, heads, cache length) of GPT-2 decode (head dim 64, fp16, every row at the full length),
``gpt2kernels.decode_attention`` with its split count (or block settings) forced, each timed as
CUDA-graph replays of 8 calls over their own caches (device time; 8 caches exceed the L2 at batch 8).
``rule`` is the count ``decode_splits`` picks; ``now`` the block settings ``decode_settings`` picks.
On CPU (``--smoke``) every split count and block setting is checked against the reference on one
small case in the interpreter, and nothing is timed or written.
"""

from __future__ import annotations

import contextlib

import torch

from .kernel_cli import interpreted, parse  # before gpt2kernels: the interpreter on CPU
import gpt2kernels
import gpt2kernels.attention as kattention

from .report import write_results
from .roofline import copy_gbps
from .timing import graph_bench

CASES = [(1, 12), (1, 25), (8, 12), (8, 25)]  # (batch, heads): gpt2 and gpt2-xl
LENGTHS = [128, 256, 512, 1024]
SPLITS = [1, 2, 4, 8, 16, 32]
BLOCKS = [(16, 2), (32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8)]  # (keys per block, warps)
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


@contextlib.contextmanager
def forced_blocks(keys: int, warps: int):
    """decode_attention walking ``keys`` keys a block with ``warps`` warps whatever decode_settings says."""
    settings = kattention.decode_settings
    kattention.decode_settings = lambda d, dtype: (keys, warps)
    try:
        yield
    finally:
        kattention.decode_settings = settings


def _timed(q, caches, lens, want) -> float:
    """µs per decode_attention call, checked against the reference first."""
    got = gpt2kernels.decode_attention(q, caches[0][0], caches[0][1], lens, check_lens=False)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    return graph_bench(lambda: [gpt2kernels.decode_attention(q, c[0], c[1], lens, check_lens=False)
                                for c in caches], q.device)["ms"] * 1e3 / len(caches)


def main(argv=None):
    args, device, smoke = parse(__doc__, argv, lambda p: p.add_argument(
        "--blocks", action="store_true", help="sweep keys per block and warps, not split counts"))
    # The smoke case: one row of two heads, one length for one program per head and one for splits.
    cases, lengths, calls = ([(1, 2)], [130, 300], 1) if smoke else (CASES, LENGTHS, CALLS)
    roof = copy_gbps(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    rows = []
    for b, h in cases:
        for length in lengths:
            g = torch.Generator(device=device).manual_seed(length)
            caches = [torch.randn(2, b, h, length, 64, device=device, dtype=torch.float16, generator=g)
                      for _ in range(calls)]
            q = torch.randn(b, h, 1, 64, device=device, dtype=torch.float16, generator=g)
            lens = torch.full((b,), length, dtype=torch.int32, device=device)
            want = gpt2kernels.decode_attention_ref(q, caches[0][0], caches[0][1], lens)
            row = {"batch": b, "heads": h, "length": length, "rule": kattention.decode_splits(b * h, length, sms),
                   "now": "x".join(map(str, kattention.decode_settings(64, torch.float16))),
                   "kv_us": 2 * b * h * length * 64 * 2 / (roof * 1e3)}
            if args.blocks:
                for keys, warps in BLOCKS:
                    with forced_blocks(keys, warps):
                        row[f"k{keys}w{warps}_us"] = _timed(q, caches, lens, want)
            for splits in [] if args.blocks else SPLITS:
                if splits > 1 and length // splits < 64:
                    continue
                with forced_splits(splits):
                    row[f"s{splits}_us"] = _timed(q, caches, lens, want)
            print(row, flush=True)
            rows.append(row)
    if interpreted(device):
        return
    if args.blocks:
        cols = ["batch", "heads", "length", "rule", "now", "kv_us", *[f"k{k}w{w}_us" for k, w in BLOCKS]]
        write_results("decode_attention_blocks", device, rows, cols, {"copy_gbps": roof, "calls_per_graph": CALLS},
                      notes="µs per decode_attention call (fp16, D 64, one query per row, every row at `length`, "
                            "the splits the rule picks) walking k keys a block with w warps; now: the keys x warps "
                            "decode_settings picks; kv_us: the K+V bytes at the copy bandwidth measured in this run.")
        return
    cols = ["batch", "heads", "length", "rule", "kv_us", *[f"s{s}_us" for s in SPLITS]]
    write_results("decode_attention_splits", device, rows, cols, {"copy_gbps": roof, "calls_per_graph": CALLS},
                  notes="µs per decode_attention call (fp16, D 64, one query per row, every row at `length`) with "
                        "its KV split count forced; rule: the count decode_splits picks; kv_us: the K+V bytes at "
                        "the copy bandwidth measured in this run.")


if __name__ == "__main__":
    main()
