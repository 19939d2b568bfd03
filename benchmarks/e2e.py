"""End-to-end generation: ours (each backend and dtype) vs HF transformers ``generate``, same weights, same run.

    python -m benchmarks.e2e                      # gpt2 on CPU, or all four sizes on a GPU
    python -m benchmarks.e2e --models gpt2 gpt2-xl --batch 1 8 --new-tokens 128

Both load the same random weights from the same safetensors directory. Measured per (model,
batch): load s, prefill ms (prompt forward + first token), decode tok/s (greedy, summed over the
batch), and how many greedy tokens equal those of our fp32 run.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import engine
from engine.weights import random_hf_state_dict

from .report import bar_plot, device_slug, write_results
from .roofline import roofline
from .timing import wall

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def save_random_checkpoint(name: str, directory: Path) -> Path:
    config = engine.CONFIGS[name]
    hf_config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": config.n_layer,
                 "n_head": config.n_head, "n_embd": config.n_embd, "n_positions": config.n_positions,
                 "n_ctx": config.n_positions, "vocab_size": config.vocab_size, "bos_token_id": 50256,
                 "eos_token_id": 50256}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config))
    state = {f"transformer.{k}": v.contiguous() for k, v in random_hf_state_dict(config, seed=0).items()}
    save_file(state, directory / "model.safetensors")
    return directory


class Ours:
    """Our engine at one (backend, dtype): load once, then measure greedy generation."""

    def __init__(self, ckpt, device, dtype, backend):
        self.impl, self.dtype = f"ours {backend}", DTYPE_NAMES[dtype]
        self.model, self.load_s = wall(lambda: engine.load_model(ckpt, device=device, dtype=dtype, backend=backend), device)

    def measure(self, ids, new_tokens):
        """(prefill ms, decode tok/s summed over the batch, row 0's tokens)."""
        out = engine.generate(self.model, ids, new_tokens, temperature=0, stop_at_eos=False)
        return out.prefill_seconds * 1e3, out.decode_tokens_per_second, out.tokens[0]


class HF:
    """HF transformers ``generate``: prefill = a 1-token generate, decode = the rest of a full one."""

    def __init__(self, ckpt, device, dtype):
        from transformers import GPT2LMHeadModel

        self.impl, self.dtype, self.device = "HF transformers", DTYPE_NAMES[dtype], device
        self.model, self.load_s = wall(lambda: GPT2LMHeadModel.from_pretrained(ckpt, dtype=dtype).to(device).eval(), device)

    def _generate(self, ids, n):
        with torch.inference_mode():
            return self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=50256)

    def measure(self, ids, new_tokens):
        ids = ids.to(self.device)
        _, first = wall(lambda: self._generate(ids, 1), self.device)
        out, full = wall(lambda: self._generate(ids, new_tokens), self.device)
        return first * 1e3, ids.shape[0] * (new_tokens - 1) / (full - first), out[0, ids.shape[1]:].tolist()


def measure_round_robin(runners, batch, prompt_len, new_tokens, repeats) -> list[dict]:
    """Median over ``repeats`` rounds, each round running every implementation once in turn, so
    that drift in a shared machine's speed falls on all of them alike."""
    ids = torch.randint(0, 50257, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    for r in runners:  # warm-up with the very call that is timed: every kernel variant compiles here
        r.measure(ids, new_tokens)
    samples = [[r.measure(ids, new_tokens) for r in runners] for _ in range(repeats)]
    rows = []
    for i, r in enumerate(runners):
        runs = [round_[i] for round_ in samples]
        rows.append({"impl": r.impl, "dtype": r.dtype, "batch": batch, "load_s": r.load_s,
                     "prefill_ms": statistics.median(x[0] for x in runs),
                     "decode_tok_s": statistics.median(x[1] for x in runs), "tokens": runs[0][2]})
    return rows


def variants(device: torch.device) -> tuple[list[tuple[str, torch.dtype]], list[torch.dtype]]:
    """(our (backend, dtype) pairs, HF dtypes) that apply on this device."""
    if device.type == "cuda":
        ours = [("eager", torch.float16), ("triton", torch.float16), ("eager", torch.float32), ("triton", torch.bfloat16)]
        return ours, [torch.float16, torch.float32]
    return [("eager", torch.float32), ("eager", torch.float16), ("eager", torch.bfloat16)], [torch.float32]


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(engine.CONFIGS) if cuda else ["gpt2"], choices=list(engine.CONFIGS))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--repeats", type=int, default=5, help="rounds per measurement; the median is reported")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    p.add_argument("--name", default="e2e", help="results file name under benchmarks/results/<device>/")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ours, hf_dtypes = variants(device)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ckpt = save_random_checkpoint(name, Path(tmp) / name)
            runners = [Ours(ckpt, device, dtype, backend) for backend, dtype in ours]
            runners += [] if args.no_hf else [HF(ckpt, device, dtype) for dtype in hf_dtypes]
            model_rows = []
            for batch in args.batch:
                model_rows += measure_round_robin(runners, batch, args.prompt_len, args.new_tokens, args.repeats)
            del runners
            gc.collect()
            reference = {r["batch"]: r["tokens"] for r in model_rows if r["dtype"] == "fp32" and r["impl"].startswith("ours")}
            for r in model_rows:
                r["model"] = name
                tokens = r.pop("tokens")
                if r["batch"] in reference:
                    ref = reference[r["batch"]]
                    same = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), len(tokens))
                    r["greedy_same_as_fp32"] = f"{same}/{len(tokens)}"
                print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
            rows += model_rows
            shutil.rmtree(ckpt, ignore_errors=True)

    extra = {"roofline": roofline(device), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
             "greedy": True, "weights": "random (seed 0), same safetensors for every implementation"}
    columns = ["model", "batch", "impl", "dtype", "load_s", "prefill_ms", "decode_tok_s", "greedy_same_as_fp32"]
    out = write_results(args.name, device, rows, columns, extra,
                        notes="decode_tok_s sums over the batch; greedy_same_as_fp32 counts tokens of row 0 "
                              "equal to our fp32 run before the first difference.")
    labels = sorted({(r["model"], r["batch"]) for r in rows}, key=lambda x: (list(engine.CONFIGS).index(x[0]), x[1]))
    series = {}
    for r in rows:
        series.setdefault(f"{r['impl']} {r['dtype']}", {})[(r["model"], r["batch"])] = r["decode_tok_s"]
    bar_plot(out / f"{args.name}.png", f"GPT-2 greedy decode, {device_slug(device)}", [f"{m} b{b}" for m, b in labels],
             {k: [v.get(l, 0.0) for l in labels] for k, v in series.items()}, "tokens / s (sum over batch)")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
