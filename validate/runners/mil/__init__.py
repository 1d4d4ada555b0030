"""A MIL interpreter: runs a saved Core ML ML Program where Core ML itself cannot run (Linux), in torch (on CUDA
where there is a GPU, else on the CPU: torch_ops.py) or in numpy (ops.py, the reference the torch kernels are
tested against op by op).

What it emulates exactly: the bytes that ship (weights decoded from the package's own weight.bin, compressed
ones expanded by the package's own constexpr ops), the graph op by op, and fp16 storage: every op result is
rounded once to its declared type (fp16 activations, the fp16 KV cache), as Core ML stores them when it runs
a model in fp16, and ops read those fp16 values exactly (widening fp16 to float32 is exact).

What it approximates: the arithmetic inside an op. That runs in float32: products and their sums through
BLAS (sgemm, in its own order, on weights held widened to float32; cuBLAS with TF32 off on CUDA), exp and rsqrt
through numpy or torch. Core ML's GPU and Neural Engine accumulate in fp16 or fp32 depending on the unit and the
op, in their own order, with their own approximations of exp; the interpreter's logits are therefore within
rounding of a device's, not bit-identical to any. It says nothing about a device's speed.
"""

from siliconvert.validate.runners.mil.program import MILProgram

__all__ = ["MILProgram"]
