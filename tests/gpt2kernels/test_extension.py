"""Loading the compiled sampler: only a build for this interpreter, and never a silent CPU-only build on a GPU."""

import importlib.machinery
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt2kernels import _extension

ROOT = Path(__file__).resolve().parents[2]


def test_a_build_for_another_python_is_not_loaded(tmp_path):
    other = "_C.cpython-39-x86_64-linux-gnu.so" if sys.version_info[:2] != (3, 9) else \
        "_C.cpython-312-x86_64-linux-gnu.so"
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


def _load_in_subprocess(env, prelude="pass", timeout=240):
    """``gpt2kernels.sampling.load_extension()`` in a fresh interpreter: (returncode, printed result, stderr)."""
    code = f"import sys; from gpt2kernels import _extension; {prelude}; print(_extension.load())"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **env})
    return r.returncode, r.stdout.strip(), r.stderr


def test_a_compile_killed_midway_does_not_hang_the_next_run(tmp_path):
    """The issue's repro: kill the first compile while cpp_extension holds its ``lock`` file."""
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    first = subprocess.Popen([sys.executable, "-c", "from gpt2kernels import _extension; _extension.load()"],
                             cwd=ROOT, env={**os.environ, **env}, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("*/lock")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert first.poll() is None, "the compile ended before it could be killed"
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert list(tmp_path.glob("*/lock")), "the killed compile should have left cpp_extension's lock behind"
    # The next run gets past the lock at once; a compiler that fails fast keeps the test short.
    rc, loaded, err = _load_in_subprocess({**env, "CXX": str(_failing_compiler(tmp_path))}, timeout=60)
    assert (rc, loaded) == (0, "False") and "removing" in err and "killed" in err and "could not compile" in err, err
    assert not list(tmp_path.glob("*/lock"))


def _failing_compiler(directory):
    script = directory / "broken-c++"
    script.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    script.chmod(0o755)
    return script


def test_a_missing_compiler_is_one_line_and_a_failed_compile_is_remembered(tmp_path):
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    no_prebuilt = f"_extension.PACKAGE = __import__('pathlib').Path({str(tmp_path)!r})"
    rc, loaded, err = _load_in_subprocess({**env, "CXX": str(tmp_path / "no-such-c++")}, no_prebuilt)
    assert (rc, loaded) == (0, "False") and err.strip().count("\n") == 0, err
    assert "no C++ compiler found" in err and "reference sampler" in err
    broken = _failing_compiler(tmp_path)
    for attempt in ("could not compile", "failed to compile before"):
        rc, loaded, err = _load_in_subprocess({**env, "CXX": str(broken)}, no_prebuilt)
        assert (rc, loaded) == (0, "False"), err
        assert attempt in err and "Traceback" not in err and "WARNING" not in err, err


def test_an_unloadable_prebuilt_library_falls_back_to_compiling(tmp_path):
    (tmp_path / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not a shared library")
    rc, loaded, err = _load_in_subprocess({}, f"_extension.PACKAGE = __import__('pathlib').Path({str(tmp_path)!r})")
    assert (rc, loaded) == (0, "True"), err
    assert "cannot load" in err and "Traceback" not in err


def test_each_environment_builds_in_its_own_directory(monkeypatch, tmp_path):
    """Keyed by the interpreter's path, torch's version and the sources: two virtualenvs sharing
    ~/.cache/torch_extensions used to rebuild over each other at every start."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))

    def directory():
        return _extension.build_directory(cuda=False)

    here = directory()
    assert here.parent == tmp_path and here.name.startswith(_extension.LIB + "-") and directory() == here
    monkeypatch.setattr(sys, "executable", "/elsewhere/venv/bin/python")
    other_env = directory()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    other_torch = directory()
    monkeypatch.setattr(_extension, "sources", lambda cuda: [str(tmp_path / "changed.cpp")])
    (tmp_path / "changed.cpp").write_text("// another source\n")
    assert len({here, other_env, other_torch, directory()}) == 4


def test_two_interpreters_do_not_share_a_build(tmp_path):
    """Two interpreter paths (symlinks to this Python, as two virtualenvs are) and a compiler that
    fails at once: each records its failure in its own directory, and neither sees the other's."""
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "CXX": str(_failing_compiler(tmp_path)),
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # a bare symlink finds no venv of its own
    no_prebuilt = f"_extension.PACKAGE = __import__('pathlib').Path({str(tmp_path)!r})"
    pythons = []
    for name in ("env-a", "env-b"):
        (tmp_path / name).mkdir()
        pythons.append(tmp_path / name / "python")
        pythons[-1].symlink_to(sys.executable)
    code = f"from gpt2kernels import _extension; {no_prebuilt}; print(_extension.load())"

    def load(python):
        r = subprocess.run([str(python), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240,
                           env={**os.environ, **env})
        assert r.stdout.strip() == "False", r.stderr
        return r.stderr

    assert "could not compile" in load(pythons[0])
    assert "could not compile" in load(pythons[1])  # not "failed to compile before": its own directory
    assert "failed to compile before" in load(pythons[0])
    assert len(list((tmp_path / "cache").glob(f"{_extension.LIB}-*/build_failed.txt"))) == 2
