"""Compile every Triton kernel ahead of time for sm_80 and sm_90, with no GPU, and report its weight.

    python -m kernels.aot            # table of registers / shared memory / spills; exit 1 on failure

Each kernel module lists the configurations its launcher really picks in ``aot_specs()``: name,
fn, signature, constexprs (unit strides the JIT would specialise to 1 belong here), num_warps,
optional num_stages and ``divisible`` (int args that are multiples of 16 at run time). A new
kernel module joins by adding itself to ``MODULES``. Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns unless the (default) choice is explicit

MODULES = ["kernels.layernorm", "kernels.linear", "kernels.attention"]
ARCHS = (80, 90)


def cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resources(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the (single) kernel in a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump()), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def compile_spec(spec: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # What the JIT would specialise at run time: 16-byte aligned pointers, ints divisible by 16.
    names = spec["fn"].arg_names
    divisible = [n for n, t in spec["signature"].items() if t.startswith("*")] + spec.get("divisible", [])
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs)
    options = {"num_warps": spec["num_warps"], **({"num_stages": spec["num_stages"]} if "num_stages" in spec else {})}
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return {"shared_meta": k.metadata.shared, **resources(k.asm["cubin"]), **ptxas_report(k.asm["ptx"], arch)}


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Spill stores and stack frame bytes as ``ptxas -v`` reports them, with the ptxas Triton itself uses."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(src), "-o", str(src.with_suffix(".cubin"))],
                             capture_output=True, text=True, check=True).stderr
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"FRAME": int(frame[1]), "SPILL": int(frame[2]) + int(frame[3])} if frame else {}


def all_specs() -> list[dict]:
    specs, seen = [], set()
    for module in MODULES:
        for spec in importlib.import_module(module).aot_specs():
            if spec["name"] not in seen:
                seen.add(spec["name"])
                specs.append(spec)
    return specs


def _compile_one(job: tuple[int, int]) -> tuple[int, int, dict | str]:
    index, arch = job
    try:
        return index, arch, compile_spec(all_specs()[index], arch)
    except Exception as e:  # report every failing config, not only the first
        return index, arch, (str(e).splitlines()[0] if str(e) else type(e).__name__)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces kernels with Python functions", file=sys.stderr)
        return 2
    specs = all_specs()
    jobs = [(i, arch) for i in range(len(specs)) for arch in ARCHS]
    # Compiles are independent and CPU-bound: use every core (fork: no GPU driver is involved).
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        results = pool.map(_compile_one, jobs, chunksize=4)
    failures = 0
    print(f"{'kernel':<48} {'sm':>3} {'warps':>5} {'REG':>4} {'SHARED':>7} {'STACK':>5} {'SPILL':>5} {'LOCAL':>5}")
    for index, arch, r in results:
        spec = specs[index]
        if isinstance(r, str):
            failures += 1
            print(f"{spec['name']:<48} {arch:>3} COMPILE ERROR: {r}")
            continue
        spills = r.get("LOCAL", 0) > 0 or r.get("SPILL", 0) > 0
        failures += spills
        print(f"{spec['name']:<48} {arch:>3} {spec['num_warps']:>5} {r.get('REG', -1):>4} "
              f"{max(r.get('SHARED', 0), r['shared_meta']):>7} {r.get('STACK', 0):>5} {r.get('SPILL', 0):>5} "
              f"{r.get('LOCAL', 0):>5}" + ("  SPILLS" if spills else ""))
    print(f"{len(jobs)} compiles, {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
