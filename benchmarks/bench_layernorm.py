"""LayerNorm and add+LayerNorm: our Triton kernel vs PyTorch eager, in GB/s against the copy roofline.

    python -m benchmarks.bench_layernorm            # GPU: rows 1..16384 x widths 768..8192, fp16/bf16
    python -m benchmarks.bench_layernorm --smoke    # CPU: a few small shapes through the interpreter

Bytes moved: layer_norm reads x and writes y; add_layer_norm reads x and the residual and writes y
and the sum. The eager baseline is ``F.layer_norm`` (and ``x + r`` then ``F.layer_norm``) in the
input dtype, as a PyTorch model would run it. On CPU the kernels run in the Triton interpreter:
the run proves the benchmark works, and its timings mean nothing, so no results are written.
"""

from __future__ import annotations

import torch

from .kernel_cli import interpreted, parse, print_row  # first: it sets up the interpreter before gpt2kernels loads

import torch.nn.functional as F

import gpt2kernels

from .report import bar_plot, write_results
from .roofline import copy_gbps
from .timing import bench

ROWS = [1, 16, 256, 4096, 16384]
WIDTHS = [768, 1024, 1280, 1600, 4096, 8192]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def eager_add_layer_norm(x, r, w, b):
    s = x + r
    return F.layer_norm(s, s.shape[-1:], w, b, 1e-5), s


def cases(x, r, w, b):
    """name -> (ours, eager, bytes moved)."""
    nbytes = x.numel() * x.element_size()
    return {
        "layer_norm": (lambda: gpt2kernels.layer_norm(x, w, b, 1e-5),
                       lambda: F.layer_norm(x, x.shape[-1:], w, b, 1e-5), 2 * nbytes),
        "add_layer_norm": (lambda: gpt2kernels.add_layer_norm(x, r, w, b, 1e-5),
                           lambda: eager_add_layer_norm(x, r, w, b), 4 * nbytes),
    }


def main(argv=None):
    args, device, smoke = parse(__doc__, argv)
    rows, widths = ([1, 16], [768, 1600]) if smoke else (ROWS, WIDTHS)
    roof = copy_gbps(device)
    print(f"device copy bandwidth: {roof:.0f} GB/s")

    results = []
    for dname, dtype in DTYPES.items():
        for n in widths:
            for m in rows:
                g = torch.Generator().manual_seed(m * n)
                x, r = (torch.randn(2, m, n, generator=g) * 2 - 1).to(device, dtype).unbind(0)
                w, b = (1 + 0.1 * torch.randn(2, n, generator=g)).to(device, dtype).unbind(0)
                for op, (ours, eager, nbytes) in cases(x, r, w, b).items():
                    torch.testing.assert_close(ours()[0] if op == "add_layer_norm" else ours(),
                                               eager()[0] if op == "add_layer_norm" else eager(), atol=2e-2, rtol=2e-2)
                    t_ours, t_eager = bench(ours, device)["ms"], bench(eager, device)["ms"]
                    row = {"op": op, "dtype": dname, "rows": m, "width": n, "ours_ms": t_ours, "eager_ms": t_eager,
                           "ours_gbps": nbytes / t_ours / 1e6, "eager_gbps": nbytes / t_eager / 1e6,
                           "speedup": t_eager / t_ours}
                    row["ours_pct_copy"] = 100 * row["ours_gbps"] / roof
                    results.append(row)
                    print_row(row)

    if interpreted(device):
        return
    cols = ["op", "dtype", "rows", "width", "ours_ms", "eager_ms", "ours_gbps", "eager_gbps", "ours_pct_copy",
            "speedup"]
    out = write_results("layernorm", device, results, cols, {"copy_gbps": roof},
                        notes="GB/s = bytes moved / median time (do_bench). ours_pct_copy: share of the measured "
                              "copy bandwidth.")
    big = [r for r in results if r["rows"] == max(rows)]
    labels = [f"{r['op'].replace('layer_norm', 'ln')} {r['dtype']} {r['width']}" for r in big]
    bar_plot(out / "layernorm.png", f"LayerNorm at {max(rows)} rows (copy roofline {roof:.0f} GB/s)", labels,
             {"ours": [r["ours_gbps"] for r in big], "eager": [r["eager_gbps"] for r in big]}, "GB/s")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
