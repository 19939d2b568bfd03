import pytest
import torch


@pytest.fixture
def device():
    """CUDA when present, else CPU under the Triton interpreter (set in tests/conftest.py)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
