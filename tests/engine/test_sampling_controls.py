"""min_p, penalties, stop strings, max_time and shared prefills through engine.generate, each
against an independent reference (HF's processors and generate, a plain recompute loop)."""

import time

import pytest
import torch

import engine
from engine.errors import ParameterError
from engine.core.request import Request, SamplingParams
from gpt2kernels.sampling import sample_ref


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return engine.load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)


def _plain_loop(model, prompt, n, seed, repetition=1.0, presence=0.0, frequency=0.0, **sampling):
    """Full recompute every token; HF's repetition processor, OpenAI's formula, then the reference sampler."""
    from transformers import RepetitionPenaltyLogitsProcessor

    ids = list(prompt)
    for i in range(n):
        logits = model(torch.tensor([ids]))[:, -1].float()
        logits = RepetitionPenaltyLogitsProcessor(repetition)(torch.tensor([ids]), logits)
        out = ids[len(prompt):]
        for t in set(out):
            logits[0, t] -= out.count(t) * frequency + presence
        ids.append(int(sample_ref(logits, seed=torch.tensor([seed]), offset=torch.tensor([i]), **sampling)))
    return ids[len(prompt):]


@pytest.mark.parametrize("kw", [
    dict(min_p=0.1, temperature=1.2),
    dict(repetition_penalty=1.8, temperature=0.9, top_k=40),
    dict(presence_penalty=1.5, frequency_penalty=0.7, temperature=1.0, min_p=0.02),
    dict(repetition_penalty=0.7, frequency_penalty=-1.0, temperature=0.0),
])
def test_controls_equal_a_plain_loop(model, kw):
    prompts = [engine.encode("the the the the"), engine.encode("A"), engine.encode("the the the the")]
    out = engine.generate(model, prompts, 12, seed=[3, 4, 5], stop_at_eos=False, **kw)
    ref = {"repetition": kw.pop("repetition_penalty", 1.0), "presence": kw.pop("presence_penalty", 0.0),
           "frequency": kw.pop("frequency_penalty", 0.0)}
    assert out.tokens == [_plain_loop(model, p, 12, s, **ref, **kw) for p, s in zip(prompts, [3, 4, 5])]


def test_greedy_repetition_penalty_equals_hf_generate(model, hf_model):
    prompt = engine.encode("one two one two one two")
    ours = engine.generate(model, [prompt], 15, temperature=0, repetition_penalty=1.5, stop_at_eos=False).tokens[0]
    theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=15, do_sample=False, repetition_penalty=1.5,
                               pad_token_id=0, eos_token_id=None)
    assert ours == theirs[0, len(prompt):].tolist()


def test_penalties_change_what_is_generated(model):
    """The tiny random model repeats itself greedily; a strong penalty must break that."""
    plain = engine.generate(model, "x", 30, temperature=0, stop_at_eos=False).tokens[0]
    penalised = engine.generate(model, "x", 30, temperature=0, frequency_penalty=2.0, stop_at_eos=False).tokens[0]
    assert len(set(penalised)) > len(set(plain))


def test_stop_strings_cut_the_text_and_end_the_row(model):
    full = engine.generate(model, ["Hello", "Other"], 30, temperature=0, stop_at_eos=False)
    text = full.texts[0]
    stop = text[7:10]  # a piece in the middle of the text, likely across a token boundary
    pieces = []
    out = engine.generate(model, ["Hello", "Other"], 30, temperature=0, stop_at_eos=False, stop=[stop, "\x00never"],
                          on_text=lambda row, piece: pieces.append(piece) if row == 0 else None)
    cut = text.index(stop)
    assert out.texts[0] == text[:cut] and "".join(pieces) == text[:cut]
    assert out.finish_reasons[0] == "stop" and len(out.tokens[0]) < 30
    assert out.texts[1] == full.texts[1] and out.finish_reasons[1] == "length"  # the other row is untouched


@pytest.mark.parametrize("pieces,stops,streamed,text,reason", [
    (["ab", "c", "de"], ("cd",), ["ab"], "ab", "stop"),            # matched across pieces
    (["ab", "c", "x"], ("cd",), ["ab", "cx"], "abcx", "length"),   # held back, then released
    (["a", "bc"], ("b", "abc"), [], "", "stop"),                   # the earliest start wins
    (["a", "bd"], ("b", "abc"), ["a"], "a", "stop"),
    (["xy"], ("y",), ["x"], "x", "stop"),
])
def test_stop_matcher(pieces, stops, streamed, text, reason, monkeypatch):
    import engine.core.request

    got = []
    r = Request([1], len(pieces), SamplingParams(), stop=stops, on_text=got.append)

    class Decoder:  # token i decodes to pieces[i]
        def push(self, token):
            return pieces[token]

        def flush(self):
            return ""

    monkeypatch.setattr(engine.core.request, "StreamDecoder", Decoder)
    for i in range(len(pieces)):
        r.accept(i)
    assert got == streamed and r.text == text and r.finish_reason == reason and r.finished


def test_max_time_ends_rows(model):
    start = time.perf_counter()
    out = engine.generate(model, "slow", 120, temperature=0, stop_at_eos=False, max_time=0.05)
    assert out.finish_reasons == ["time"] and len(out.tokens[0]) < 120
    assert time.perf_counter() - start < 5


def test_identical_prompts_share_one_prefill(model, monkeypatch):
    rows = []
    real = type(model).prefill

    def counting(self, input_ids, *args, **kw):
        rows.append(input_ids.shape[0])
        return real(self, input_ids, *args, **kw)

    monkeypatch.setattr(type(model), "prefill", counting)
    out = engine.generate(model, ["same", "other", "same", "same"], 6, temperature=1.0, seed=[1, 2, 3, 4],
                          stop_at_eos=False)
    assert rows == [2]
    monkeypatch.setattr(type(model), "prefill", real)
    for r, (p, s) in enumerate(zip(["same", "other", "same", "same"], [1, 2, 3, 4])):
        assert engine.generate(model, p, 6, temperature=1.0, seed=[s], stop_at_eos=False).tokens[0] == out.tokens[r]


@pytest.mark.parametrize("kw,param", [
    (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(stop=""), "stop"), (dict(stop=["a", 3]), "stop"), (dict(max_time=0), "max_time"),
    (dict(max_time=float("nan")), "max_time"), (dict(top_k=1.5), "top_k"), (dict(temperature="hot"), "temperature"),
])
def test_bad_controls_name_the_parameter(model, kw, param):
    with pytest.raises(ParameterError, match=param) as e:
        engine.generate(model, "hi", 3, **kw)
    assert e.value.param == param


def test_triton_penalties_equal_eager(small_vocab_checkpoint):
    """The triton backend penalises with its kernel (interpreted here), the eager one with the reference."""
    models = [engine.load_model(small_vocab_checkpoint, device="cpu", dtype=torch.float32, backend=b)
              for b in ("eager", "triton")]
    kw = dict(temperature=0.8, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.5, min_p=0.01,
              seed=[5, 6], stop_at_eos=False)
    eager, triton = (engine.generate(m, [[1, 2, 3, 2], [9]], 5, **kw).tokens for m in models)
    assert triton == eager
