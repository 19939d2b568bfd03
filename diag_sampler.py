"""Temporary GPU diagnostic: does an error thrown inside the sampler extension crash the process?"""
import subprocess, sys
CASES = {
 "cpu_bad_out": "x=torch.randn(2,50); d='cpu'",
 "cuda_bad_out": "x=torch.randn(2,50,device='cuda'); d='cuda'",
}
BODY = """
import torch
from kernels.sampling import load_extension
assert load_extension()
{setup}
p=(torch.ones(2,device=d), torch.zeros(2,dtype=torch.long,device=d), torch.ones(2,dtype=torch.float64,device=d), torch.zeros(2,dtype=torch.long,device=d))
off=torch.zeros(2,dtype=torch.long,device=d)
try:
    torch.ops.gpt2engine_C.sample_next_(x,*p,off,torch.zeros(2,dtype=torch.int32,device=d))
except RuntimeError as e:
    print('raised:', str(e).splitlines()[0])
try:
    torch.ops.gpt2engine_C.sample(x,torch.ones(3,device=d),*p[1:],off)
except RuntimeError as e:
    print('raised:', str(e).splitlines()[0])
print('ok')
"""
for name, setup in CASES.items():
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", BODY.format(setup=setup)], capture_output=True, text=True)
    print(name, "rc", r.returncode, r.stdout.strip(), r.stderr.strip()[-800:])
    if r.returncode != 0 and len(sys.argv) > 1:
        g = subprocess.run(["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 25", "--args", sys.executable, "-c", BODY.format(setup=setup)],
                           capture_output=True, text=True, timeout=60)
        print(g.stdout[-4000:], g.stderr[-1000:])
