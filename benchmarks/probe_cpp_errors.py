"""Whether errors raised inside the compiled sampler reach Python as RuntimeErrors.

    python -m benchmarks.probe_cpp_errors [cpu|cuda]   # one line per check; exit 0 when both raise

On the GPU machine's image (an H200, 2026-11-25: torch 2.11+cu130, the extension built by its
/opt/gcc toolchain) any TORCH_CHECK failing inside the extension killed the process with SIGSEGV,
on CPU tensors too, while torch's own errors raised normally: the crash is in unwinding through the
extension's frames. gpu_check.sh runs this after its build and, when it crashes, rebuilds with the
system compilers; tests/gpt2kernels/test_sampling.py runs it in a subprocess, so a crash fails one test.
"""

import sys

import torch

from gpt2kernels.sampling import load_extension, sample_next_


def main(device: str = "cpu") -> None:
    assert load_extension(), "the sampler extension did not load"
    x = torch.randn(2, 50, device=device)
    params = (torch.ones(2, device=device), torch.zeros(2, dtype=torch.long, device=device),  # SAMPLING_CONTROLS
              torch.ones(2, dtype=torch.float64, device=device), torch.zeros(2, dtype=torch.float64, device=device),
              torch.zeros(2, dtype=torch.long, device=device))  # and the seed
    good = torch.zeros(2, dtype=torch.long, device=device)
    accepted = 0
    # each fails one of the op's first checks, before any kernel runs: an int32 out, a strided offset
    for offset, out in [(good, torch.zeros(2, dtype=torch.int32, device=device)),
                        (torch.zeros(4, dtype=torch.long, device=device)[::2], good.clone())]:
        try:
            sample_next_(x, *params, offset, out)
            print("accepted")
            accepted += 1
        except RuntimeError as e:
            print(str(e).splitlines()[0])
    if accepted:
        raise SystemExit(f"the op accepted {accepted} bad output tensor(s): its checks are gone")


if __name__ == "__main__":
    main(*sys.argv[1:])
