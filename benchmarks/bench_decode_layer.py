"""One GPT-2 decode layer: the fused path (5 kernels) vs today's unfused kernels vs eager PyTorch.

    python -m benchmarks.bench_decode_layer            # GPU: gpt2 ... gpt2-xl widths, batch 1 and 8, fp16
    python -m benchmarks.bench_decode_layer --smoke    # CPU: one small width through the interpreter

Per width and batch, one decode step through one layer (a new token per row over a cache holding
``--kv-len`` tokens), three ways:
- ``fused``: ``engine.model.decode_layer``, what ``GPT2.decode`` runs, on the triton backend:
  ``ln_qkv_append`` (LayerNorm + QKV + cache write), ``decode_attention``, c_proj + residual,
  ``ln_linear`` (LayerNorm + c_fc + GELU), MLP c_proj + residual: five kernels;
- ``unfused``: the same math through the separate kernels the prefill path uses: ``layer_norm``,
  ``linear``, an ``index_put`` per cache, ``decode_attention``, ``linear``, ``add_layer_norm``,
  ``gelu_mlp`` (two linears), ``add_layer_norm``;
- ``eager``: ``decode_layer`` on the eager backend's plain PyTorch ops (the reference compositions).
Timed as CUDA-graph replays of a stack of layers with their own weights (device time, weights
streamed from memory), plus the fused layer launched from Python; then each of the five fused
kernels alone. Reported as µs per layer and as the fraction of the copy bandwidth measured in the
same run (the layer's weight bytes plus the cache bytes read, over the time). On CPU the kernels run in
the interpreter: the run proves the benchmark works, its timings mean nothing and nothing is written.
"""

from __future__ import annotations

import torch

from .kernel_cli import interpreted, parse, print_row  # first: it sets up the interpreter before gpt2kernels loads

import gpt2kernels
from engine.model.backends import EAGER, TRITON
from engine.model.config import GPT2Config
from engine.model import Block, decode_layer

from .report import bar_plot, write_results
from .roofline import copy_gbps
from .timing import bench, graph_bench

WIDTHS = {"gpt2": (768, 12), "gpt2-medium": (1024, 16), "gpt2-large": (1280, 20), "gpt2-xl": (1600, 25)}


def random_block(c: int, h: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Block:
    """One GPT-2 block of width ``c`` with random parameters, (out, in) weights as the engine holds them."""
    g = torch.Generator().manual_seed(seed)
    blk = Block(GPT2Config(n_embd=c, n_head=h)).to(device=device, dtype=dtype)
    with torch.no_grad():
        for name, param in blk.named_parameters():
            scale = param.shape[-1] ** -0.5 if param.dim() == 2 else 0.1  # weights by fan-in, the rest small
            one = 1.0 if name.startswith("ln_") and name.endswith("weight") else 0.0  # LayerNorm gains near 1
            param.copy_(one + scale * torch.randn(param.shape, generator=g))
    return blk


def unfused_layer(x, blk, k_cache, v_cache, lens, h, eps=1e-5):
    """The same layer through the separate kernels (what a decode step launched before the fusions)."""
    b, c = x.shape
    rows, pos = torch.arange(b, device=x.device), lens.long() - 1
    attn, mlp = blk.attn, blk.mlp
    qkv = gpt2kernels.linear(gpt2kernels.layer_norm(x, blk.ln_1.weight, blk.ln_1.bias, eps), attn.c_attn.weight,
                             attn.c_attn.bias)
    q, k, v = qkv.view(b, 3, h, c // h).unbind(1)
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v
    o = gpt2kernels.decode_attention(q[:, :, None], k_cache, v_cache, lens, check_lens=False)
    a = gpt2kernels.linear(o.reshape(b, c), attn.c_proj.weight, attn.c_proj.bias)
    hn, resid = gpt2kernels.add_layer_norm(a, x, blk.ln_2.weight, blk.ln_2.bias, eps)
    m = gpt2kernels.gelu_mlp(hn, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias)
    # the next layer's LayerNorm, as the unfused chain runs it after every block
    return gpt2kernels.add_layer_norm(m, resid, blk.ln_1.weight, blk.ln_1.bias, eps)[1]


def layer_bytes(c: int, batch: int, kv_len: int, element: int) -> int:
    """Bytes a decode layer reads at least: its weights once, and each row's keys and values."""
    weights = 12 * c * c + 13 * c + 4 * c  # four projections with biases, two LayerNorms
    return (weights + batch * 2 * kv_len * c) * element


# Layers in one timed graph, each with its own weights and cache, chained as in a step: at gpt2's
# width 8 layers hold 113 MB of weights, past an H200's 60 MB L2, so weights stream from memory.
GRAPH_LAYERS = 8
EPS = 1e-5


def kernel_fns(blocks, caches, x, lens, h) -> dict:
    """The fused layer's five kernels one at a time, each over every block, on fixed inputs:
    name -> (callable, bytes it must read at least)."""
    b, c = x.shape
    e = x.element_size()
    q = torch.randn(b, h, 1, c // h, dtype=x.dtype, device=x.device)
    o = torch.randn(b, c, dtype=x.dtype, device=x.device)
    mid = torch.randn(b, 4 * c, dtype=x.dtype, device=x.device)
    kv = int(lens[0]) * b * 2 * c * e
    return {
        "ln_qkv_append": (lambda: [TRITON.ln_qkv_append(x, blk.ln_1.weight, blk.ln_1.bias, blk.attn.c_attn.weight,
                                                        blk.attn.c_attn.bias, *cache, lens, EPS)
                                   for blk, cache in zip(blocks, caches)], 3 * c * c * e),
        "attention": (lambda: [TRITON.decode_attention(q, *cache, lens) for cache in caches], kv),
        "attn_c_proj": (lambda: [TRITON.linear(o, blk.attn.c_proj.weight, blk.attn.c_proj.bias, residual=x)
                                 for blk in blocks], c * c * e),
        "ln_c_fc_gelu": (lambda: [TRITON.ln_linear(x, blk.ln_2.weight, blk.ln_2.bias, blk.mlp.c_fc.weight,
                                                   blk.mlp.c_fc.bias, "gelu_tanh", EPS) for blk in blocks],
                         4 * c * c * e),
        "mlp_c_proj": (lambda: [TRITON.linear(mid, blk.mlp.c_proj.weight, blk.mlp.c_proj.bias, residual=x)
                                for blk in blocks], 4 * c * c * e),
    }


def main(argv=None):
    def options(p):
        p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
        p.add_argument("--kv-len", type=int, default=512, help="tokens in each row's cache")
        p.add_argument("--batch", nargs="+", type=int, default=[1, 8])

    args, device, smoke = parse(__doc__, argv, options)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    widths, kv_len, batches, layers, reps = WIDTHS, args.kv_len, args.batch, GRAPH_LAYERS, {}
    if smoke:  # interpreted kernels take a second a layer: one small case, timed once
        widths, kv_len, batches, layers, reps = {"tiny": (96, 3)}, 40, [3], 1, {"warmup": 0, "reps": 1}
        dtype = torch.float16 if device.type == "cpu" else dtype  # interpreter: no bf16 tl.dot
    gpt2kernels.prepare_device(device)
    roof = copy_gbps(device)
    print(f"copy {roof:.0f} GB/s")
    results = []
    for model, (c, h) in widths.items():
        blocks = [random_block(c, h, dtype, device, seed=i) for i in range(layers)]
        for batch in batches:
            g = torch.Generator().manual_seed(batch)
            x = torch.randn(batch, c, generator=g).to(device, dtype)
            cache = torch.randn(2, batch, h, kv_len + 8, c // h, generator=g).to(device, dtype)
            caches = {name: [tuple(cache.clone()) for _ in blocks] for name in ("fused", "unfused", "eager")}
            lens = torch.full((batch,), kv_len, dtype=torch.int32, device=device)  # the new token is the last
            layer = {"fused": lambda blk, kc, vc, y: decode_layer(TRITON, blk, y, kc, vc, lens, h, EPS),
                     "unfused": lambda blk, kc, vc, y: unfused_layer(y, blk, kc, vc, lens, h),
                     "eager": lambda blk, kc, vc, y: decode_layer(EAGER, blk, y, kc, vc, lens, h, EPS)}
            want = layer["eager"](blocks[0], *caches["eager"][0], x).float()
            for name in ("fused", "unfused"):
                torch.testing.assert_close(layer[name](blocks[0], *caches[name][0], x).float(), want, atol=5e-2,
                                           rtol=5e-2)

            def stack(name):
                def run():
                    y = x
                    for blk, (kc, vc) in zip(blocks, caches[name]):
                        y = layer[name](blk, kc, vc, y)
                    return y
                return run

            t = {name: graph_bench(stack(name), device, **reps)["ms"] / layers for name in layer}
            # through Python, as the triton backend without graphs
            host = bench(stack("fused"), device, **reps)["ms"] / layers
            nbytes = layer_bytes(c, batch, kv_len, x.element_size())
            row = {"model": model, "C": c, "batch": batch, "kv_len": kv_len,
                   **{f"{name}_us": v * 1e3 for name, v in t.items()}, "fused_python_us": host * 1e3,
                   **{f"{name}_copy_frac": nbytes / (v * 1e-3) / (roof * 1e9) for name, v in t.items()},
                   "vs_unfused": t["unfused"] / t["fused"], "vs_eager": t["eager"] / t["fused"]}
            for kname, (fn, kbytes) in kernel_fns(blocks, caches["fused"], x, lens, h).items():
                us = graph_bench(fn, device, **reps)["ms"] * 1e3 / layers
                row[f"{kname}_us"], row[f"{kname}_pct_copy"] = us, 100 * kbytes / (us * 1e-6) / (roof * 1e9)
            print_row(row)
            results.append(row)
    if interpreted(device):
        return
    cols = ["model", "C", "batch", "kv_len", "fused_us", "unfused_us", "eager_us", "fused_python_us", "fused_copy_frac",
            "eager_copy_frac", "vs_unfused", "vs_eager"]
    kernel_cols = [f"{k}_{unit}" for k in ("ln_qkv_append", "attention", "attn_c_proj", "ln_c_fc_gelu", "mlp_c_proj")
                   for unit in ("us", "pct_copy")]
    out = write_results(f"decode_layer_{args.dtype}", device, results, cols + kernel_cols,
                        {"copy_gbps": roof, "dtype": args.dtype, "kv_len": kv_len, "layers_per_graph": layers},
                        notes="One decode layer, one new token per row, timed as CUDA-graph replays of "
                              f"{layers} chained layers with their own weights (device time; fused_python_us: the "
                              "same fused layer launched from Python). *_copy_frac = (layer weights + KV read) bytes "
                              "/ time / measured copy bandwidth; per kernel: *_us and *_pct_copy (its weight or KV "
                              "bytes). vs_*: speed-up of fused (>1 is faster).")
    labels = [f"{r['model']} b{r['batch']}" for r in results]
    bar_plot(out / f"decode_layer_{args.dtype}.png", f"decode layer {args.dtype}, kv {kv_len}", labels,
             {name: [r[f"{name}_us"] for r in results] for name in ("fused", "unfused", "eager")}, "µs per layer")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
