"""GPT-2's tanh GELU and its derivative, as Triton device functions the GEMM epilogues and prologues share.

    gelu(z) = 0.5 z (1 + tanh(u)),  u = sqrt(2/pi) (z + 0.044715 z^3)

tanh(u) = 2 sigmoid(2u) - 1 (``libdevice.tanh`` fails in the interpreter, and this compiles to fast
code), so gelu(z) = z sigmoid(2u) and gelu'(z) = s + 2 z s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 z^2),
with s = sigmoid(2u). Both compute in their argument's dtype (fp32, or fp64 for gradcheck).
"""

import triton
import triton.language as tl

# The constants are written out in each function: a compiled kernel may read no module-level float
# (the interpreter does not say so), and a tl.constexpr global breaks the interpreter's arithmetic.
# sqrt(2/pi) = 0.7978845608028654; 2 * sqrt(2/pi) = 1.5957691216057308; 3 * 0.044715 = 0.134145.


@triton.jit
def gelu_tanh(z):
    """GPT-2's GELU of z (any shape)."""
    return z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))


@triton.jit
def gelu_tanh_grad(z):
    """d gelu(z) / dz (any shape)."""
    s = tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    return s + 1.5957691216057308 * z * s * (1.0 - s) * (1.0 + 0.134145 * z * z)
