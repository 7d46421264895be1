"""Shared test setup."""

import torch

# The test models are tiny: one intra-op thread is fastest, and on a busy 2-core machine the OpenMP hand-off
# made single small ops (index_add_ in the MoE reference, 1x1 convs) take milliseconds instead of microseconds.
torch.set_num_threads(1)
