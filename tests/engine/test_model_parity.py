"""The eager model against HF transformers on the same random weights: the parity oracle."""

import pytest
import torch

import engine
from engine.model.cache import KVCache


@pytest.fixture(scope="module")
def model32(tiny_checkpoint):
    return engine.load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)


def _ids(batch, length, seed=0):
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch,length", [(1, 1), (1, 17), (3, 40)])
def test_logits_match_hf_fp32(model32, hf_model, batch, length):
    ids = _ids(batch, length)
    with torch.no_grad():
        want = hf_model(ids).logits
    got = model32(ids)
    assert got.shape == (batch, length, 50257)
    rel = (got - want).norm() / want.norm()
    assert rel <= 1e-5, f"relative error {rel:.2e}"


def test_32_greedy_tokens_match_hf_generate(model32, hf_model):
    ids = _ids(1, 9, seed=3)
    with torch.no_grad():
        want = hf_model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=50256)
    out = engine.generate(model32, ids, 32, temperature=0, stop_at_eos=False)
    assert out.tokens[0] == want[0, 9:].tolist()


def test_kv_cache_decode_equals_full_recompute(model32):
    ids = _ids(2, 30, seed=5)
    prompt = 12
    cache = KVCache(model32.config, 2, 30, torch.float32, torch.device("cpu"))
    logits = [model32.prefill(ids[:, :prompt], torch.tensor([prompt, prompt], dtype=torch.int32), cache)]
    for t in range(prompt, 30):
        logits.append(model32.decode(ids[:, t], cache))
    full = model32(ids)
    for step, got in enumerate(logits[:-1]):
        torch.testing.assert_close(got, full[:, prompt - 1 + step], atol=1e-4, rtol=1e-4)


def test_ragged_batch_rows_equal_prompts_alone(model32):
    prompts = [_ids(1, n, seed=n)[0].tolist() for n in (1, 7, 23, 4)]
    batched = engine.generate(model32, prompts, 12, temperature=0, stop_at_eos=False)
    for prompt, tokens in zip(prompts, batched.tokens):
        alone = engine.generate(model32, [prompt], 12, temperature=0, stop_at_eos=False)
        assert tokens == alone.tokens[0]


def test_ragged_batch_sampling_rows_equal_prompts_alone(model32):
    # Sampling draws one uniform per (seed, step, row): row 0 alone must match row 0 of the batch.
    prompts = [_ids(1, 5, seed=11)[0].tolist(), _ids(1, 19, seed=12)[0].tolist()]
    batched = engine.generate(model32, prompts, 10, temperature=1.0, top_k=40, seed=7, stop_at_eos=False)
    alone = engine.generate(model32, prompts[:1], 10, temperature=1.0, top_k=40, seed=7, stop_at_eos=False)
    assert batched.tokens[0] == alone.tokens[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_tracks_fp32(tiny_checkpoint, model32, dtype):
    """Reduced precision: logits close to fp32, top-1 agreeing except at near-ties."""
    model = engine.load_model(tiny_checkpoint, device="cpu", dtype=dtype)
    ids = _ids(2, 40, seed=9)
    want, got = model32(ids), model(ids).float()
    assert (got - want).norm() / want.norm() < (2e-3 if dtype == torch.float16 else 2e-2)
    top2 = want.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05  # positions that are not near-ties
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


@pytest.mark.parametrize("measured", ["int8", "bfloat16", "float32"])
def test_default_cpu_dtype_is_this_machines_measured_choice(tiny_checkpoint, measured, monkeypatch):
    """No dtype on CPU: the one engine.model.cpu measured for this processor (test_quantize tests the
    measurement); its accuracy is that dtype's, checked by test_low_precision_tracks_fp32."""
    monkeypatch.setattr(engine.model.loader, "default_cpu_choice", lambda linear: (measured, False))
    model = engine.load_model(tiny_checkpoint, device="cpu")
    if measured == "int8":  # int8-all with fp32 activations (test_quantize checks its accuracy)
        assert model.quantize == "int8-all" and model.dtype == torch.float32
    else:
        assert model.dtype == engine.model.cpu.DTYPE_NAMES[measured] and model.quantize is None
    assert "CPU" in model.dtype_reason


def test_fp16_greedy_matches_fp32(tiny_checkpoint, model32):
    """fp16 (the CPU default before it was measured per machine) keeps the greedy tokens of fp32 here."""
    model = engine.load_model(tiny_checkpoint, device="cpu", dtype=torch.float16)
    ids = _ids(1, 9, seed=3)
    want = engine.generate(model32, ids, 32, temperature=0, stop_at_eos=False).tokens
    assert engine.generate(model, ids, 32, temperature=0, stop_at_eos=False).tokens == want


def test_triton_backend_matches_eager(small_vocab_checkpoint):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eager = engine.load_model(small_vocab_checkpoint, device=device, dtype=torch.float32)
    model = engine.load_model(small_vocab_checkpoint, device=device, dtype=torch.float32, backend="triton")
    ids = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(4)).to(device)
    torch.testing.assert_close(model(ids), eager(ids), atol=1e-4, rtol=1e-4)
    prompts = [[5, 17, 400], [9] * 11]  # ragged: exercises prefill, then split-K decode steps
    want = engine.generate(eager, prompts, 6, temperature=0, stop_at_eos=False).tokens
    assert engine.generate(model, prompts, 6, temperature=0, stop_at_eos=False).tokens == want


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_backend_matches_eager_gpu(tiny_checkpoint, dtype):
    eager = engine.load_model(tiny_checkpoint, device="cuda", dtype=dtype)
    model = engine.load_model(tiny_checkpoint, device="cuda", dtype=dtype, backend="triton")
    ids = _ids(3, 100, seed=8).cuda()
    want, got = eager(ids).float(), model(ids).float()
    assert (got - want).norm() / want.norm() < (5e-3 if dtype == torch.float16 else 3e-2)
    out = engine.generate(model, ["Hello", "A longer prompt about kernels"], 20, temperature=0.8, top_k=50, seed=0)
    assert all(len(t) > 0 for t in out.tokens)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
def test_fused_decode_logits_match_eager_and_full_recompute(small_vocab_checkpoint, dtype, tol):
    """The triton decode step (five fused kernels a layer) against the eager one (plain PyTorch) and
    against recomputing the whole sequence, step by step, on ragged rows."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eager = engine.load_model(small_vocab_checkpoint, device=device, dtype=dtype)
    fused = engine.load_model(small_vocab_checkpoint, device=device, dtype=dtype, backend="triton")
    ids = torch.randint(0, 1000, (3, 14), generator=torch.Generator().manual_seed(6)).to(device)
    lengths = torch.tensor([4, 9, 6], dtype=torch.int32, device=device)
    caches = {m: KVCache(m.config, 3, 32, dtype, torch.device(device)) for m in (eager, fused)}
    for m in (eager, fused):
        m.prefill(ids[:, :9], lengths, caches[m])
    for step in range(3):
        pos = lengths + step  # row b's next token lands at pos[b]
        tokens = ids[torch.arange(3), pos.long()]
        got, want = fused.decode(tokens, caches[fused]).float(), eager.decode(tokens, caches[eager]).float()
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        recompute = torch.stack([eager(ids[b:b + 1, :int(pos[b]) + 1])[0, -1].float() for b in range(3)])
        torch.testing.assert_close(got, recompute, atol=tol, rtol=tol)
    assert torch.equal(caches[fused].cache_lens, caches[eager].cache_lens)
