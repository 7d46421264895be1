"""Kernel library: each op has a torch reference twin (`<op>_ref`) with the same signature.

The references are the CPU path and the oracle for the Triton (`kernels/*.py`) and CUDA (`csrc/`)
implementations; `runtime.dispatch` chooses which one a model module calls.
"""
