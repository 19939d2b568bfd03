"""Scoring and perplexity against HF's labels= loss and log-softmax on the same weights; the sliding
windows; python -m engine.eval."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
from engine.errors import EngineError
from engine.scoring import windows

ROOT = Path(__file__).resolve().parents[2]


def _model(checkpoint, backend="eager", dtype="float32", device="cpu"):
    return engine.load_model(str(checkpoint), device=device, dtype=dtype, backend=backend)


def _hf_windows_loss(hf, ids, window, stride):
    """HF's perplexity guide, verbatim in method: (sum of NLL over scored tokens, tokens scored)."""
    ids = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + window, ids.shape[1])
        trg_len = end - prev_end
        inputs = ids[:, begin:end]
        labels = inputs.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(inputs, labels=labels).loss
        n = (labels[:, 1:] != -100).sum().item()
        if n:
            nll += loss.item() * n
            count += n
        prev_end = end
        if end == ids.shape[1]:
            break
    return nll, count


@pytest.mark.parametrize("n, window, stride", [(10, 4, 2), (10, 4, 4), (9, 4, 3), (2, 4, 2), (300, 128, 37)])
def test_windows_score_each_token_once_as_hf_does(n, window, stride):
    spans = windows(n, window, stride)
    scored = [p for w in spans for p in range(w.first, w.end)]
    assert len(scored) == len(set(scored))
    assert all(w.end - w.begin <= window and w.begin < w.first for w in spans)
    if stride < window:
        assert scored == list(range(1, n))
    else:  # non-overlapping windows: each window's first token has no context, as in HF's guide
        assert scored == [p for p in range(1, n) if p % window]


@pytest.mark.parametrize("window, stride, batch", [(128, 64, 1), (50, 50, 3), (40, 17, 4)])
def test_perplexity_equals_hf_labels_loss(tiny_checkpoint, hf_model, window, stride, batch):
    g = torch.Generator().manual_seed(window)
    ids = torch.randint(0, 50257, (301,), generator=g).tolist()
    got = engine.perplexity(_model(tiny_checkpoint), ids, window=window, stride=stride, batch_size=batch)
    nll, count = _hf_windows_loss(hf_model, ids, window, stride)
    assert got.tokens == count
    assert got.loss == pytest.approx(nll / count, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_score_equals_hf_log_softmax(tiny_checkpoint, hf_model):
    model = _model(tiny_checkpoint)
    texts = ["The quick brown fox jumps over the lazy dog.", [5, 6, 7], "x", list(range(1000, 1300))]
    got = engine.score(model, texts, window=100, stride=60, batch_size=3)
    for text, s in zip(texts, got):
        ids = engine.encode(text) if isinstance(text, str) else text
        assert s.tokens == ids and len(s.token_logprobs) == len(ids) - 1
        want = []
        for p in range(1, len(ids)):  # each token with the context its window gives
            w = next(w for w in windows(len(ids), 100, 60) if w.first <= p < w.end)
            with torch.no_grad():
                logits = hf_model(torch.tensor([ids[w.begin:p]])).logits[0, -1].double()
            want.append(torch.log_softmax(logits, -1)[ids[p]].item())
        torch.testing.assert_close(torch.tensor(s.token_logprobs, dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64), atol=2e-5, rtol=1e-5)
        assert s.total_logprob == pytest.approx(sum(want), rel=1e-5, abs=1e-4)
    assert got[2].token_logprobs == [] and got[2].total_logprob == 0.0  # one token: nothing to score


def test_score_through_the_triton_kernel(small_vocab_checkpoint):
    """The triton backend's fused lm_head + cross-entropy (interpreted on CPU) scores as eager does."""
    ids = torch.randint(0, 1000, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    eager = engine.score(_model(small_vocab_checkpoint), ids)[0]
    triton_ = engine.score(_model(small_vocab_checkpoint, "triton"), ids)[0]
    torch.testing.assert_close(torch.tensor(triton_.token_logprobs), torch.tensor(eager.token_logprobs),
                               atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("float16", 3e-2), ("bfloat16", 1e-1)])
def test_perplexity_on_the_gpu_equals_hf(tiny_checkpoint, hf_model, dtype, tol):
    ids = torch.randint(0, 50257, (400,), generator=torch.Generator().manual_seed(1)).tolist()
    got = engine.perplexity(_model(tiny_checkpoint, "triton", dtype, "cuda"), ids, window=128, stride=64, batch_size=4)
    nll, count = _hf_windows_loss(hf_model, ids, 128, 64)
    assert got.tokens == count and got.loss == pytest.approx(nll / count, rel=tol / 10, abs=tol)


@pytest.mark.parametrize("call, match", [
    (lambda m: engine.perplexity(m, [5]), "the text has 1 token"),
    (lambda m: engine.perplexity(m, "hello world", window=129), r"window must be an integer in \[2, 128\]"),
    (lambda m: engine.perplexity(m, "hello world", window=10, stride=11), r"stride must be an integer in \[1, window"),
    (lambda m: engine.perplexity(m, [1, 2, 50257]), r"token id 50257, outside the model's vocabulary"),
    (lambda m: engine.perplexity(m, [1, 2], batch_size=0), "batch_size must be an integer >= 1"),
    (lambda m: engine.score(m, []), "texts must be a non-empty list"),
    (lambda m: engine.score(m, [None]), r"texts\[0\] must be a string or a list of token ids, got NoneType"),
    (lambda m: engine.score(m, "a b c", window=10, stride=10), r"stride must be < window \(10\)"),
])
def test_bad_input_is_a_clear_error(tiny_checkpoint, call, match):
    with pytest.raises(EngineError, match=match):
        call(_model(tiny_checkpoint))


def _eval(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "engine.eval", *args], capture_output=True, text=True, input=stdin,
                          cwd=ROOT, timeout=300)


def test_eval_cli_prints_perplexity_and_json(tiny_checkpoint, hf_model, tmp_path):
    text = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 6
    path = tmp_path / "t.txt"
    path.write_text(text)
    r = _eval("--model", str(tiny_checkpoint), "--text-file", str(path), "--window", "64", "--stride", "32", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    nll, count = _hf_windows_loss(hf_model, engine.encode(text), 64, 32)
    assert result["tokens"] == count and result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["dtype"] == "float32" and result["backend"] == "eager" and result["tokens_per_second"] > 0
    r = _eval("--model", str(tiny_checkpoint), "--max-tokens", "20", stdin=text)
    assert r.returncode == 0 and "tokens scored: 19\n" in r.stdout and "perplexity: " in r.stdout


@pytest.mark.parametrize("args, stdin, match", [
    (["--text-file", "/no/such/file"], None, "error: cannot read --text-file /no/such/file"),
    ([], "  \n", "error: the text is empty"),
    (["--window", "4096"], "some text here", r"error: window must be an integer in \[2, 128\]"),
    (["--window", "16", "--stride", "17"], "some text here", r"error: stride must be an integer in \[1, window = 16\]"),
    (["--stride", "0"], "some text", "error: argument --stride: --stride must be an integer >= 1, got 0"),
    (["--device", "tpu"], "some text", "error: invalid device 'tpu'"),
])
def test_eval_cli_mistakes_are_one_line(tiny_checkpoint, args, stdin, match):
    r = _eval("--model", str(tiny_checkpoint), *args, stdin=stdin)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and __import__("re").match(match, lines[0]), r.stderr
