"""The ahead-of-time report compiles exactly what runs, and a generation compiles nothing new after its first step.

``python -m gpt2kernels.aot`` compiles, for sm_80 and sm_90, every kernel variant its launchers produce
at GPT-2 shapes, keyed the way Triton's JIT keys its cache. Here: those variants compile without
spills (in a fresh process: the interpreter, on for the other CPU tests, replaces kernels with Python
functions); every launch of a generation at gpt2's width is one of them; and the
launches of every decode step are identical (no JIT compile mid-generation, no shape change).
Needs no GPU: only Triton's bundled ptxas/cuobjdump.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
from engine.model.cache import KVCache
from gpt2kernels.aot import MODULES, aot_recording, record_launches

ROOT = Path(__file__).resolve().parents[2]


def test_every_kernel_compiles_for_ampere_and_hopper_without_spills():
    """A subset: 24 variants per arch, every kernel among them (11 s on 2 cores from a cold Triton
    cache). All 818 took 3:18 cold, and under a loaded machine ran past this test's timeout:
    ``.ci/run`` compiles them all in a step of its own, under Triton 3.9 and 3.6."""
    pytest.importorskip("triton")
    from gpt2kernels.aot import cuobjdump

    if not cuobjdump().exists():
        pytest.skip("this triton wheel has no bundled cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-m", "gpt2kernels.aot", "--subset", "24"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "48 compiles, 0 failure(s)" in r.stdout
    compiled = set(re.findall(r"^ *\d+ .*? (\w+)\[", r.stdout, flags=re.M))
    assert compiled >= {"linear_fwd_kernel", "decode_attn_fwd_kernel", "flash_attn_fwd_kernel", "layer_norm_fwd_kernel",
                        "cross_entropy_kernel", "decode_embed_fwd_kernel", "apply_penalties_fwd_kernel"}, compiled


@pytest.fixture(scope="module")
def gpt2_width_checkpoint(tmp_path_factory):
    """One block of gpt2 itself (768 wide, 12 heads, vocab 50257): the shapes the AOT report must cover."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1))
    path = tmp_path_factory.mktemp("gpt2_width")
    model.save_pretrained(path)
    return path


def _run_requests(model, prompts, steps: int, **sampling) -> None:
    """What ``engine.generate`` launches for ``prompts``: the runner's prefill, first draw and decode
    steps (tokens are not read: with launches recorded but not executed they are meaningless)."""
    from engine.core.request import Request, SamplingParams
    from engine.core.runner import admit_batch, runner_for

    runner = runner_for(model)
    requests = [Request(p, steps + 1, SamplingParams(**sampling)) for p in prompts]
    plan = admit_batch(runner, requests)
    for _ in range(steps):
        runner.step(plan, use_graph=False)


@pytest.mark.parametrize("quantize", [None, "int8-all"])
def test_every_launch_of_a_generation_is_an_aot_variant(gpt2_width_checkpoint, device, quantize):
    """On a GPU the launches are the JIT's own, with real device pointers. On CPU they are recorded
    with the same arguments but not executed: interpreting every program of gpt2-width kernels
    would take minutes, and no launch argument depends on a kernel's output (no host sync)."""
    aot = aot_recording()
    model = engine.load_model(str(gpt2_width_checkpoint), device=device, dtype="float16", backend="triton",
                              quantize=quantize)
    compiled_before = _jit_cache_keys()
    with record_launches(execute=device.type == "cuda") as run:
        _run_requests(model, [list(range(7))], steps=2, temperature=0.0)               # batch 1: M = 1, greedy
        _run_requests(model, [[1, 2, 3], list(range(20))], steps=2, temperature=1.0)   # ragged batch
        _run_requests(model, [[1, 2, 3], list(range(20))], steps=2, temperature=0.0)   # greedy, tiled
        _run_requests(model, [[r, 2, 3] for r in range(33)], steps=1, temperature=0.0)  # batch 64's tiles
    assert len(run.launches) > 20
    missing = sorted({run.jobs[90, key].label for _, key in run.launches if key not in aot.keys(90)})
    assert not missing, "launched but not compiled by gpt2kernels.aot:\n" + "\n".join(missing)
    # batch 1's specialisations, the fused decode ops, the greedy lm_head
    for label in ("M=1", "Lq=1", "NORM=True", "KV_CACHE=True", "ARGMAX=True"):
        assert any(label in run.jobs[90, key].label for _, key in run.launches), label
    if device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0):
        # What the JIT itself compiled for this generation on a Hopper GPU, read from its kernel caches.
        compiled = _jit_cache_keys() - compiled_before
        assert compiled <= aot.keys(90), sorted(compiled - aot.keys(90))


def _jit_cache_keys() -> set[str]:
    """The cache keys of every variant the JIT has compiled so far (none under the interpreter)."""
    from triton.runtime.jit import JITFunction

    kernels_ = [v for m in MODULES for v in vars(sys.modules[m]).values() if isinstance(v, JITFunction)]
    return {key for fn in kernels_ for caches in fn.device_caches.values() for key in caches[0]}


def test_decode_steps_launch_identical_variants(small_vocab_checkpoint, device):
    """Lengths cross multiples of 16 and 64 here: nothing the kernels are specialised on may follow them."""
    model = engine.load_model(str(small_vocab_checkpoint), device=device, dtype="float32", backend="triton")
    prompts = torch.randint(0, 1000, (2, 62), device=device)
    cache = KVCache(model.config, 2, 128, model.dtype, model.device)
    logits = model.prefill(prompts, torch.tensor([62, 46], dtype=torch.int32, device=device), cache)
    steps = []
    for _ in range(4):  # lengths 62 -> 65 and 46 -> 49
        with record_launches() as step:
            logits = model.decode(logits.argmax(-1), cache)
        steps.append(step.launches)
    assert steps[0] and all(s == steps[0] for s in steps[1:])
