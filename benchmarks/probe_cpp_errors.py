"""Whether an error raised inside the compiled sampler reaches Python as a RuntimeError.

    python -m benchmarks.probe_cpp_errors      # exit 0 and one line when it does

On the GPU machine's image (an H200, 2026-11-25: torch 2.11+cu130, the extension built by its
/opt/gcc toolchain) any TORCH_CHECK failing inside the extension killed the process with SIGSEGV,
on CPU tensors too, while torch's own errors raised normally: the crash is in unwinding through the
extension's frames. gpu_check.sh runs this after its build and, when it crashes, rebuilds with the
system compilers and says which build raises cleanly.
"""

import torch

from kernels import _extension


def main() -> None:
    assert _extension.load(), "the sampler extension did not load"
    rows = 2
    params = [torch.ones(rows), torch.zeros(rows, dtype=torch.long), torch.ones(rows, dtype=torch.float64),
              torch.zeros(rows, dtype=torch.long)]
    try:  # an int32 `out` fails the op's first check, before any kernel runs
        torch.ops.gpt2engine_C.sample_next_(torch.zeros(rows, 5), *params, torch.zeros(rows, dtype=torch.long),
                                            torch.zeros(rows, dtype=torch.int32))
    except RuntimeError as e:
        print("C++ errors raise:", str(e).splitlines()[0])
        return
    raise SystemExit("the op accepted an int32 out: its check is gone")


if __name__ == "__main__":
    main()
