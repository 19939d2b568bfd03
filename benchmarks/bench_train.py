"""One GPT-2 training step (forward, backward, AdamW) with and without gpt2kernels.patch_hf_gpt2.

    python -m benchmarks.bench_train            # GPU: GPT-2 124M, batch 8 x 1024, bf16 weights
    python -m benchmarks.bench_train --smoke    # CPU: a 2-layer model, one step, through the interpreter

Variants, all in one run on the same data: HF eager (its default SDPA attention), HF +
``torch.compile``, HF patched, and, when ``liger_kernel`` is installed, HF with Liger-Kernel's
GPT-2-capable ops (LayerNorm, fused linear + cross-entropy). Dropout is off in every variant (the
patch's attention takes none: with ``attn_pdrop > 0`` it falls back to SDPA). Reported: tokens/s
(median step time after warm-up; CUDA-synchronised wall time, the step is ~100 ms so launch overhead
does not dominate) and peak allocated memory, each as a ratio to HF eager.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from .kernel_cli import interpreted, parse, print_row  # first: it sets up the interpreter before gpt2kernels loads

import gpt2kernels

from .report import write_results


def _liger(model):
    """Liger-Kernel's ops that fit GPT-2: its LayerNorm, and its fused linear cross-entropy as the loss."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerLayerNorm

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.LayerNorm):
                ln = LigerLayerNorm(child.normalized_shape[0], eps=child.eps).to(child.weight.device,
                                                                                child.weight.dtype)
                ln.load_state_dict(child.state_dict())
                setattr(module, name, ln)
    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def step_loss(ids):
        hidden = model.transformer(ids).last_hidden_state[:, :-1].reshape(-1, model.config.n_embd)
        return loss_fn(model.lm_head.weight, hidden, ids[:, 1:].reshape(-1))
    return step_loss


def variants(base, smoke: bool) -> dict:
    """name -> (model, loss(ids) function)."""
    out = {"hf_eager": base}
    if not smoke:
        out["hf_compile"] = torch.compile(copy.deepcopy(base))
    out["patched"] = gpt2kernels.patch_hf_gpt2(copy.deepcopy(base))
    result = {name: (m, (lambda m: lambda ids: m(ids, labels=ids).loss)(m)) for name, m in out.items()}
    try:
        liger = copy.deepcopy(base)
        result["liger"] = (liger, _liger(liger))
    except ImportError:
        print("liger_kernel is not installed: its variant is skipped")
    return result


def run_steps(model, loss_of, ids, steps: int, device) -> tuple[float, float, float]:
    """(median step seconds, peak allocated GiB, last loss) of ``steps`` AdamW steps after 2 warm-ups."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):
        start = time.perf_counter()
        loss = loss_of(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak, float(loss.detach())


def main(argv=None):
    from transformers import GPT2Config, GPT2LMHeadModel

    args, device, smoke = parse(__doc__, argv)
    if smoke:
        cfg, batch, seq, steps, dtype = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64), 2, 32, 1, \
            torch.float32
    else:
        cfg, batch, seq, steps, dtype = GPT2Config(), 8, 1024, 10, torch.bfloat16
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg).to(device, dtype).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    results = []
    for name, (model, loss_of) in variants(base, smoke).items():
        seconds, peak, loss = run_steps(model, loss_of, ids, steps, device)
        row = {"variant": name, "step_ms": 1e3 * seconds, "tokens_per_s": batch * seq / seconds, "peak_gib": peak,
               "loss": loss}
        results.append(row)
        print_row(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    eager = results[0]
    for row in results:
        row["speed_vs_eager"] = row["tokens_per_s"] / eager["tokens_per_s"]
        row["memory_vs_eager"] = row["peak_gib"] / eager["peak_gib"]
    if interpreted(device):
        return
    out = write_results("train_step", device, results,
                        ["variant", "step_ms", "tokens_per_s", "speed_vs_eager", "peak_gib", "memory_vs_eager", "loss"],
                        {"model": "gpt2 124M", "batch": batch, "seq": seq, "dtype": "bf16 weights", "steps": steps},
                        notes="One step = forward + backward + fused AdamW; median of the steps after 2 warm-ups. "
                              "Dropout off everywhere.")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
