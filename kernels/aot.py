"""Compile every Triton kernel ahead of time for sm_80 and sm_90, with no GPU, and report its weight.

    python -m kernels.aot            # table of registers / shared memory / spills; exit 1 on failure

Each kernel module lists the configurations its launcher really picks in ``aot_specs()``; a new
kernel module joins by adding itself to ``MODULES``. Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

MODULES = ["kernels.layernorm"]
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

    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"])
    options = {"num_warps": spec["num_warps"], **({"num_stages": spec["num_stages"]} if "num_stages" in spec else {})}
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return {"shared_meta": k.metadata.shared, **resources(k.asm["cubin"])}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces kernels with Python functions", file=sys.stderr)
        return 2
    failures = 0
    print(f"{'kernel':<44} {'sm':>3} {'warps':>5} {'REG':>4} {'SHARED':>7} {'STACK':>5} {'LOCAL':>5}")
    for module in MODULES:
        for spec in importlib.import_module(module).aot_specs():
            for arch in ARCHS:
                try:
                    r = compile_spec(spec, arch)
                except Exception as e:  # report every failing config, not only the first
                    failures += 1
                    print(f"{spec['name']:<44} {arch:>3} COMPILE ERROR: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                    continue
                spills = r.get("LOCAL", 0) > 0
                failures += spills
                print(f"{spec['name']:<44} {arch:>3} {spec['num_warps']:>5} {r.get('REG', -1):>4} "
                      f"{max(r.get('SHARED', 0), r['shared_meta']):>7} {r.get('STACK', 0):>5} {r.get('LOCAL', 0):>5}"
                      + ("  SPILLS" if spills else ""))
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
