"""Tile sweep for the tiled decode kernel (M = 1 and 8 rows): which (BLOCK_N, BLOCK_K, warps, stages,
programs per SM) streams GPT-2's weights fastest, and what the winners do to a whole decode step.
Since the GEMV kernel (gpt2kernels.gemv) runs 1-8 rows, the tiled kernel serves 9-16; the sweep forces
it at 1 and 8 rows, the shapes its committed results were measured at.

    python -m benchmarks.sweep_decode_gemv            # GPU: gpt2 and gpt2-xl layer shapes
    python -m benchmarks.sweep_decode_gemv --smoke    # CPU: two configs, one small shape, interpreter
    python -m benchmarks.sweep_decode_gemv --int8     # int8 weights (fp16 activations): decode_gemv_sweep_int8

Each (shape, config) is timed as a CUDA graph of launches that rotate over enough weight copies to
exceed the L2 twice, so the time is device time, not Python launch overhead or cache hits. GB/s
counts the weight bytes (int8 ones with --int8; the x, bias, scale and output bytes are under 1 %).
The step check then generates with gemm_config patched to each shape's winner and compares decode
tok/s with the default table.
Compiles run first in parallel processes (Triton's on-disk cache), so the sweep fits a short lease.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import importlib
import multiprocessing
import time

import torch

from .kernel_cli import interpreted, parse, print_row  # first: it sets up the interpreter before gpt2kernels loads

import gpt2kernels
from gpt2kernels._ops import sm_count

from .report import write_results
from .roofline import copy_gbps
from .timing import graph_bench

klinear = importlib.import_module("gpt2kernels.linear")  # the module: gpt2kernels.linear is the op
kgemv = importlib.import_module("gpt2kernels.gemv")

# (BLOCK_N, BLOCK_K, num_warps, num_stages, programs per SM): the rule's tiles first, then wider K
# blocks (more bytes in flight per program), more stages, and more resident programs.
CONFIGS = [(64, 64, 4, 4, 2), (64, 128, 4, 4, 2), (32, 128, 4, 4, 2), (32, 256, 4, 3, 2), (16, 256, 4, 4, 2),
           (64, 128, 4, 3, 4), (32, 128, 4, 4, 4), (32, 256, 4, 3, 4), (16, 512, 4, 3, 4), (128, 64, 4, 4, 2),
           (64, 256, 8, 3, 2), (128, 128, 8, 3, 2)]
# int8 weights: the same bytes per load take twice the K, so also K blocks of 512.
INT8_CONFIGS = CONFIGS + [(32, 512, 4, 3, 2), (16, 512, 4, 4, 2), (64, 512, 8, 3, 2), (32, 512, 4, 3, 4)]
MODELS = {"gpt2": 768, "gpt2-xl": 1600}


def shapes(c: int, vocab: int = 50257) -> list[tuple[str, int, int, str | None, bool]]:
    """(layer, N, K, activation, residual?) of one decode step's GEMVs at width c."""
    return [("c_attn", 3 * c, c, None, False), ("attn.c_proj+res", c, c, None, True),
            ("c_fc+gelu", 4 * c, c, "gelu_tanh", False), ("mlp.c_proj+res", c, 4 * c, None, True),
            ("lm_head", vocab, c, None, False)]


def config_for(cfg: tuple, n: int, k: int, sms: int) -> klinear.GemmConfig:
    """``cfg``'s tiles, with the K splits gemm_config's rule gives them for its programs-per-SM target."""
    block_n, block_k, warps, stages, per_sm = cfg
    return klinear.GemmConfig(16, block_n, block_k, warps, stages,
                              klinear.decode_split_k(n, k, block_n, block_k, per_sm * sms))


@contextlib.contextmanager
def decode_tiles(choose):
    """gemm_config patched: decode-sized products take ``choose(m, n, k)`` where it gives a config,
    the default table otherwise (and again on exit)."""
    default, gemv_rows = klinear.gemm_config, kgemv.GEMV_MAX_ROWS

    def patched(m, n, k, dtype, sms, int8_weight=False):
        config = choose(m, n, k) if m <= klinear.DECODE_MAX_ROWS else None
        return config if config is not None else default(m, n, k, dtype, sms, int8_weight)

    klinear.gemm_config, kgemv.GEMV_MAX_ROWS = patched, 0  # no product takes the GEMV
    try:
        yield
    finally:
        klinear.gemm_config, kgemv.GEMV_MAX_ROWS = default, gemv_rows


def _inputs(m, n, k, act, res, dtype, device, copies, int8=False):
    """x, [(weight, scale)] * copies, bias, residual; scale is None for 16-bit weights."""
    g = torch.Generator(device=device).manual_seed(n * 7 + k)
    ws = [torch.randn(n, k, dtype=dtype, device=device, generator=g) * k**-0.5 for _ in range(copies)]
    ws = [gpt2kernels.quantize_int8(w) if int8 else (w, None) for w in ws]
    x = torch.randn(m, k, dtype=dtype, device=device, generator=g)
    bias = None if n == 50257 else torch.randn(n, dtype=dtype, device=device, generator=g)  # the lm_head has none
    r = torch.randn(m, n, dtype=dtype, device=device, generator=g) if res else None
    return x, ws, bias, r


def _compile_one(job):
    """Worker: run one (shape, config) once so its kernel variant lands in Triton's disk cache."""
    m, n, k, act, res, dtype, config, int8 = job
    x, ws, bias, r = _inputs(m, n, k, act, res, dtype, "cuda", 1, int8)
    with decode_tiles(lambda *_: config):
        gpt2kernels.linear(x, ws[0][0], bias, act, r, weight_scale=ws[0][1])
    torch.cuda.synchronize()
    return True


def time_gemv(m, n, k, act, res, dtype, device, config, l2_bytes, int8=False) -> tuple[float, float]:
    """(µs per launch, max abs error vs linear_ref) with ``config``, from graph replays."""
    copies = max(2, -(-2 * l2_bytes // (n * k * (1 if int8 else dtype.itemsize))))
    x, ws, bias, r = _inputs(m, n, k, act, res, dtype, device, copies, int8)
    with decode_tiles(lambda *_: config):
        out = gpt2kernels.linear(x, *ws[0][:1], bias, act, r, weight_scale=ws[0][1])
        w0 = ws[0][0] if int8 else ws[0][0].float()
        want = klinear.linear_ref(x.float(), w0, bias.float() if bias is not None else None, act,
                                  r.float() if r is not None else None, weight_scale=ws[0][1])
        err = (out.float() - want).abs().max().item()
        if device.type != "cuda":
            return float("nan"), err
        ms = graph_bench(lambda: [gpt2kernels.linear(x, w, bias, act, r, weight_scale=s) for w, s in ws], device,
                         replays=5)["ms"]
    return ms * 1e3 / len(ws), err


def step_tok_s(model, batch: int, winners: dict | None) -> float:
    """Decode tok/s of a 64-token greedy generation (CUDA graph) with the default or the winning tiles."""
    import engine
    from engine.core.runner import runner_for

    runner = runner_for(model)
    runner.drop_graphs()  # captured with the other table
    try:
        with decode_tiles(lambda m, n, k: (winners or {}).get((m <= 1, n, k))):
            prompts = [[int(t) for t in torch.randint(0, 50257, (128,))] for _ in range(batch)]
            engine.generate(model, prompts, 8, temperature=0, stop_at_eos=False, cuda_graph=True)  # compile + capture
            out = engine.generate(model, prompts, 64, temperature=0, stop_at_eos=False, cuda_graph=True)
        return out.decode_tokens_per_second
    finally:
        runner.drop_graphs()


def main(argv=None):
    args, device, smoke = parse(__doc__, argv, lambda p: p.add_argument(
        "--int8", action="store_true", help="int8 weights with fp16 activations (results: decode_gemv_sweep_int8)"))
    dtype, int8 = torch.float16, args.int8
    name, weight_bytes = ("decode_gemv_sweep_int8", 1) if int8 else ("decode_gemv_sweep", dtype.itemsize)
    if smoke:
        configs, cases, rows_list = CONFIGS[:2], {"tiny": [("c_fc+gelu", 200, 96, "gelu_tanh", False)]}, [1]
    else:
        configs = INT8_CONFIGS if int8 else CONFIGS
        cases, rows_list = {name: shapes(c) for name, c in MODELS.items()}, [1, 8]
    sms = sm_count(device) if device.type == "cuda" else 132
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 1 << 20
    jobs = [(m, n, k, act, res, dtype, config_for(cfg, n, k, sms), int8)
            for cases_ in cases.values() for (_, n, k, act, res) in cases_ for m in rows_list for cfg in configs]
    if device.type == "cuda":
        start = time.perf_counter()
        with futures.ProcessPoolExecutor(16, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_compile_one, jobs))
        print(f"compiled {len(jobs)} (shape, config) pairs in {time.perf_counter() - start:.0f} s", flush=True)
    bw = copy_gbps(device)
    rows, winners = [], {}
    for model, cases_ in cases.items():
        for layer, n, k, act, res in cases_:
            for m in rows_list:
                best = None
                for cfg in configs:
                    config = config_for(cfg, n, k, sms)
                    us, err = time_gemv(m, n, k, act, res, dtype, device, config, l2, int8)
                    gbps = n * k * weight_bytes / us / 1e3
                    row = {"model": model, "layer": layer, "M": m, "N": n, "K": k, "BN": config.block_n,
                           "BK": config.block_k, "warps": config.num_warps, "stages": config.num_stages,
                           "split": config.split_k, "programs": -(-n // config.block_n) * config.split_k, "us": us,
                           "gbps": gbps, "pct_copy": 100 * gbps / bw, "max_err": err}
                    rows.append(row)
                    print_row(row)
                    if device.type == "cuda" and (best is None or us < best[0]):
                        best = (us, config)
                if best is not None:
                    winners[(m <= 1, n, k)] = best[1]
    if interpreted(device):
        return
    cols = ["model", "layer", "M", "N", "K", "BN", "BK", "warps", "stages", "split", "programs", "us", "gbps",
            "pct_copy", "max_err"]
    extra = {"copy_gbps": bw, "dtype": "fp16", "weights": "int8" if int8 else "fp16"}
    write_results(name, device, rows, cols, extra)  # before the step check
    import engine

    steps = []
    for model in reversed(MODELS):  # gpt2-xl first: its step is the one a short lease must not miss
        gpt2 = engine.load_model(f"random:{model}", device="cuda", dtype=dtype, backend="triton",
                                 quantize="int8-all" if int8 else None)
        for batch in rows_list:
            base, tuned = step_tok_s(gpt2, batch, None), step_tok_s(gpt2, batch, winners)
            steps.append({"model": model, "batch": batch, "default_tok_s": base, "winners_tok_s": tuned,
                          "speedup": tuned / base})
            print_row(steps[-1])
    write_results(name, device, rows, cols, {**extra, "step_check": steps})


if __name__ == "__main__":
    main()
