"""CPU decode with one core kept busy by another process, against the same machine quiet.

    python -m benchmarks.busy_cpu [--models gpt2] [--dtypes fp32 int8-all] [--new-tokens 64] [--repeats 3]

Ours (each dtype, batch 1, greedy) and HF transformers fp32, all on the same random weights, in
rounds: every implementation quiet, then every implementation while a second Python process spins
on one core (``while True: pass``), each phase after an unmeasured generate of ours that lets the
thread choice settle; medians per (implementation, condition), and busy / quiet per implementation.
Our CPU steps run on the cores other processes leave free (``engine.core.cpu_threads``); HF runs at
PyTorch's thread count.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .e2e import HF, Ours, save_random_checkpoint
from .report import write_results

SPIN = "while True: pass"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "int8-all"], help="ours; HF runs fp32")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="busy_cpu")
    args = p.parse_args(argv)
    device = torch.device("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ckpt = save_random_checkpoint(name, Path(tmp) / name)
            runners = [Ours(ckpt, device, d, "eager") for d in args.dtypes] + [HF(ckpt, device, "fp32", "hf")]
            ids = torch.randint(0, 50257, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
            for r in runners:
                r.measure(ids, args.new_tokens)  # warm-up
            samples = {}
            for _ in range(args.repeats):
                for condition in ("quiet", "busy"):
                    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if condition == "busy" else None
                    try:
                        # The thread choice follows the load after two readings a second apart, taken
                        # during steps: an unmeasured generate of ~2 s lets it settle in each phase.
                        time.sleep(0.5)
                        runners[0].measure(ids, args.new_tokens)
                        for r in runners:
                            samples.setdefault((r.impl, r.dtype, condition), []).append(
                                r.measure(ids, args.new_tokens)[1])
                    finally:
                        if spinner:
                            spinner.kill()
                            spinner.wait()
            for r in runners:
                quiet = statistics.median(samples[r.impl, r.dtype, "quiet"])
                busy = statistics.median(samples[r.impl, r.dtype, "busy"])
                rows.append({"model": name, "impl": r.impl, "dtype": r.dtype, "quiet_tok_s": quiet,
                             "busy_tok_s": busy, "busy_over_quiet": busy / quiet})
                print(rows[-1], flush=True)
    write_results(args.name, device, rows, ["model", "impl", "dtype", "quiet_tok_s", "busy_tok_s", "busy_over_quiet"],
                  {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": 1,
                   "busy": f"one process running `{SPIN}`", "threads": torch.get_num_threads()},
                  notes="decode tok/s at batch 1, greedy, medians of rounds that alternate quiet and busy; "
                        "ours: engine.generate (its CPU steps on the cores others leave free); hf: generate.")


if __name__ == "__main__":
    main()
