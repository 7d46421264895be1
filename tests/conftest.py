"""Shared test setup."""

import os

import torch

# The test models are tiny: one intra-op thread is fastest, and on a busy 2-core machine the OpenMP hand-off
# made single small ops (index_add_ in the MoE reference, 1x1 convs) take milliseconds instead of microseconds.
torch.set_num_threads(1)

# Without a GPU the Triton kernels run under Triton's CPU interpreter. The flag is read when a kernel is
# decorated, so it must be set before any kernels.triton_* module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
