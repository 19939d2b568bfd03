"""Loads the compiled sampler (csrc/): built by setup.py, or compiled once on first use."""

from __future__ import annotations

import functools
import importlib.machinery
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from ._ops import NS

LIB = NS + "_C"  # torch.ops.gpt2engine_C
PACKAGE = Path(__file__).resolve().parent
CSRC = PACKAGE.parent / "csrc"


def sources(cuda: bool) -> list[str]:
    files = [CSRC / "sampling_cpu.cpp"] + ([CSRC / "sampling_cuda.cu"] if cuda else [])
    return [str(f) for f in files]


def _cuda_build_possible() -> bool:
    return torch.version.cuda is not None and (shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME"))


def _cached(cpp_extension) -> bool:
    """Whether an earlier process already built the extension (cpp_extension still rebuilds it if
    the sources changed; that rebuild goes unannounced)."""
    try:
        return (Path(cpp_extension._get_build_directory(LIB, verbose=False)) / f"{LIB}.so").exists()
    except Exception:  # a private helper: if it moves, announce every load rather than fail
        return False


def _register_fake() -> None:
    """Shape rules for torch.compile: one int64 token per row; sample_next_ only mutates its inputs."""
    @torch.library.register_fake(f"{LIB}::sample")
    def _(logits, temperature, top_k, top_p, seed, offset, min_p):
        return logits.new_empty((logits.shape[0],), dtype=torch.long)

    @torch.library.register_fake(f"{LIB}::sample_next_")
    def _(logits, temperature, top_k, top_p, seed, offset, out, min_p):
        return None


# torch.ops.gpt2engine_C.sample and .sample_next_ once ``load`` succeeded: plain globals that
# torch.compile can read.
SAMPLE_OP = None
SAMPLE_NEXT_OP = None


@functools.cache
def load() -> bool:
    """Register torch.ops.gpt2engine_C.sample and sample_next_. False (with one warning) when it cannot be built."""
    global SAMPLE_OP, SAMPLE_NEXT_OP
    if not _load_library():
        return False
    _register_fake()
    SAMPLE_OP = getattr(torch.ops, LIB).sample
    SAMPLE_NEXT_OP = getattr(torch.ops, LIB).sample_next_
    return True


def built_library(directory: Path = PACKAGE) -> Path | None:
    """The extension ``setup.py`` built into kernels/ for this very interpreter (its ABI tag, e.g.
    ``_C.cpython-312-x86_64-linux-gnu.so``), or None: a build for another Python cannot be loaded."""
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


def _load_library() -> bool:
    built = built_library()
    if built:
        torch.ops.load_library(str(built))
        return True
    if not (CSRC / "sampling_cpu.cpp").exists():
        warnings.warn("gpt2engine: the sampling extension was not built and csrc/ is not here; "
                      "using the PyTorch reference sampler", stacklevel=3)
        return False
    from torch.utils import cpp_extension

    cuda = _cuda_build_possible()
    if not _cached(cpp_extension):  # later processes load the cached build silently
        print(f"gpt2engine: compiling the {'CPU+CUDA' if cuda else 'CPU'} sampling extension once "
              "(cached by torch.utils.cpp_extension)...", file=sys.stderr, flush=True)
    try:
        cpp_extension.load(
            name=LIB, sources=sources(cuda), is_python_module=False, verbose=False,
            extra_cflags=["-O3"], extra_cuda_cflags=["-O3"] if cuda else None)
    except Exception as e:  # no compiler, no headers: the reference still samples correctly
        warnings.warn(f"gpt2engine: could not compile the sampling extension ({str(e).splitlines()[0]}); "
                      "using the PyTorch reference sampler", stacklevel=3)
        return False
    return True
