"""Loading the compiled sampler: only a build for this interpreter, and never a silent CPU-only build on a GPU."""

import importlib.machinery
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import _extension

ROOT = Path(__file__).resolve().parents[2]


def test_a_build_for_another_python_is_not_loaded(tmp_path):
    other = "_C.cpython-39-x86_64-linux-gnu.so" if sys.version_info[:2] != (3, 9) else "_C.cpython-312-x86_64-linux-gnu.so"
    (tmp_path / other).write_bytes(b"")
    assert _extension.built_library(tmp_path) is None
    mine = tmp_path / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    mine.write_bytes(b"")
    assert _extension.built_library(tmp_path) == mine


def test_a_build_without_the_devices_kernel_is_refused_clearly():
    if not _extension.load():
        pytest.skip("the extension cannot be built here")
    assert _extension.has_kernel("cpu")
    _extension.check_device(torch.device("cpu"))
    if _extension.has_kernel("cuda"):
        pytest.skip("this build has its CUDA kernel")
    with pytest.raises(RuntimeError, match="no CUDA kernel.*nvcc, CUDA_HOME.*rebuild"):
        _extension.check_device(torch.device("cuda"))


def test_setup_refuses_a_cpu_only_build_under_a_cuda_torch():
    """setup.py run as pip runs it, with torch reporting CUDA but no toolkit found."""
    code = ("import sys, runpy, torch, torch.utils.cpp_extension as ce; torch.version.cuda = '13.0'; "
            "ce.CUDA_HOME = None; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "no CUDA toolkit" in r.stderr and "GPT2ENGINE_NO_EXTENSION=1" in r.stderr
