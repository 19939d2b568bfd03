"""Compile every Triton kernel variant the launchers really produce, for sm_80 and sm_90, with no GPU.

    python -m gpt2kernels.aot             # table of registers / shared memory / spills; exit 1 on failure
    python -m gpt2kernels.aot --subset 24 # 24 variants per arch, every kernel among them (pytest's check)

Nothing is listed by hand. Each kernel module's ``aot_launches()`` calls its launchers at the
shapes GPT-2 runs (every size, fp16/bf16/fp32, decode and prefill row counts, M = 1 and Lq = 1
included), while ``record_launches`` intercepts the launches: for each one it asks Triton's own
JIT code (its argument binder and ``_pack_args``) for the specialisation it would compile (pointer
alignment, ints equal to 1 or divisible by 16, constexprs, num_warps, num_stages) and keeps one
compile job per distinct JIT cache key. What is compiled here is therefore what the JIT compiles
on a GPU, for Triton 3.6 and 3.9 alike. The same recorder, around an interpreted run of the engine,
checks that every launch a generation makes is among these variants (tests/gpt2kernels/test_aot_compile.py).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns unless the (default) choice is explicit

MODULES = ["gpt2kernels.embedding", "gpt2kernels.layernorm", "gpt2kernels.linear", "gpt2kernels.gemv",
           "gpt2kernels.linear_backward", "gpt2kernels.attention", "gpt2kernels.attention_backward",
           "gpt2kernels.penalties", "gpt2kernels.loss", "gpt2kernels.sampling_split"]
ARCHS = (80, 90)
GPT2_SIZES = ((768, 12), (1024, 16), (1280, 20), (1600, 25))  # (n_embd, n_head): gpt2 ... gpt2-xl, head dim 64
GPT2_VOCAB = 50257


def cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@dataclass
class CompileJob:
    """One kernel variant for one arch, in the form ``JITFunction._do_compile`` hands to ``triton.compile``."""
    fn: Any            # the JITFunction
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: Any       # the backend's options dataclass (num_warps, num_stages, ...)
    label: str         # readable: kernel, dtype, constexprs, specialised ints


@dataclass
class Recording:
    """What ``record_launches`` saw: the distinct variants, and every launch in order."""
    jobs: dict[tuple[int, str], CompileJob] = field(default_factory=dict)  # (arch, JIT cache key) -> job
    launches: list[tuple[str, str]] = field(default_factory=list)          # (kernel name, sm_90 key) per launch

    def keys(self, arch: int = 90) -> set[str]:
        return {key for (a, key) in self.jobs if a == arch}


_JIT_OF: dict[Any, Any] = {}
_BINDERS: dict[tuple[int, int], tuple[Any, Any]] = {}  # keyed by id: hashing a JITFunction hashes its source


def _jit_function(kernel):
    """The JITFunction behind ``kernel``; under TRITON_INTERPRET one built from the same Python function
    and decorator arguments (do_not_specialize included), used only to compute keys, never compiled."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    if kernel.fn not in _JIT_OF:
        _JIT_OF[kernel.fn] = JITFunction(kernel.fn, **kernel.kwargs)
    return _JIT_OF[kernel.fn]


def _binder(fn, arch: int):
    if (id(fn), arch) not in _BINDERS:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget("cuda", arch, 32))
        _BINDERS[id(fn), arch] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    return _BINDERS[id(fn), arch]


def _run_kwargs(fn, backend, kwargs: dict) -> dict:
    """The launch options ``JITFunction.run`` adds before binding (debug, and the compilation knobs
    this Triton version passes: instrumentation_mode on 3.6, also fpsan_homomorphic_casts on 3.9)."""
    from triton import knobs

    out = {**kwargs, "debug": kwargs.get("debug", fn.debug) or knobs.runtime.debug}
    known = backend.parse_options({}).__dict__
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if name in known and hasattr(knobs.compilation, name):
            out[name] = getattr(knobs.compilation, name)
    return out


def specialise(kernel, args: tuple, kwargs: dict, arch: int) -> tuple[str, CompileJob]:
    """(JIT cache key, compile job) for launching ``kernel`` with these arguments on sm_``arch``,
    computed by Triton's own binder, exactly as ``JITFunction.run`` computes them."""
    from triton.runtime.jit import compute_cache_key

    fn = _jit_function(kernel)
    backend, binder = _binder(fn, arch)
    kwargs = _run_kwargs(fn, backend, kwargs)
    bound, specialization, options = binder(*args, **kwargs)
    key = compute_cache_key({}, specialization, options)
    opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return key, CompileJob(fn, arch, signature, constexprs, attrs, opts,
                           _label(fn, signature, bound, specialization, opts))


def _label(fn, signature: dict, bound: dict, specialization: list, opts) -> str:
    """kernel[dtype, constexprs and ints specialised to 1, other ints divisible by 16, warps/stages].
    Strides are left out unless specialised to 1: at GPT-2 shapes they are all multiples of 16."""
    dtype = next((t[1:] for t in signature.values() if t in ("*fp16", "*bf16")), "fp32")
    parts = []
    for (name, ty), (_, attr) in zip(signature.items(), specialization):
        if ty == "constexpr" and bound[name] is not None:
            parts.append(f"{name}={bound[name]}")
        elif attr == "D" and not ty.startswith("*") and not name.startswith("stride"):
            parts.append(f"{name}%16")
    return f"{fn.fn.__name__.strip('_')}[{dtype},{','.join(parts)},w{opts.num_warps}s{opts.num_stages}]"


def for_arch(kwargs: dict, arch: int) -> dict:
    """A launch's keyword arguments as a device of sm_``arch`` gets them: a launch that passes
    ``USE_PDL`` (the batch-1 GEMV, decode attention, the tiled linear at decode sizes) uses
    programmatic dependent launch on sm_90 and later, never before, whatever the recording
    process's device is."""
    if "USE_PDL" not in kwargs:
        return dict(kwargs)
    pdl = arch >= 90
    return {**kwargs, "USE_PDL": pdl, "launch_pdl": pdl}


@contextlib.contextmanager
def record_launches(execute: bool = True, archs: tuple[int, ...] = ARCHS) -> Iterator[Recording]:
    """Record every Triton kernel launch made inside the block (JIT or interpreter alike).

    execute=False skips the launch itself: launchers can then be called with CPU tensors at full
    GPT-2 shapes (allocated, never touched) in a process without a GPU.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    rec = Recording()
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def patched(cls):
        def run(self, *args, grid, warmup, **kwargs):
            key90 = None
            for arch in archs:
                key, job = specialise(self, args, for_arch(kwargs, arch), arch)
                rec.jobs.setdefault((arch, key), job)
                key90 = key if arch == 90 else key90
            rec.launches.append((_jit_function(self).fn.__name__, key90))
            return originals[cls](self, *args, grid=grid, warmup=warmup, **kwargs) if execute else None
        return run

    for cls in originals:
        cls.run = patched(cls)
    try:
        yield rec
    finally:
        for cls, run in originals.items():
            cls.run = run


def aot_recording() -> Recording:
    """Every variant the launchers produce at GPT-2's shapes, from each module's ``aot_launches()``."""
    with record_launches(execute=False) as rec:
        for module in MODULES:
            launches = getattr(importlib.import_module(module), "aot_launches", None)
            if launches is not None:  # gemv's variants come through linear's launcher
                launches()
    return rec


def resources(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the (single) kernel in a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump()), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Spill stores and stack frame bytes as ``ptxas -v`` reports them, with the ptxas Triton itself uses."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(src), "-o",
                              str(src.with_suffix(".cubin"))],
                             capture_output=True, text=True, check=True).stderr
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"FRAME": int(frame[1]), "SPILL": int(frame[2]) + int(frame[3])} if frame else {}


def pdl_order(ptx: str) -> dict[str, int]:
    """Where a kernel's programmatic-dependent-launch instructions sit in its PTX: PRE, the global
    loads issued before the first ``griddepcontrol.wait`` (those that depend on nothing earlier in
    the step: a GEMV's weights), and TRIGGER, 1 when it calls ``griddepcontrol.launch_dependents``.
    Empty without a wait."""
    wait = ptx.find("griddepcontrol.wait")
    if wait < 0:
        return {}
    return {"PRE": len(re.findall(r"\bld\.global", ptx[:wait])),
            "TRIGGER": int("griddepcontrol.launch_dependents" in ptx)}


def compile_job(job: CompileJob) -> dict:
    """Compile one variant as the JIT would and report its resources (and ``pdl_order``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(job.fn, job.signature, job.constexprs, job.attrs)
    k = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options.__dict__)
    return {"shared_meta": k.metadata.shared, **resources(k.asm["cubin"]), **ptxas_report(k.asm["ptx"], job.arch),
            **pdl_order(k.asm["ptx"])}


_JOBS: list[CompileJob] = []  # filled before the worker pool forks, so workers index it


def _compile_one(index: int) -> tuple[int, dict | str]:
    try:
        return index, compile_job(_JOBS[index])
    except Exception as e:  # report every failing variant, not only the first
        return index, (str(e).splitlines()[0] if str(e) else type(e).__name__)


def subset(jobs: list[CompileJob], per_arch: int) -> list[CompileJob]:
    """``per_arch`` of ``jobs`` for each arch, deterministically: every kernel's first variant (by
    label), then variants evenly spaced through the sorted rest. All 818 cost 3:18 on 2 cores with
    a cold Triton cache; a subset keeps pytest's check of this tool quick, the full run is CI's own step."""
    out = []
    for arch in sorted({j.arch for j in jobs}):
        mine = sorted((j for j in jobs if j.arch == arch), key=lambda j: j.label)
        firsts = list({j.fn.fn.__name__: j for j in reversed(mine)}.values())
        rest = [j for j in mine if j not in firsts]
        extra = max(0, per_arch - len(firsts))
        out += firsts + [rest[i * len(rest) // extra] for i in range(min(extra, len(rest)))]
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gpt2kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=None, metavar="N",
                        help="compile N variants per arch, every kernel among them (default: all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces kernels with Python functions", file=sys.stderr)
        return 2
    import triton

    jobs = list(aot_recording().jobs.values())
    if args.subset is not None:
        jobs = subset(jobs, args.subset)
    _JOBS[:] = sorted(jobs, key=lambda j: (j.label, j.arch))
    # Compiles are independent and CPU-bound: use every core (fork: no GPU driver is involved).
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        results = pool.map(_compile_one, range(len(_JOBS)), chunksize=4)
    failures = 0
    which = "every kernel variant" if args.subset is None else \
        f"a subset ({args.subset} per arch) of the kernel variants"
    print(f"# python -m gpt2kernels.aot, {datetime.date.today()}, triton {triton.__version__}, ahead of time (no GPU): "
          f"{which} the launchers produce at GPT-2 shapes, as the JIT specialises them")
    print(f"{'sm':>3} {'REG':>4} {'SHARED':>7} {'STACK':>5} {'SPILL':>5} {'LOCAL':>5} {'PDL':>5}  kernel variant"
          "   (PDL: loads issued before griddepcontrol.wait; - without PDL)")
    for index, r in results:
        job = _JOBS[index]
        if isinstance(r, str):
            failures += 1
            print(f"{job.arch:>3} COMPILE ERROR: {r}  {job.label}")
            continue
        spills = r.get("LOCAL", 0) > 0 or r.get("SPILL", 0) > 0
        # A PDL launch whose kernel never waits would read the previous kernel's outputs unsynchronised.
        unsynced = "USE_PDL=True" in job.label and ("PRE" not in r or not r["TRIGGER"])
        failures += spills or unsynced
        shared = max(r.get("SHARED", 0), r["shared_meta"])
        print(f"{job.arch:>3} {r.get('REG', -1):>4} {shared:>7} {r.get('STACK', 0):>5} "
              f"{r.get('SPILL', 0):>5} {r.get('LOCAL', 0):>5} {r.get('PRE', '-'):>5}  {job.label}"
              + ("  SPILLS" if spills else "") + ("  PDL WITHOUT WAIT OR TRIGGER" if unsynced else ""))
    print(f"{len(_JOBS)} compiles, {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
