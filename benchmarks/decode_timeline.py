"""Where a graphed decode step's time goes: each kernel's duration and the gaps between kernels.

    python -m benchmarks.decode_timeline                       # GPU: gpt2 and gpt2-xl, batch 1, fp16
    python -m benchmarks.decode_timeline --models gpt2 --batch 1 8

Per (model, batch), on random weights after a 128-token prompt, greedy, with the decode kernels'
programmatic dependent launch on (the default on sm_90+) and off (``pdl``):
- ``generate_us``: one decode step as ``engine.generate`` runs it with CUDA graphs (128 new tokens,
  host loop included);
- ``replay_us``: the step's graph replayed back to back (CUDA events around 64 replays): device time
  with the host out of the way. ``generate_us - replay_us`` is the host's share;
- from a ``torch.profiler`` trace of single replays (the GPU idle before each): ``span_us`` from the
  first kernel's start to the last one's end, ``busy_us`` the kernels' summed durations, ``gap_us``
  the rest (launch gaps inside the graph), and per kernel name its count and µs per step.
The trace of the profiled replays is written beside the table (``decode_timeline_<model>_b<batch>.trace.json.gz``,
for chrome://tracing or Perfetto). Needs a GPU.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import engine
from engine.core.request import Request, SamplingParams
from engine.core.runner import admit_batch, runner_for
from gpt2kernels import programmatic_dependent_launch

from .report import write_results
from .roofline import copy_gbps
from .e2e import step_bytes

PROFILED_REPLAYS = 8
# A step is one replay; replays are separated by an idle wait far longer than any gap inside a step.
STEP_SEPARATION_US = 1000.0


def split_steps(events: list[tuple[str, float, float]], separation_us: float = STEP_SEPARATION_US) -> list[list]:
    """Device events ``(name, start_us, end_us)`` grouped into steps: a new step starts after an
    idle time longer than ``separation_us``."""
    steps: list[list] = []
    last_end = None
    for event in sorted(events, key=lambda e: e[1]):
        if last_end is None or event[1] - last_end > separation_us:
            steps.append([])
        steps[-1].append(event)
        last_end = event[2] if last_end is None else max(last_end, event[2])
    return steps


def summarise(steps: list[list]) -> tuple[dict, list[dict]]:
    """(medians over steps of span/busy/gap µs and kernel count, per-name rows of count and µs per step)."""
    spans = [s[-1][2] - s[0][1] for s in steps]
    busy = [sum(e[2] - e[1] for e in s) for s in steps]
    gaps = [[max(0.0, b[1] - a[2]) for a, b in zip(s, s[1:])] for s in steps]
    totals = {"kernels": statistics.median(len(s) for s in steps), "span_us": statistics.median(spans),
              "busy_us": statistics.median(busy), "gap_us": statistics.median(sum(g) for g in gaps),
              "median_gap_us": statistics.median(x for g in gaps for x in g) if any(gaps) else 0.0}
    per_name: dict[str, list[float]] = {}
    for s in steps:
        for name, start, end in s:
            per_name.setdefault(name, []).append(end - start)
    rows = [{"kernel": name[:90], "per_step": len(d) / len(steps), "us_per_step": sum(d) / len(steps),
             "median_us": statistics.median(d)} for name, d in per_name.items()]
    rows.sort(key=lambda r: -r["us_per_step"])
    return totals, rows


def device_events(prof) -> list[tuple[str, float, float]]:
    """Every kernel, memcpy and memset the profiler saw on the device: (name, start µs, end µs)."""
    out = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out.append((e.name, float(e.time_range.start), float(e.time_range.end)))
    return out


def measure(model, model_name: str, batch: int, prompt_len: int, out_dir: Path, pdl: bool) -> tuple[dict, list[dict]]:
    """One (model, batch) with the decode kernels' programmatic dependent launch on or off."""
    with programmatic_dependent_launch(pdl):
        runner_for(model).drop_graphs()  # captured with the other setting's launches
        return _measure(model, model_name, batch, prompt_len, out_dir, pdl)


def _measure(model, model_name: str, batch: int, prompt_len: int, out_dir: Path, pdl: bool) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 50257, (batch, prompt_len), generator=g)
    new_tokens = 128
    engine.generate(model, ids, new_tokens, temperature=0, stop_at_eos=False, cuda_graph=True)  # compile, capture
    runs = [engine.generate(model, ids, new_tokens, temperature=0, stop_at_eos=False, cuda_graph=True)
            for _ in range(3)]
    generate_us = statistics.median(batch / r.decode_tokens_per_second for r in runs) * 1e6

    runner = runner_for(model)
    requests = [Request(row.tolist(), 2 * 64 + 8, SamplingParams(temperature=0)) for row in ids]
    plan = admit_batch(runner, requests, cuda_graph=True)
    graph = runner.graphs[plan]
    replays = 64
    for _ in range(4):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    replay_us = start.elapsed_time(end) * 1e3 / replays

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_REPLAYS):
            torch.cuda.synchronize()
            time.sleep(0.005)  # an idle GPU before each replay: steps are told apart by the silence
            graph.replay()
        torch.cuda.synchronize()
    steps = split_steps(device_events(prof))
    if not steps:
        print("the profiler saw no device events: no timeline")
        totals, per_kernel = {}, []
    else:
        totals, per_kernel = summarise(steps[1:] if len(steps) > 2 else steps)  # the first may be cold
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        name = f"decode_timeline_{model_name}_b{batch}{'' if pdl else '_nopdl'}.trace.json.gz"
        with open(trace, "rb") as src, gzip.open(out_dir / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    kv_len = prompt_len + 4 + 64  # the replays' mean cache length
    nbytes = step_bytes(model.config, torch.float16, batch, kv_len)
    row = {"model": model_name, "batch": batch, "pdl": pdl, "generate_us": generate_us, "replay_us": replay_us,
           "host_us": generate_us - replay_us, **totals, "bytes_us": nbytes / (copy_gbps("cuda") * 1e3)}
    row["replay_copy_frac"] = row["bytes_us"] / replay_us
    return row, [{"model": model_name, "batch": batch, "pdl": pdl, **r} for r in per_kernel]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2", "gpt2-xl"], choices=list(engine.CONFIGS))
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--name", default="decode_timeline")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_timeline needs a GPU: nothing measured")
        return
    from .report import RESULTS, device_slug

    out_dir = RESULTS / device_slug("cuda")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, kernels = [], []
    for model_name in args.models:
        model = engine.load_model(f"random:{model_name}", dtype=torch.float16, backend="triton", device="cuda")
        for batch in args.batch:
            for pdl in (True, False):
                row, per_kernel = measure(model, model_name, batch, args.prompt_len, out_dir, pdl)
                print(row, flush=True)
                for k in per_kernel:
                    print("   ", k, flush=True)
                rows.append(row)
                kernels += per_kernel
        del model
        torch.cuda.empty_cache()
    cols = ["model", "batch", "pdl", "generate_us", "replay_us", "host_us", "span_us", "busy_us", "gap_us",
            "median_gap_us", "kernels", "bytes_us", "replay_copy_frac"]
    write_results(args.name, "cuda", rows + kernels, cols + ["kernel", "per_step", "us_per_step", "median_us"],
                  {"dtype": "fp16", "prompt_len": args.prompt_len, "profiled_replays": PROFILED_REPLAYS},
                  notes="One greedy decode step (random weights, fp16, triton backend, CUDA graph). generate_us: per "
                        "step inside engine.generate; replay_us: graph replays back to back (device time); "
                        "span/busy/gap: from torch.profiler over single replays after an idle GPU (median of "
                        f"{PROFILED_REPLAYS - 1}); bytes_us: the step's weight + KV bytes at the copy bandwidth "
                        "measured in this run. Rows with a kernel name: that kernel's count and µs per step.")


if __name__ == "__main__":
    main()
