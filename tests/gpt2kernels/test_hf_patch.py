"""gpt2kernels.patch_hf_gpt2: a patched HF GPT-2 trains and infers as the unpatched one does."""

import copy
import subprocess
import sys

import pytest
import torch

import gpt2kernels

transformers = pytest.importorskip("transformers")


def _pair(**overrides):
    """(HF GPT-2, its patched deep copy): 2 layers, GPT-2's vocabulary, random weights, no dropout."""
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg)
    return ref, gpt2kernels.patch_hf_gpt2(copy.deepcopy(ref))


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_one_training_step_matches_unpatched(device):
    """Loss, every parameter's gradient, and the loss after one AdamW step agree in fp32. (AdamW's
    first step moves each weight by about lr * sign(grad): parameters whose gradient is ~0 differ by up
    to 2 lr between any two implementations, so the step is judged by the loss it leads to.)"""
    ref, patched = _pair()
    ref.to(device).train(), patched.to(device).train()
    ids = torch.randint(0, 50257, (2, 19), generator=torch.Generator().manual_seed(1)).to(device)
    labels = ids.clone()
    labels[0, :3] = -100  # ignored positions take part too
    losses, after = [], []
    for model in (ref, patched):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss = model(ids, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
        opt.step()
        after.append(model(ids, labels=labels).loss.detach())
    assert _rel(losses[1], losses[0]) <= 1e-4
    assert after[0] < losses[0] and _rel(after[1], after[0]) <= 1e-4
    patched_params = dict(patched.named_parameters())
    for name, p in ref.named_parameters():
        got = patched_params[name].grad
        assert got is not None and not torch.isnan(got).any(), name
        assert _rel(got, p.grad) <= 1e-4, name
    assert patched(ids, labels=labels).logits is None  # the loss never made the logits


def test_inference_logits_padding_and_generation_match(device):
    ref, patched = _pair()
    ref.to(device).eval(), patched.to(device).eval()
    ids = torch.randint(0, 50257, (2, 11), generator=torch.Generator().manual_seed(2)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: a mask the kernel does not take goes to SDPA, with a warning
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
        with pytest.warns(UserWarning, match="padding mask"):
            got = patched(ids, attention_mask=mask).logits
        torch.testing.assert_close(got, ref(ids, attention_mask=mask).logits, atol=1e-4, rtol=1e-4)
        kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(patched.generate(ids[1:], **kwargs), ref.generate(ids[1:], **kwargs))


def test_patch_is_per_instance_and_idempotent():
    ref, patched = _pair()
    assert gpt2kernels.patch_hf_gpt2(patched) is patched
    fresh = transformers.GPT2LMHeadModel(ref.config)
    assert "forward" not in vars(fresh) and "forward" not in vars(fresh.transformer.h[0].mlp)
    assert "forward" in vars(patched) and "forward" in vars(patched.transformer.h[0].mlp)


def test_non_gpt2_models_are_refused():
    with pytest.raises(ValueError, match="GPT-2 model"):
        gpt2kernels.patch_hf_gpt2(torch.nn.Linear(2, 2))


def test_importing_gpt2kernels_does_not_import_transformers():
    code = "import sys, gpt2kernels; assert 'transformers' not in sys.modules, 'transformers was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
