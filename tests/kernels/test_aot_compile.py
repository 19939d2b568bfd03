"""Every Triton kernel, at every config its launcher picks, compiles for sm_80 and sm_90 without spills.

Runs ``python -m kernels.aot`` in a fresh process, since the interpreter (on for the other CPU
tests) replaces kernels with Python functions. Needs no GPU: only Triton's bundled ptxas/cuobjdump.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_all_kernels_compile_for_ampere_and_hopper_without_spills():
    pytest.importorskip("triton")
    from kernels.aot import cuobjdump

    if not cuobjdump().exists():
        pytest.skip("this triton wheel has no bundled cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-m", "kernels.aot"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert " 0 failure(s)" in r.stdout
