"""engine.generate: prompt forms, limits, sampling parameters, stopping and streaming."""

import pytest
import torch

import engine
from engine import EOT_ID
from engine.errors import CheckpointError, ContextLengthError, EngineError, NumericalError, ParameterError


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
    # TINY has 128 positions; the last new token is never fed back, so 120 + 9 fit and 120 + 10 do not.
    with pytest.raises(ContextLengthError, match=r"120 tokens plus 10 new tokens needs 129 positions.* 128"):
        engine.generate(model, [[1] * 120], 10)
    assert len(engine.generate(model, [[1] * 120], 9, temperature=0, stop_at_eos=False).tokens[0]) == 9


def test_a_prompt_filling_the_context_gets_one_token_as_in_hf(model, hf_model):
    ids = torch.randint(0, 50257, (1, 128), generator=torch.Generator().manual_seed(3))
    out = engine.generate(model, ids, 1, temperature=0, stop_at_eos=False)
    with torch.no_grad():
        assert out.tokens == [[int(hf_model(ids).logits[0, -1].argmax())]]
    with pytest.raises(ContextLengthError):
        engine.generate(model, ids, 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=1e300), "temperature"), (dict(top_k=2**70), "top_k"), (dict(seed=[1, 2]), "seed"),
    (dict(seed=1.5), "seed"), (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(seed=-5), "seed"), (dict(seed=2**64), "seed"), (dict(seed=[0, -1]), "seed"),  # the CLI's and server's rule
])
def test_bad_parameters(model, kwargs, match):
    args = dict(max_new_tokens=3) | kwargs
    with pytest.raises(ParameterError, match=match) as e:
        engine.generate(model, "hi", **args)
    assert e.value.param == match


def test_bad_token_ids(model):
    with pytest.raises(EngineError, match="prompt 0 holds token id 50257, outside the model's vocabulary of 50257"):
        engine.generate(model, [[5, 50257]], 2)


@pytest.mark.parametrize("prompts", [None, 5, b"hi", [[1.5, 2.0]], [[True]], [True, 1], [1.5], ["a", [1]], [[1], "a"],
                                     [], [None], torch.tensor([[1.0]]), {"a": 1}])
def test_prompts_of_the_wrong_kind_are_refused(model, prompts):
    with pytest.raises(ParameterError, match="prompt") as e:
        engine.generate(model, prompts, 2)
    assert e.value.param == "prompts"


def test_a_flat_list_of_ids_is_one_prompt(model):
    import numpy as np
    kw = dict(temperature=0, stop_at_eos=False)
    want = engine.generate(model, [[1, 2, 3]], 3, **kw).tokens
    assert engine.generate(model, [1, 2, 3], 3, **kw).tokens == want
    assert engine.generate(model, [list(np.array([1, 2, 3]))], 3, **kw).tokens == want  # numpy's integers


def test_text_prompts_are_checked_against_a_small_vocabulary(small_vocab_checkpoint):
    small = engine.load_model(small_vocab_checkpoint, device="cpu", dtype=torch.float32)
    with pytest.raises(ParameterError, match=r"prompt 0 holds token id 50256 \(an empty prompt starts from it\), "
                                             r"outside the model's vocabulary of 1000"):
        engine.generate(small, "", 2)
    with pytest.raises(ParameterError, match="prompt 1 holds token id 31373"):
        engine.generate(small, ["!", "hello"], 2)  # "!" is id 0, "hello" 31373
    assert len(engine.generate(small, [[0, 1, 2]], 2, stop_at_eos=False).tokens[0]) == 2


@pytest.mark.parametrize("vocab", [50258, 50304])
def test_ids_beyond_the_tokenizer_decode_to_nothing(tmp_path, vocab):
    """A padded (50304) or extended (an added pad token, 50258) vocabulary: the last id always wins here."""
    transformers = pytest.importorskip("transformers")
    from tests.conftest import TINY
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, "vocab_size": vocab}))
    with torch.no_grad():  # ln_f outputs its bias whatever the input; wte's last row aligns with it
        hf.transformer.ln_f.weight.zero_()
        hf.transformer.ln_f.bias.normal_()
        hf.transformer.wte.weight[-1] = 100 * hf.transformer.ln_f.bias
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=f"vocabulary has {vocab} ids.*decode to nothing"):
        m = engine.load_model(tmp_path, device="cpu", dtype=torch.float32)
    pieces = []
    out = engine.generate(m, "Hello", 3, temperature=0, on_text=lambda r, p: pieces.append(p))
    assert out.tokens == [[vocab - 1] * 3] and out.texts == [""] and "".join(pieces) == ""
    assert engine.decode([31373, vocab - 1, 995]) == "hello world"


def test_nan_weights_are_refused_at_load_and_nan_logits_are_an_engine_error(model, tiny_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copy(tiny_checkpoint / "config.json", tmp_path)
    state = load_file(tiny_checkpoint / "model.safetensors")
    state["transformer.h.1.mlp.c_fc.weight"][3, 4] = float("nan")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="h.1.mlp.c_fc.weight holds NaN"):
        engine.load_model(tmp_path, device="cpu")
    broken = engine.load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)
    broken.wte.weight[7] = float("inf")
    with pytest.raises(NumericalError, match="NaN or all -inf logits.*float32"):
        engine.generate(broken, [[7]], 2)


def test_a_temperature_that_overflows_is_greedy(model):
    kw = dict(stop_at_eos=False, seed=0)
    greedy = engine.generate(model, "x", 6, temperature=0, **kw).tokens
    assert engine.generate(model, "x", 6, temperature=1e-40, top_k=5, **kw).tokens == greedy


def test_seed_reproduces_and_differs(model):
    kw = dict(temperature=1.0, top_k=0, top_p=0.95, stop_at_eos=False)
    a = engine.generate(model, "x", 20, seed=1, **kw).tokens
    assert a == engine.generate(model, "x", 20, seed=1, **kw).tokens
    assert a != engine.generate(model, "x", 20, seed=2, **kw).tokens


def test_stop_at_eos(model, monkeypatch):
    # Force EOS at the third sampled token (offset 2) of row 0 only; row 1 runs to the end.
    import engine.core.runner

    real = engine.core.runner.sample_next_

    def fake(logits, temperature, top_k, top_p, min_p, seed, offset, out):
        at_third = (torch.arange(len(out)) == 0) & (offset == 2)
        real(logits, temperature, top_k, top_p, min_p, seed, offset, out)
        out.copy_(torch.where(at_third, EOT_ID, out))

    monkeypatch.setattr(engine.core.runner, "sample_next_", fake)
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


def test_an_unseeded_run_returns_seeds_that_reproduce_it(model):
    kw = dict(temperature=1.0, top_p=0.9, stop_at_eos=False)
    out = engine.generate(model, ["a", "b c"], 8, **kw)
    assert len(out.seeds) == 2 and out.seeds[1] == out.seeds[0] + 1
    assert engine.generate(model, ["a", "b c"], 8, seed=out.seeds, **kw).tokens == out.tokens


def test_cancel_ends_every_row_at_the_next_step(model):
    import threading
    cancel = threading.Event()
    seen = []

    def on_text(row, piece):
        seen.append(row)
        if len(seen) == 5:
            cancel.set()

    out = engine.generate(model, ["a", "b"], 50, temperature=0, stop_at_eos=False, on_text=on_text, cancel=cancel)
    assert out.finish_reasons == ["cancelled", "cancelled"]
    assert all(3 <= len(t) < 50 for t in out.tokens)
