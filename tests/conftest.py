"""Shared fixtures. The Triton interpreter must be switched on before any kernel is defined."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# transformers >= 5 swaps layers of a from_pretrained model for Hugging Face hub kernels by default,
# fetched from the hub on a GPU: the oracle must be transformers' own PyTorch, and tests stay offline.
os.environ.setdefault("USE_HUB_KERNELS", "NO")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _interpreter_numpy_problem() -> str | None:
    """Triton 3.6's interpreter breaks on NumPy >= 2.4 in loops over runtime bounds (~130 kernel
    tests fail with unrelated-looking errors); 3.7+ does not. Say so once instead."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import numpy
    import triton

    version = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton.__version__} interpreter needs NumPy < 2.4 (found {numpy.__version__}): "
                "pip install 'numpy<2.4', or use Triton >= 3.7")
    return None


TINY = dict(n_layer=2, n_head=3, n_embd=96, n_positions=128, vocab_size=50257)


def pytest_configure(config):
    problem = _interpreter_numpy_problem()
    if problem:
        pytest.exit(problem, returncode=4)
    if not hasattr(config, "workerinput"):
        # Load (on a fresh machine: compile, ~10 s) the sampler once, before the xdist workers start:
        # racing to compile it, one would wait on the other and say so on stderr, which tests read.
        from gpt2kernels import _extension

        _extension.load()
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one); on a GPU also every test "
                                       "on the `device` fixture, so that `pytest -m gpu` is the GPU subset")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        # `pytest -m gpu` is the GPU subset: the GPU-only tests and every test that runs on the
        # `device` fixture (kernels and samplers on CUDA).
        for item in items:
            if "device" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.gpu)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_model():
    """A random HF GPT2LMHeadModel with an odd shape; every parameter perturbed away from HF's init."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1234)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def small_vocab_checkpoint(tmp_path_factory):
    """TINY with a 1000-token vocabulary: what the interpreted Triton backend can run in seconds."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(99)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, "vocab_size": 1000}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("small_vocab_gpt2")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(hf_model, tmp_path_factory):
    """Directory holding hf_model as config.json + model.safetensors."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    hf_model.save_pretrained(path)
    return path
