"""torch.compile of the op-by-op CPU decode step against the fused int8 step (issue 34's cheap candidate).

    python -m benchmarks.cpu_compile [--model gpt2] [--new-tokens 64] [--repeats 3]

Our decode step with the fused C++ step turned off (``GPT2ENGINE_CPU_STEP=0``: ~150 PyTorch ops a
token, fbgemm's int8 linears) in fp32 and int8-all, eager and under ``torch.compile`` (Inductor's
C++ backend, with and without ``cpp_wrapper``; fbgemm's ``quantized::linear_dynamic`` stays an
opaque call that Inductor fuses around), against the fused int8 step; batch 1, greedy,
round-robin, medians. Compile time is reported apart (the first step of each compiled variant).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import engine
from engine.core.runner import runner_for

from .e2e import save_random_checkpoint
from .report import write_results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="cpu_compile")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_random_checkpoint(args.model, Path(tmp) / args.model)
        fused = engine.load_model(ckpt, device="cpu", quantize="int8-all")
        os.environ["GPT2ENGINE_CPU_STEP"] = "0"
        try:
            models = {"fp32": engine.load_model(ckpt, device="cpu", dtype="float32"),
                      "int8-all": engine.load_model(ckpt, device="cpu", quantize="int8-all")}
        finally:
            del os.environ["GPT2ENGINE_CPU_STEP"]
        anchor = ("int8-all", "fused C++ step", fused, runner_for(fused)._decode_step)
        ids = torch.randint(0, 50257, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))

        def run(model, step):
            runner = runner_for(model)
            runner.decode_step = step
            try:
                return engine.generate(model, ids, args.new_tokens, temperature=0, stop_at_eos=False)
            finally:
                runner.decode_step = runner._decode_step

        rows = []
        for dtype, model in models.items():
            runner = runner_for(model)
            for label, options in (("op by op", None), ("torch.compile", {}), ("torch.compile cpp_wrapper",
                                                                                 {"cpp_wrapper": True})):
                # Each compiled variant alone after a reset (Dynamo caches per code object), measured in
                # rounds with the fused step as the anchor: ratios, not absolute speeds, compare across rows.
                torch._dynamo.reset()
                counters.clear()
                step = runner._decode_step if options is None else \
                    torch.compile(runner._decode_step, dynamic=False, options=options)
                start = time.perf_counter()
                run(model, step)
                first = time.perf_counter() - start
                breaks = sum(counters["graph_break"].values())
                run(*anchor[2:])
                ours, fused_runs = [], []
                for _ in range(args.repeats):
                    ours.append(run(model, step).decode_tokens_per_second)
                    fused_runs.append(run(*anchor[2:]).decode_tokens_per_second)
                rows.append({"dtype": dtype, "step": label, "decode_tok_s": statistics.median(ours),
                             "fused_int8_tok_s": statistics.median(fused_runs),
                             "over_fused": statistics.median(ours) / statistics.median(fused_runs),
                             "first_run_s": first, "graph_breaks": breaks if options is not None else None})
                print(rows[-1], flush=True)
    write_results(args.name, "cpu", rows, ["dtype", "step", "decode_tok_s", "fused_int8_tok_s", "over_fused",
                                           "first_run_s", "graph_breaks"],
                  {"model": args.model, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": 1},
                  notes="decode tok/s at batch 1, greedy; each step variant measured alone after a Dynamo "
                        "reset, alternating with the fused int8 step (fused_int8_tok_s, the anchor; over_fused = "
                        "their ratio); first_run_s: the warm-up generate, compiles included; graph_breaks: "
                        "Dynamo's count in the compiled step.")


if __name__ == "__main__":
    main()
