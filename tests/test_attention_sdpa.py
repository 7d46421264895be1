"""The dense attention op through torch's fused SDPA (kernels.attention.attention_sdpa, what kernel_choice("triton")
runs for prefill chunks and the encoders) against its twin attention_ref: causal with a cached prefix, left
padding, the audio encoder's per-window key mask, no mask (vision segments), GQA 1/2/8, one query, and a row
with every key masked. fp32 on the CPU; fp16 where the CPU's SDPA runs it."""

import pytest
import torch

from kernels.attention import attention_ref, attention_sdpa, causal_mask
from runtime import dispatch

TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def rel_err(got, want):
    got, want = got.float(), want.float()
    err = ((got - want).norm() / want.norm()).item()
    print(f"rel {err:.2e}  max abs {(got - want).abs().max().item():.2e}")
    return err


def _qkv(batch, seq_q, seq_k, q_heads, kv_heads, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, q_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, seq_k, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, seq_k, kv_heads, head_dim, generator=gen).to(dtype)
    return q, k, v


def _key_padding(batch, seq_k, valid):
    """(B, 1, 1, S) bool: the last valid[b] keys of row b are real (left padding)."""
    positions = torch.arange(seq_k)[None, :]
    return (positions >= seq_k - torch.tensor(valid)[:, None])[:, None, None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind,batch,seq_q,seq_k,q_heads,kv_heads,head_dim", [
    ("causal", 1, 7, 7, 4, 4, 16),  # a prompt's first chunk, MHA
    ("causal", 2, 5, 12, 8, 1, 32),  # a chunk after 7 cached tokens, GQA 8
    ("causal", 3, 1, 129, 4, 2, 64),  # one query past a block
    ("padded", 3, 9, 9, 4, 2, 16),  # left-padded batch, causal
    ("window", 4, 13, 13, 4, 4, 16),  # audio windows: a key mask per window, the last window part padding
    ("none", 5, 11, 11, 6, 6, 24),  # vision segments: full attention, no mask
])
def test_sdpa_equals_the_reference(dtype, kind, batch, seq_q, seq_k, q_heads, kv_heads, head_dim):
    q, k, v = _qkv(batch, seq_q, seq_k, q_heads, kv_heads, head_dim, dtype, seed=seq_q * 31 + seq_k)
    if kind == "causal":
        mask = causal_mask(seq_q, seq_k)
    elif kind == "padded":
        mask = causal_mask(seq_q, seq_k) & _key_padding(batch, seq_k, [9, 6, 4])
    elif kind == "window":
        valid = torch.ones(batch, seq_k, dtype=torch.bool)
        valid[-1, 5:] = False
        mask = valid[:, None, None, :].expand(batch, 1, seq_q, seq_k)
    else:
        mask = None
    want = attention_ref(q, k, v, mask, head_dim ** -0.5)
    got = attention_sdpa(q, k, v, mask, head_dim ** -0.5)
    assert got.shape == want.shape and got.dtype == want.dtype and not torch.isnan(got).any()
    if kind == "padded":  # rows that see no key: the next test
        sees_a_key = mask.any(-1)[:, 0]  # [B, Sq]
        got, want = got[sees_a_key], want[sees_a_key]
    assert rel_err(got, want) <= TOL[dtype]


def test_a_row_with_every_key_masked_stays_finite_and_real_rows_exact():
    """Left padding: a padded query sees no key. The reference averages every key there (masked_fill with
    finfo.min); SDPA with a boolean mask would give NaN, which the next layer's padded keys would spread into
    the real rows. The additive finfo.min bias gives the reference's rows in fp32."""
    q, k, v = _qkv(2, 6, 6, 4, 2, 16, torch.float32, seed=5)
    mask = causal_mask(6, 6) & _key_padding(2, 6, [6, 2])
    got, want = attention_sdpa(q, k, v, mask, 0.25), attention_ref(q, k, v, mask, 0.25)
    assert not torch.isnan(got).any()
    assert rel_err(got, want) <= 1e-5  # the fully masked rows included
    q16, k16, v16 = q.half(), k.half(), v.half()
    got16 = attention_sdpa(q16, k16, v16, mask, 0.25)
    sees_a_key = mask.any(-1)[:, 0]  # [B, Sq]
    assert not torch.isnan(got16).any()
    assert rel_err(got16[sees_a_key], attention_ref(q16, k16, v16, mask, 0.25)[sees_a_key]) <= 1e-3


def test_the_triton_choice_runs_sdpa_for_attention():
    choice = dispatch.kernel_choice("triton")
    assert choice["attention"] == "triton" and choice["decode_attention"] == "triton"
    assert dispatch._IMPLS["attention"]["triton"] is attention_sdpa
    q, k, v = _qkv(1, 4, 4, 2, 2, 8, torch.float32, seed=6)
    with dispatch.using("triton"):
        got = dispatch.attention(q, k, v, causal_mask(4, 4), 0.5)
    assert rel_err(got, attention_ref(q, k, v, causal_mask(4, 4), 0.5)) <= 1e-5
