"""The Triton rotary kernel (kernels/triton_apply_rope.py) against its torch twin kernels/rope.py apply_rope_ref:
strided inputs (slices of a fused projection), per-row and shared cos/sin tables, fp32 and fp16."""

import pytest
import torch

from kernels.rope import apply_rope_ref
from tests.oracle import rel_err

triton_apply_rope = pytest.importorskip("kernels.triton_apply_rope", reason="needs triton")


@pytest.mark.parametrize("shape, table_rows", [((2, 3, 5, 16), 2), ((1, 1, 32, 128), 1), ((3, 2, 4, 8), 1)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
def test_matches_twin(shape, table_rows, dtype, tol):
    batch, seq, heads, dim = shape
    gen = torch.Generator().manual_seed(3)
    fused = torch.randn(batch, seq, heads + 2, dim, generator=gen).to(dtype)
    x = fused[:, :, 1:heads + 1]  # a strided slice, as q|k of a fused qkv output
    cos = torch.randn(table_rows, seq, dim, generator=gen).to(dtype)
    sin = torch.randn(table_rows, seq, dim, generator=gen).to(dtype)
    out = triton_apply_rope.apply_rope(x, cos, sin)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, apply_rope_ref(x, cos, sin)) <= tol


def test_rejects_mismatched_tables():
    with pytest.raises(ValueError):
        triton_apply_rope.apply_rope(torch.randn(1, 3, 2, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8))
