"""Loads the compiled extension (csrc/: the sampler and the int8 CPU decode step): built by setup.py,
or compiled once on first use."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.machinery
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from ._ops import NS

LIB = NS + "_C"  # torch.ops.gpt2engine_C
PACKAGE = Path(__file__).resolve().parent
CSRC = PACKAGE.parent / "csrc"


def sources(cuda: bool) -> list[str]:
    files = [CSRC / "sampling_cpu.cpp", CSRC / "decode_cpu.cpp"] + ([CSRC / "sampling_cuda.cu"] if cuda else [])
    return [str(f) for f in files]


def _cuda_build_possible() -> bool:
    return torch.version.cuda is not None and (shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME"))


def _register_fake() -> None:
    """Shape rules for torch.compile: one int64 token per row; sample_next_ only mutates its inputs."""
    @torch.library.register_fake(f"{LIB}::sample")
    def _(logits, temperature, top_k, top_p, min_p, seed, offset):
        return logits.new_empty((logits.shape[0],), dtype=torch.long)

    @torch.library.register_fake(f"{LIB}::sample_next_")
    def _(logits, temperature, top_k, top_p, min_p, seed, offset, out):
        return None


# torch.ops.gpt2engine_C.sample and .sample_next_ once ``load`` succeeded: plain globals that
# torch.compile can read.
SAMPLE_OP = None
SAMPLE_NEXT_OP = None


@functools.cache
def load() -> bool:
    """Register torch.ops.gpt2engine_C.sample and sample_next_. False (with one line on stderr) when
    it can be neither loaded nor built: ``sample`` then uses the PyTorch reference."""
    global SAMPLE_OP, SAMPLE_NEXT_OP
    if not _load_library():
        return False
    _register_fake()
    SAMPLE_OP = getattr(torch.ops, LIB).sample
    SAMPLE_NEXT_OP = getattr(torch.ops, LIB).sample_next_
    return True


def built_library(directory: Path | None = None) -> Path | None:
    """The extension ``setup.py`` built into gpt2kernels/ for this very interpreter (its ABI tag, e.g.
    ``_C.cpython-312-x86_64-linux-gnu.so``), or None: a build for another Python cannot be loaded."""
    directory = directory or PACKAGE
    return next((directory / f"_C{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES
                 if (directory / f"_C{suffix}").exists()), None)


def has_kernel(device_type: str) -> bool:
    """Whether the loaded extension has a sampler for ``device_type`` ("cpu" or "cuda")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{LIB}::sample", device_type.upper())


def check_device(device: torch.device) -> None:
    """Raise RuntimeError, saying how to fix it, when the loaded extension cannot sample on ``device``."""
    if has_kernel(device.type):
        return
    origin = built_library() or "torch.utils.cpp_extension's cache"
    raise RuntimeError(
        f"gpt2engine: the compiled sampler ({origin}) has no {device.type.upper()} kernel: it was built "
        "where no CUDA toolkit (nvcc, CUDA_HOME) was found. Install the toolkit, then rebuild it: "
        "`pip install -e . --no-build-isolation`, or remove that build to have it compiled again on first use")


def _note(message: str) -> None:
    """One line on stderr: the sampler still works (or is being built), so this is not an error."""
    print(f"gpt2engine: {message}", file=sys.stderr, flush=True)


def _load_library() -> bool:
    built = built_library()
    if built:
        try:
            torch.ops.load_library(str(built))
            return True
        except (OSError, RuntimeError) as e:  # a stale build against another torch, a truncated file
            _note(f"cannot load {built.name} ({_first_line(e)}); compiling the sampler instead")
    if not (CSRC / "sampling_cpu.cpp").exists():
        _note("the sampling extension was not built and csrc/ is not here; using the PyTorch reference sampler")
        return False
    return _compile()


def _compile() -> bool:
    """Build csrc/ with torch.utils.cpp_extension (once: later processes load its cached build), or
    say in one line why not. A failure is remembered, so that later runs do not pay for it again."""
    compiler = shutil.which(os.environ.get("CXX") or "c++")
    if compiler is None:
        _note(f"no C++ compiler found ({os.environ.get('CXX') or 'c++'}); using the PyTorch reference sampler "
              "(install g++ to compile the faster one)")
        return False
    from torch.utils import cpp_extension

    cuda = _cuda_build_possible()
    build_dir = build_directory(cuda)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # an unwritable cache directory
        _note(f"cannot create {build_dir} ({_first_line(e)}); using the PyTorch reference sampler")
        return False
    failure = build_dir / "build_failed.txt"
    if failure.is_file() and failure.read_text(errors="replace").startswith(f"{compiler}\n"):
        _note(f"the C++ extension failed to compile before (log: {failure}; delete it to retry); "
              "using the PyTorch reference sampler, and int8 op by op on CPU")
        return False
    with _build_lock(build_dir):
        if not (build_dir / f"{LIB}.so").exists():  # later processes load the cached build silently
            _note(f"compiling the {'CPU+CUDA' if cuda else 'CPU'} extension (sampler, int8 CPU step) once "
                  f"(cached in {build_dir})...")
        # torch logs a multi-line banner about compiler names on its way; the outcome is all we report
        torch_log = logging.getLogger("torch.utils.cpp_extension")
        level = torch_log.level
        torch_log.setLevel(logging.ERROR)
        try:
            cpp_extension.load(
                name=LIB, sources=sources(cuda), build_directory=str(build_dir), is_python_module=False, verbose=False,
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3"] if cuda else None)
        except Exception as e:  # missing headers, a broken toolchain: the reference still samples correctly
            failure.write_text(f"{compiler}\n{e}\n")  # the failure of this compiler: another one may work
            _note(f"could not compile the C++ extension ({_first_line(e)}; log: {failure}); "
                  "using the PyTorch reference sampler, and int8 op by op on CPU")
            return False
        finally:
            torch_log.setLevel(level)
    return True


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _build_key(cuda: bool) -> str:
    """What a build is valid for: this interpreter (its path: each virtualenv has its own), this
    torch, CUDA or not, and these sources."""
    h = hashlib.sha256(f"{sys.executable} {sys.version} {torch.__version__} {torch.version.cuda} {cuda}".encode())
    for f in sources(cuda) + sorted(str(f) for f in CSRC.glob("*.h")):  # the headers they include too
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def build_directory(cuda: bool) -> Path:
    """The folder this environment compiles the sampler in: under torch.utils.cpp_extension's root
    (``TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``), named by ``_build_key``.

    torch's own default (``py311_cpu/gpt2engine_C``) is shared by every environment with the same
    Python: two virtualenvs with different torch builds, or two checkouts, then recompiled over
    each other's build at every start (12 s instead of 3). One folder per key never is.
    """
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / f"{LIB}-{_build_key(cuda)[:16]}"


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold an OS lock (``flock``, released by the kernel when its holder dies) while building.

    cpp_extension's own ``lock`` file stays behind when a build is killed, and every later process
    then waits on it forever. Under our lock, a ``lock`` file can only belong to a dead build, so it
    is removed; a live build makes us wait for it instead.
    """
    with open(build_dir / "gpt2engine.build.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _note(f"waiting for another process compiling the sampling extension in {build_dir}...")
            fcntl.flock(f, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            _note(f"removing {stale}, left by a compile that was killed")
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
