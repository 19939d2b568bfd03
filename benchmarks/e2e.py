"""End-to-end generation: our runner in each mode vs its peers, same weights, same run, round-robin.

    python -m benchmarks.e2e                      # gpt2 on CPU, or all four sizes on a GPU
    python -m benchmarks.e2e --models gpt2-xl --dtypes fp16 --batch 1 8 64 --name e2e_xl_fp16

Implementations (``--impls``; those that apply to the device by default):
- ``triton+graph``: our kernels, the decode step replayed as a CUDA graph (the default on CUDA);
- ``triton``: our kernels, op by op from Python; ``eager+graph``: plain PyTorch ops in our runner, graphed;
- ``eager+compile``: our eager decode step under ``torch.compile(mode="reduce-overhead")``;
- ``hf``: HF transformers ``generate``; ``hf static+compile``: with a static cache and a compiled forward;
- on CPU: ``eager``, ``hf``, ``ct2`` (CTranslate2, when installed: ``pip install -e .[bench]``) and
  ``llama.cpp`` (llama-cpp-python, when installed, with ``--llama-convert``: benchmarks.peer_llama_cpp).

Greedy decoding throughout, and sampled rows beside it (``--sampled-impls`` at ``--sampled-batch``:
by default ours and HF at batch 1 and 8): ``SAMPLED``'s temperature 0.8, top-k 50 and top-p 0.95,
the way GPT-2 is usually run. Each row says which (``sampling``: "greedy" or "T=0.8,top_k=50,top_p=0.95");
a sampled row's ``sampled_vs_greedy`` is its tok/s over the same implementation's greedy row.

Dtypes (``--dtypes``): fp32, fp16, bf16, and our weight-only ``int8`` / ``int8-all`` (with the
lm_head), whose activations are fp16 on a GPU and fp32 on CPU (``engine.load_model(quantize=...)``);
CTranslate2 runs int8 (its ``int8`` compute type) and fp32; HF only the float dtypes; llama.cpp
only its own ``q8_0`` and ``f16`` (GGUF conversions of the same weights, f16 KV cache).
All load the same random weights from one safetensors directory, and every (impl, dtype) of a
model runs round-robin in one group, so ratios between dtypes are as fair as between peers. Per
(model, dtype, batch, impl): prefill ms (prompt forward + first token), decode tok/s (summed over
the batch, min new tokens forced), and roofline_frac: the bytes a decode step must read (every
weight once, plus the KV cache at the mean length) per second, over the copy bandwidth measured in
the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import engine
from engine.core.runner import runner_for
from engine.model.backends import eager_linear
from engine.model.cpu import default_cpu_choice
from engine.model.weights import random_hf_state_dict

from .report import bar_plot, device_slug, write_results
from .roofline import roofline
from .timing import wall

# name -> (dtype, quantize): None lets the engine choose (fp16 on a GPU, fp32 on CPU for int8)
DTYPES = {"fp32": (torch.float32, None), "fp16": (torch.float16, None), "bf16": (torch.bfloat16, None),
          "int8": (None, "int8"), "int8-all": (None, "int8-all")}
# llama.cpp's own formats: bytes per weight (q8_0: blocks of 32 int8 with one fp16 scale) and of its
# f16 KV cache per value
LLAMA_DTYPES = {"q8_0": 34 / 32, "f16": 2.0}
LLAMA_KV_BYTES = 2
SAMPLED = {"temperature": 0.8, "top_k": 50, "top_p": 0.95}
SAMPLED_NAME = "T=0.8,top_k=50,top_p=0.95"
GREEDY = "greedy"


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


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def step_bytes(config, dtype: torch.dtype, batch: int, kv_len: float, quantize: str | None = None) -> float:
    """Bytes one decode step reads at least: every weight once (wte as the lm_head; wpe not: one row)
    and each row's keys and values for ``kv_len`` positions; int8 weights (and their fp32 scales)
    for the block linears with ``quantize``, and for the lm_head too with ``int8-all``."""
    c, layers, f, v = config.n_embd, config.n_layer, config.mlp_width, config.vocab_size
    size = _dtype_bytes(dtype)
    matmul = 3 * c * c + c * c + 2 * c * f  # per layer
    small = 4 * c + 3 * c + c + f + c       # LayerNorms and biases, per layer
    linear_bytes = (1 if quantize else size) * matmul + (4 * (3 * c + c + f + c) if quantize else 0)
    head_bytes = (v * c + 4 * v) if quantize == "int8-all" else v * c * size
    kv = batch * layers * 2 * c * kv_len * size
    return layers * (linear_bytes + small * size) + head_bytes + 2 * c * size + kv


def llama_step_bytes(config, dtype_name: str, batch: int, kv_len: float) -> float:
    """``step_bytes`` for llama.cpp's ``LLAMA_DTYPES``: every matmul weight and the (tied) output
    matrix in that format, an f16 KV cache."""
    c, f, v = config.n_embd, config.mlp_width, config.vocab_size
    weights = config.n_layer * (3 * c * c + c * c + 2 * c * f) + v * c
    return LLAMA_DTYPES[dtype_name] * weights + batch * 2 * config.n_layer * kv_len * c * LLAMA_KV_BYTES


class Ours:
    """Our runner in one mode; models are shared between modes of the same backend and dtype."""

    _models: dict = {}

    def __init__(self, ckpt, device, dtype_name, impl):
        backend, _, mode = impl.partition("+")
        self.impl, self.dtype, self.graph = impl, dtype_name, mode == "graph"
        dtype, quantize = DTYPES[dtype_name]
        key = (str(ckpt), backend, dtype_name)
        if key not in Ours._models:
            Ours._models[key] = wall(lambda: engine.load_model(ckpt, device=device, dtype=dtype, backend=backend,
                                                               quantize=quantize), device)
        self.model, self.load_s = Ours._models[key]
        self.runner = runner_for(self.model)
        self.step = self.runner._decode_step
        if mode == "compile":
            self.step = torch.compile(self.runner._decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)

    def measure(self, ids, new_tokens, sampling=None):
        """(prefill ms, decode tok/s summed over the batch, row 0's tokens); greedy, or drawn with
        ``sampling`` (``generate``'s temperature / top_k / top_p)."""
        self.runner.decode_step = self.step
        controls = {"temperature": 0} if sampling is None else {**sampling, "seed": 0}
        try:
            out = engine.generate(self.model, ids, new_tokens, stop_at_eos=False, cuda_graph=self.graph, **controls)
        finally:
            self.runner.decode_step = self.runner._decode_step
        return out.prefill_seconds * 1e3, out.decode_tokens_per_second, out.tokens[0]


class HF:
    """HF transformers ``generate``: prefill = a 1-token generate, decode = the rest of a full one."""

    def __init__(self, ckpt, device, dtype_name, impl):
        # The peer is stock transformers: hub kernels (on by default in transformers >= 5) would swap
        # its GELU for a downloaded one, and the GPU machine has no network.
        os.environ.setdefault("USE_HUB_KERNELS", "NO")
        from transformers import GPT2LMHeadModel

        dtype = DTYPES[dtype_name][0]
        self.impl, self.dtype, self.device = impl, dtype_name, device
        self.model, self.load_s = wall(lambda: GPT2LMHeadModel.from_pretrained(ckpt, dtype=dtype).to(device).eval(),
                                       device)
        self.kwargs = {}
        if impl == "hf static+compile":  # HF's documented recipe for a static cache with a compiled forward
            self.kwargs = {"cache_implementation": "static"}
            self.model.forward = torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=True)

    def _generate(self, ids, n, sampling):
        controls = {"do_sample": False} if sampling is None else {"do_sample": True, **sampling}
        with torch.inference_mode():
            return self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                       pad_token_id=50256, **controls, **self.kwargs)

    def measure(self, ids, new_tokens, sampling=None):
        ids = ids.to(self.device)
        _, first = wall(lambda: self._generate(ids, 1, sampling), self.device)
        out, full = wall(lambda: self._generate(ids, new_tokens, sampling), self.device)
        return first * 1e3, ids.shape[0] * (new_tokens - 1) / (full - first), out[0, ids.shape[1]:].tolist()


class CTranslate2:
    """CTranslate2's ``Generator`` (CPU peer), converted from the same checkpoint, greedy, with
    ``torch.get_num_threads()`` threads; each measurement in its own process (benchmarks.peer_ctranslate2)."""

    COMPUTE_TYPES = {"int8": "int8", "fp32": "float32"}

    def __init__(self, ckpt, device, dtype_name, impl):
        from . import peer_ctranslate2

        self.impl, self.dtype, self.ckpt = impl, dtype_name, ckpt
        self.model_dir = peer_ctranslate2.convert(ckpt)
        self.load_s = None

    def measure(self, ids, new_tokens):
        from . import peer_ctranslate2

        compute_type = self.COMPUTE_TYPES[self.dtype]
        prefill_ms, tok_s, tokens, self.load_s = peer_ctranslate2.measure(
            self.model_dir, self.ckpt, compute_type, torch.get_num_threads(), ids.tolist(), new_tokens)
        return prefill_ms, tok_s, tokens


class LlamaCpp:
    """llama.cpp through llama-cpp-python (CPU peer): a GGUF conversion of the same checkpoint,
    greedy, with ``torch.get_num_threads()`` threads; each measurement in its own process
    (benchmarks.peer_llama_cpp)."""

    converter: Path | None = None  # llama.cpp's convert_hf_to_gguf.py (--llama-convert)

    def __init__(self, ckpt, device, dtype_name, impl):
        from . import peer_llama_cpp

        self.impl, self.dtype = impl, dtype_name
        self.gguf = peer_llama_cpp.convert(ckpt, dtype_name, LlamaCpp.converter)
        self.load_s = None

    def measure(self, ids, new_tokens):
        from . import peer_llama_cpp

        prefill_ms, tok_s, tokens, self.load_s = peer_llama_cpp.measure(self.gguf, torch.get_num_threads(),
                                                                        ids.tolist(), new_tokens)
        return prefill_ms, tok_s, tokens


class Sampled:
    """An implementation drawing with ``SAMPLED``'s controls instead of greedily."""

    sampling = SAMPLED_NAME

    def __init__(self, inner):
        self.inner, self.impl, self.dtype = inner, inner.impl, inner.dtype

    @property
    def load_s(self):
        return self.inner.load_s

    def measure(self, ids, new_tokens):
        return self.inner.measure(ids, new_tokens, sampling=SAMPLED)


def sampling_of(runner) -> str:
    return getattr(runner, "sampling", GREEDY)


def kernel_counts(runners, batches) -> dict[tuple[str, str, int, str], int]:
    """(impl, dtype, batch, sampling) -> kernels in one decode step (greedy or sampled, as measured
    here), for our op-by-op and graphed runners."""
    from .step_trace import kernel_budget

    counts = {}
    for r in runners:
        if isinstance(r, Ours) and "compile" not in r.impl:
            for batch in batches:
                for sampling in (GREEDY, SAMPLED_NAME):
                    counts[r.impl, r.dtype, batch, sampling] = kernel_budget(r.model, batch,
                                                                             greedy=sampling == GREEDY)["kernels"]
    return counts


def applies(impl: str, dtype_name: str, device: torch.device) -> bool:
    """Whether ``impl`` runs ``dtype_name``: HF only the float dtypes, and not fp16 on CPU (its fp16
    GEMMs there ran at 7 tok/s, with 27 s prefills at batch 8: a minute a round for nothing);
    CTranslate2 int8 and fp32; llama.cpp its own formats, which only it runs."""
    if impl == "llama.cpp" or dtype_name in LLAMA_DTYPES:
        return impl == "llama.cpp" and dtype_name in LLAMA_DTYPES
    if impl.startswith("hf"):
        return DTYPES[dtype_name][1] is None and not (device.type == "cpu" and dtype_name == "fp16")
    if impl == "ct2":
        return dtype_name in CTranslate2.COMPUTE_TYPES
    return True


def make(impl, ckpt, device, dtype_name):
    kind = HF if impl.startswith("hf") else CTranslate2 if impl == "ct2" else LlamaCpp if impl == "llama.cpp" else Ours
    return kind(ckpt, device, dtype_name, impl)


def measure_round_robin(runners, batch, prompt_len, new_tokens, repeats) -> tuple[list[dict], list[str]]:
    """Median over ``repeats`` rounds, each round running every implementation once in turn, so
    that drift in a shared machine's speed falls on all of them alike. Returns (rows, failures):
    a peer that fails its warm-up (e.g. a transformers version without a static GPT-2 cache) is
    reported and left out, not fatal."""
    ids = torch.randint(0, 50257, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    working, failures = [], []
    for r in runners:  # warm-up with the very call that is timed: every kernel, graph and compile happens here
        try:
            r.measure(ids, new_tokens)
            working.append(r)
        except Exception as e:  # noqa: BLE001 - a peer's failure is a result to report
            failures.append(f"{r.impl} {r.dtype} batch {batch}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            print("failed:", failures[-1], flush=True)
    samples = [[r.measure(ids, new_tokens) for r in working] for _ in range(repeats)]
    rows = []
    for i, r in enumerate(working):
        runs = [round_[i] for round_ in samples]
        rows.append({"impl": r.impl, "dtype": r.dtype, "batch": batch, "sampling": sampling_of(r), "load_s": r.load_s,
                     "prefill_ms": statistics.median(x[0] for x in runs),
                     "decode_tok_s": statistics.median(x[1] for x in runs), "tokens": runs[0][2]})
    return rows, failures


CUDA_IMPLS = ["triton+graph", "triton", "eager+graph", "eager+compile", "hf", "hf static+compile"]
CPU_IMPLS = ["eager", "hf", "ct2", "llama.cpp"]
# Those with sampled rows by default: ours as it runs on the device, and HF.
CUDA_SAMPLED_IMPLS = ["triton+graph", "hf"]
CPU_SAMPLED_IMPLS = ["eager", "hf"]


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def missing_peers(impls: list[str], llama_convert: str | None) -> dict[str, str]:
    """impl -> why its rows are left out, for the CPU peers that cannot run here."""
    missing = {}
    if "ct2" in impls and not _importable("ctranslate2"):
        missing["ct2"] = "CTranslate2 is not installed (pip install -e .[bench])"
    if "llama.cpp" in impls:
        if not _importable("llama_cpp"):
            missing["llama.cpp"] = "llama-cpp-python is not installed (see benchmarks/peer_llama_cpp.py)"
        elif not llama_convert or not Path(llama_convert).is_file():
            missing["llama.cpp"] = ("no --llama-convert (llama.cpp's convert_hf_to_gguf.py, in llama-cpp-python's "
                                    "source distribution)")
    return missing


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(engine.CONFIGS) if cuda else ["gpt2"],
                   choices=list(engine.CONFIGS))
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"] if cuda else ["fp32", "fp16", "bf16", "int8"],
                   choices=list(DTYPES) + list(LLAMA_DTYPES), help="the first is the reference of greedy_same_as_ref")
    p.add_argument("--impls", nargs="+", default=CUDA_IMPLS if cuda else CPU_IMPLS, choices=CUDA_IMPLS + CPU_IMPLS)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64] if cuda else [1, 8])
    p.add_argument("--sampled-impls", nargs="*", default=CUDA_SAMPLED_IMPLS if cuda else CPU_SAMPLED_IMPLS,
                   choices=CUDA_IMPLS[:4] + CPU_IMPLS[:2] + ["hf static+compile"],
                   help=f"implementations that also run sampled ({SAMPLED_NAME}); none: greedy only")
    p.add_argument("--sampled-batch", nargs="*", type=int, default=[1, 8],
                   help="batch sizes of the sampled rows (among --batch)")
    p.add_argument("--compile-batch", nargs="+", type=int, default=[1],
                   help="batch sizes the torch.compile peers run at (each costs a compile of a minute or more)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="rounds per measurement; the median is reported")
    p.add_argument("--name", default="e2e", help="results file name under benchmarks/results/<device>/")
    p.add_argument("--llama-convert", default=None,
                   help="llama.cpp's convert_hf_to_gguf.py, for the llama.cpp rows (dtypes q8_0, f16)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    bandwidth = roofline(device)
    copy_bps = bandwidth["copy_gbps"] * 1e9

    LlamaCpp.converter = Path(args.llama_convert) if args.llama_convert else None
    impls = list(args.impls)
    failures = []
    for impl, why in missing_peers(impls, args.llama_convert).items():
        impls.remove(impl)
        failures.append(f"{impl}: {why}; its rows are left out")
        print(failures[-1], flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ckpt = save_random_checkpoint(name, Path(tmp) / name)
            runners = [make(impl, ckpt, device, d) for d in args.dtypes for impl in impls if applies(impl, d, device)]
            sampled = [Sampled(r) for r in runners if r.impl in args.sampled_impls]
            model_rows = []
            for batch in args.batch:
                here = runners + (sampled if batch in args.sampled_batch else [])
                here = [r for r in here if "compile" not in r.impl or batch in args.compile_batch]
                got, failed = measure_round_robin(here, batch, args.prompt_len, args.new_tokens, args.repeats)
                model_rows += got
                failures += failed
            budgets = kernel_counts(runners, args.batch)
            activations = {r.dtype: r.model.dtype for r in runners if isinstance(r, Ours)}
            del runners, sampled
            Ours._models.clear()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # The reference: our run in the first dtype, eager where it ran (the plain-PyTorch path).
            first = [r for r in model_rows if r["dtype"] == args.dtypes[0] and r["impl"] in ("eager", *CUDA_IMPLS[:4])
                     and r["sampling"] == GREEDY]
            first.sort(key=lambda r: not r["impl"].startswith("eager"))
            reference = {}
            for r in first:
                reference.setdefault(r["batch"], r["tokens"])
            kv_len = args.prompt_len + args.new_tokens / 2
            greedy_speed = {(r["impl"], r["dtype"], r["batch"]): r["decode_tok_s"] for r in model_rows
                            if r["sampling"] == GREEDY}
            for r in model_rows:
                r["model"] = name
                r["kernels_per_step"] = budgets.get((r["impl"], r["dtype"], r["batch"], r["sampling"]))
                greedy = greedy_speed.get((r["impl"], r["dtype"], r["batch"]))
                if r["sampling"] != GREEDY and greedy:
                    r["sampled_vs_greedy"] = r["decode_tok_s"] / greedy
                tokens = r.pop("tokens")
                if r["dtype"] in LLAMA_DTYPES:
                    bytes_per_step = llama_step_bytes(engine.CONFIGS[name], r["dtype"], r["batch"], kv_len)
                else:
                    dtype, quantize = DTYPES[r["dtype"]]
                    dtype = dtype or activations.get(r["dtype"], torch.float32)
                    bytes_per_step = step_bytes(engine.CONFIGS[name], dtype, r["batch"], kv_len, quantize)
                r["roofline_frac"] = bytes_per_step * r["decode_tok_s"] / r["batch"] / copy_bps
                if r["batch"] in reference and r["sampling"] == GREEDY:
                    ref = reference[r["batch"]]
                    same = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), len(tokens))
                    r["greedy_same_as_ref"] = f"{same}/{len(tokens)}"
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
            rows += model_rows
            shutil.rmtree(ckpt, ignore_errors=True)

    extra = {"roofline": bandwidth, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
             "sampled": {**SAMPLED, "seed": 0, "impls": args.sampled_impls, "batch": args.sampled_batch},
             "weights": "random (seed 0), same safetensors for every implementation", "failures": failures}
    if device.type == "cpu":  # what a load with no dtype runs here (engine.model.cpu's measured choice)
        extra["cpu_default"] = default_cpu_choice(eager_linear)[0]
    columns = ["model", "dtype", "batch", "impl", "sampling", "load_s", "prefill_ms", "decode_tok_s", "roofline_frac",
               "kernels_per_step", "greedy_same_as_ref", "sampled_vs_greedy"]
    out = write_results(args.name, device, rows, columns, extra,
                        notes="decode_tok_s sums over the batch; sampled rows draw with "
                              f"{SAMPLED_NAME} (seed 0) and sampled_vs_greedy is their tok/s over the same "
                              "implementation's greedy row; greedy_same_as_ref counts tokens of row 0 equal "
                              f"to our {args.dtypes[0]} run (eager where it ran) before the first difference; "
                              "int8 rows are ours: weight-only int8 with fp16 activations on a GPU; on CPU int8 x "
                              "uint8 with activations quantised per row, the whole decode step in one C++ call "
                              "(engine.model.cpu_step); llama.cpp q8_0 / f16 are its own GGUF formats; "
                              "ct2 int8 is CTranslate2's int8 compute type; roofline_frac = weight + "
                              "KV bytes per step x steps/s / measured copy bandwidth (read + write bytes: a "
                              "decode step only reads, and on CPU, where a copy also reads each destination line "
                              "before writing it, a read stream can pass that figure: fractions above 1); "
                              "kernels_per_step: kernels one "
                              "decode step of our runner launches (benchmarks.step_trace), replayed as they are by "
                              "+graph (none for torch.compile and HF, whose kernels we do not count).")
    labels = sorted({(r["model"], r["batch"]) for r in rows}, key=lambda x: (list(engine.CONFIGS).index(x[0]), x[1]))
    series = {}
    for r in rows:
        label = f"{r['impl']} {r['dtype']}" + ("" if r["sampling"] == GREEDY else " sampled")
        series.setdefault(label, {})[(r["model"], r["batch"])] = r["decode_tok_s"]
    title = f"GPT-2 decode (greedy; sampled: {SAMPLED_NAME}), {device_slug(device)}"
    bar_plot(out / f"{args.name}.png", title, [f"{m} b{b}" for m, b in labels],
             {k: [v.get(label, 0.0) for label in labels] for k, v in series.items()}, "tokens / s (sum over batch)")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
