"""generate(logprobs=True, top_logprobs=n) against HF's logits on the same weights: greedy, sampled
with a temperature, with a repetition penalty; batch invariance; the triton backend; CUDA graphs."""

import pytest
import torch

import engine
from engine.errors import ParameterError


def _model(checkpoint, backend="eager", dtype="float32", device="cpu"):
    return engine.load_model(str(checkpoint), device=device, dtype=dtype, backend=backend)


def _hf_logprobs(hf, prompt, tokens, temperature=1.0, repetition_penalty=1.0):
    """log_softmax of HF's (penalised) logits over the temperature at each generated position, float64."""
    from transformers import RepetitionPenaltyLogitsProcessor

    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0].double()
    out = []
    for i, t in enumerate(tokens):
        x = logits[len(prompt) - 1 + i][None]
        if repetition_penalty != 1.0:
            x = RepetitionPenaltyLogitsProcessor(repetition_penalty)(torch.tensor([prompt + tokens[:i]]), x)
        out.append(torch.log_softmax(x[0] / temperature, -1))
    return out


@pytest.mark.parametrize("temperature, penalty", [(0.0, 1.0), (0.7, 1.0), (1.3, 1.4)])
def test_logprobs_equal_hf(tiny_checkpoint, hf_model, temperature, penalty):
    prompts = [engine.encode("Once upon a time"), [5, 6, 7, 8, 9, 10]]
    out = engine.generate(_model(tiny_checkpoint), prompts, 10, temperature=temperature, repetition_penalty=penalty,
                          seed=3, stop_at_eos=False, logprobs=True, top_logprobs=5)
    for prompt, tokens, lps, tops in zip(prompts, out.tokens, out.logprobs, out.top_logprobs):
        want = _hf_logprobs(hf_model, prompt, tokens, temperature or 1.0, penalty)
        assert len(lps) == len(tops) == len(tokens) == 10
        for t, lp, top, w in zip(tokens, lps, tops, want):
            assert lp == pytest.approx(w[t].item(), abs=1e-4)
            best = w.topk(5)
            assert [i for i, _ in top] == best.indices.tolist()
            torch.testing.assert_close(torch.tensor([p for _, p in top], dtype=torch.float64), best.values,
                                       atol=1e-4, rtol=0)
            if temperature == 0:
                assert top[0][0] == t


def test_logprobs_of_a_row_do_not_depend_on_the_batch(tiny_checkpoint):
    model = _model(tiny_checkpoint)
    alone = engine.generate(model, [[1, 2, 3]], 8, temperature=0.9, seed=11, logprobs=True)
    batched = engine.generate(model, [[7] * 20, [1, 2, 3], [4]], 8, temperature=0.9, seed=[5, 11, 6], logprobs=True)
    assert batched.tokens[1] == alone.tokens[0]
    torch.testing.assert_close(torch.tensor(batched.logprobs[1]), torch.tensor(alone.logprobs[0]), atol=1e-5, rtol=0)
    assert alone.top_logprobs is None  # top_logprobs = 0: the chosen tokens' only


def test_logprobs_stop_with_their_request(tiny_checkpoint):
    out = engine.generate(_model(tiny_checkpoint), ["a", "b"], 6, temperature=0, logprobs=True, stop=[" "])
    assert [len(lp) for lp in out.logprobs] == [len(t) for t in out.tokens]
    assert all(lp <= 0 for row in out.logprobs for lp in row)


def test_triton_backend_logprobs_equal_eager(small_vocab_checkpoint):
    kwargs = dict(temperature=0.8, seed=2, stop_at_eos=False, logprobs=True, top_logprobs=3)
    eager = engine.generate(_model(small_vocab_checkpoint), [[1, 2, 3]], 3, **kwargs)
    triton_ = engine.generate(_model(small_vocab_checkpoint, "triton"), [[1, 2, 3]], 3, **kwargs)
    assert triton_.tokens == eager.tokens
    torch.testing.assert_close(torch.tensor(triton_.logprobs), torch.tensor(eager.logprobs), atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_graphed_logprobs_equal_the_plain_step(tiny_checkpoint):
    model = _model(tiny_checkpoint, "triton", "float32", "cuda")
    kwargs = dict(temperature=0.8, seed=4, stop_at_eos=False, logprobs=True, top_logprobs=2, repetition_penalty=1.2)
    plain = engine.generate(model, [[1, 2, 3], [9] * 30], 12, cuda_graph=False, **kwargs)
    graphed = engine.generate(model, [[1, 2, 3], [9] * 30], 12, cuda_graph=True, **kwargs)
    assert graphed.tokens == plain.tokens and graphed.top_logprobs == plain.top_logprobs
    torch.testing.assert_close(torch.tensor(graphed.logprobs), torch.tensor(plain.logprobs))


@pytest.mark.parametrize("kwargs, match", [
    (dict(logprobs=True, top_logprobs=21), r"top_logprobs must be an integer in \[0, 20\], got 21"),
    (dict(logprobs=True, top_logprobs=-1), r"top_logprobs must be an integer in \[0, 20\], got -1"),
    (dict(logprobs=True, top_logprobs=True), "top_logprobs must be an integer"),
    (dict(top_logprobs=3), "top_logprobs needs logprobs=True"),
])
def test_bad_logprobs_options(tiny_checkpoint, kwargs, match):
    with pytest.raises(ParameterError, match=match) as e:
        engine.generate(_model(tiny_checkpoint), "hi", 2, **kwargs)
    assert e.value.param == "top_logprobs"
