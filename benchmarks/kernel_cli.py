"""What every kernel benchmark shares: interpreter set-up on CPU, the --smoke flag, row printing.

Import this before ``gpt2kernels``: without CUDA it switches the Triton interpreter on, so the
benchmarks run (slowly, at small sizes) on CPU and are known to work before a GPU is lent.
"""

from __future__ import annotations

import argparse
import os

import torch

from . import timing

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before gpt2kernels defines its @triton.jit functions


def parse(doc: str, argv=None, add_arguments=None,
          real_cpu_timings: bool = False) -> tuple[argparse.Namespace, torch.device, bool]:
    """(args, device, smoke): smoke is forced on CPU, where the kernels run in the interpreter. On
    CPU ``timing.bench`` then runs each function once (see ``interpreted``), unless the benchmark
    times real CPU code (``real_cpu_timings``: the C++ sampler)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="small shapes only (what runs on CPU)")
    if add_arguments:
        add_arguments(p)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timing.RUN_ONCE = not real_cpu_timings and device.type == "cpu"
    return args, device, args.smoke or device.type == "cpu"


def print_row(row: dict) -> None:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def interpreted(device: torch.device, quiet: bool = False) -> bool:
    """True (after saying so, unless ``quiet``) when the kernels ran in the interpreter and timings must not be
    written."""
    if device.type == "cpu":
        if not quiet:
            print("CPU run: kernels ran in the Triton interpreter; timings are not performance figures, "
                  "nothing written")
        return True
    return False
