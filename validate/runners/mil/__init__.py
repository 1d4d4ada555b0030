"""A MIL interpreter: runs a saved Core ML ML Program in numpy where Core ML itself cannot run (Linux).

It executes the package's own spec and weight.bin with fp16 storage, so it checks the bytes that ship; it
says nothing about the speed or the numerics of the Neural Engine or the GPU.
"""

from siliconvert.validate.runners.mil.program import MILProgram

__all__ = ["MILProgram"]
