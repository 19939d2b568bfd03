"""engine.generate: prompt forms, limits, sampling parameters, stopping and streaming."""

import pytest
import torch

import engine
from engine import EOT_ID
from engine.errors import ContextLengthError, EngineError


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return engine.load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)


def test_prompt_forms_agree(model):
    text = "The quick brown fox"
    ids = engine.encode(text)
    outs = [engine.generate(model, p, 5, temperature=0, stop_at_eos=False)
            for p in (text, [text], [ids], torch.tensor([ids]))]
    assert all(o.tokens == outs[0].tokens for o in outs)
    assert outs[0].texts == [engine.decode(outs[0].tokens[0])] and outs[2].texts is None


def test_empty_prompt_starts_from_endoftext(model):
    out = engine.generate(model, "", 3, temperature=0, stop_at_eos=False)
    assert out.prompt_tokens == [[EOT_ID]]
    assert out.tokens == engine.generate(model, [[EOT_ID]], 3, temperature=0, stop_at_eos=False).tokens


def test_context_limit_is_checked_before_compute(model):
    # TINY has 128 positions: 120 prompt tokens + 9 new ones do not fit.
    with pytest.raises(ContextLengthError, match=r"120 tokens plus 9 new tokens = 129 exceeds .* 128 positions"):
        engine.generate(model, [[1] * 120], 9)
    assert len(engine.generate(model, [[1] * 120], 8, temperature=0, stop_at_eos=False).tokens[0]) == 8


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_parameters(model, kwargs, match):
    args = dict(max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=match):
        engine.generate(model, "hi", **args)


def test_bad_token_ids(model):
    with pytest.raises(EngineError, match="outside"):
        engine.generate(model, [[5, 50257]], 2)


def test_seed_reproduces_and_differs(model):
    kw = dict(temperature=1.0, top_k=0, top_p=0.95, stop_at_eos=False)
    a = engine.generate(model, "x", 20, seed=1, **kw).tokens
    assert a == engine.generate(model, "x", 20, seed=1, **kw).tokens
    assert a != engine.generate(model, "x", 20, seed=2, **kw).tokens


def test_stop_at_eos(model, monkeypatch):
    # Force EOS at the third sampled token (offset 2) of row 0 only; row 1 runs to the end.
    import engine.runner

    real = engine.runner.sample_next_

    def fake(logits, temperature, top_k, top_p, seed, offset, out, min_p):
        at_third = (torch.arange(len(out)) == 0) & (offset == 2)
        real(logits, temperature, top_k, top_p, seed, offset, out, min_p)
        out.copy_(torch.where(at_third, EOT_ID, out))

    monkeypatch.setattr(engine.runner, "sample_next_", fake)
    out = engine.generate(model, ["a", "b"], 6, temperature=0)
    assert len(out.tokens[0]) == 3 and out.tokens[0][-1] == EOT_ID and len(out.tokens[1]) == 6
    assert "<|endoftext|>" not in out.texts[0]


def test_streaming_pieces_equal_final_text(model):
    pieces = {0: [], 1: []}
    out = engine.generate(model, ["Once upon", "😀 日本"], 25, temperature=1.0, seed=3, stop_at_eos=False,
                          on_text=lambda row, piece: pieces[row].append(piece))
    assert ["".join(pieces[0]), "".join(pieces[1])] == out.texts


def test_stats(model):
    out = engine.generate(model, "timing", 10, temperature=0, stop_at_eos=False)
    assert out.decode_steps == 9 and out.prefill_seconds > 0 and out.decode_tokens_per_second > 0
