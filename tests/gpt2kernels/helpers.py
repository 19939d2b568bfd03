"""Checks every kernel test uses."""

import torch


def poison_empty(monkeypatch) -> None:
    """Make every torch.empty / empty_like a launcher allocates start as NaN, so unwritten outputs show."""
    real_empty, real_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_like(*a, **k).fill_(float("nan")))


def assert_close_to(got: torch.Tensor, want64: torch.Tensor, tol: tuple[float, float]) -> None:
    """No NaN, and within (atol, rtol) of the float64 reference."""
    atol, rtol = tol
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double().cpu(), want64.cpu(), atol=atol, rtol=rtol)
