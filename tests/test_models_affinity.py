"""The unified block: each special case equals its textbook formulation (fp64, random inputs)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_container.models.affinity import (
    AttentionAffinity,
    ContextAggregation,
    DepthwiseConvAffinity,
    MixedAffinity,
    TokenMLPAffinity,
)


@pytest.fixture(autouse=True)
def _fp64():
    # Equality to 1e-10 needs float64 everywhere, including tensors the tests create.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


def _randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def test_attention_equals_multihead_self_attention():
    dim, heads, h, w = 32, 4, 5, 6
    block = ContextAggregation(dim, AttentionAffinity(dim, heads)).double()
    _randomise(block)
    x = torch.randn(2, dim, h, w)

    mha = nn.MultiheadAttention(dim, heads, bias=True, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.input_proj.weight.view(3 * dim, dim))
        mha.in_proj_bias.copy_(block.input_proj.bias)
        mha.out_proj.weight.copy_(block.output_proj.weight.view(dim, dim))
        mha.out_proj.bias.copy_(block.output_proj.bias)
    tokens = x.flatten(2).transpose(1, 2)
    ref, _ = mha(tokens, tokens, tokens, need_weights=False)
    ref = ref.transpose(1, 2).reshape(2, dim, h, w)
    torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(block.forward_dense(x), ref, rtol=1e-10, atol=1e-10)


def test_attention_rows_are_distributions():
    dim = 16
    aff = AttentionAffinity(dim, 2)
    q, k, v = (torch.randn(1, dim, 3, 4) for _ in range(3))
    a = aff.dense(v, q, k)
    assert a.shape == (1, 2, 12, 12)
    torch.testing.assert_close(a.sum(-1), torch.ones(1, 2, 12))


def test_depthwise_conv_equals_hand_built_local_affinity_and_conv2d():
    dim, h, w, ks = 6, 7, 5, 5
    block = ContextAggregation(dim, DepthwiseConvAffinity(dim, ks)).double()
    _randomise(block)
    x = torch.randn(3, dim, h, w)
    v = block.input_proj(x)
    kernel = block.affinity.conv.weight[:, 0]  # (C, ks, ks)

    # A_mij = Ker[m, i - j] for |i - j| <= k, zero elsewhere: written out position by position.
    n, r = h * w, ks // 2
    a = torch.zeros(dim, n, n)
    for yi in range(h):
        for xi in range(w):
            for yj in range(h):
                for xj in range(w):
                    dy, dx = yj - yi, xj - xi
                    if abs(dy) <= r and abs(dx) <= r:
                        a[:, yi * w + xi, yj * w + xj] = kernel[:, dy + r, dx + r]
    mixed = torch.einsum("cij,bcj->bci", a, v.flatten(2)).reshape(3, dim, h, w)
    mixed = mixed + block.affinity.conv.bias.view(1, -1, 1, 1)
    ref_hand = block.output_proj(mixed)

    ref_conv = block.output_proj(
        F.conv2d(v, block.affinity.conv.weight, block.affinity.conv.bias, padding=r, groups=dim)
    )
    out = block(x)
    torch.testing.assert_close(out, ref_hand, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref_conv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(block.forward_dense(x), ref_hand, rtol=1e-10, atol=1e-10)
    # The affinity is local and shared over positions: exactly (2r+1)^2 non-zeros per interior row.
    dense = block.affinity.dense(v)[0]
    centre = (h // 2) * w + w // 2
    assert int((dense[0, centre] != 0).sum()) == ks * ks


@pytest.mark.parametrize("heads", [1, 4])
def test_token_mlp_equals_mlp_mixer_token_mixing(heads):
    dim, h, w = 8, 4, 3
    n = h * w
    block = ContextAggregation(dim, TokenMLPAffinity(n, num_heads=heads)).double()
    _randomise(block)
    x = torch.randn(2, dim, h, w)
    v = block.input_proj(x)

    # MLP-Mixer: a Linear over the token axis, applied to every channel (per channel group for MH).
    tokens = v.flatten(2).transpose(1, 2)  # (B, N, C)
    outs = []
    group = dim // heads
    for m in range(heads):
        lin = nn.Linear(n, n, bias=False).double()
        with torch.no_grad():
            lin.weight.copy_(block.affinity.weight[m])
        chunk = tokens[..., m * group : (m + 1) * group]
        outs.append(lin(chunk.transpose(1, 2)).transpose(1, 2))
    mixed = torch.cat(outs, dim=-1).transpose(1, 2).reshape(2, dim, h, w)
    ref = block.output_proj(mixed)
    torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(block.forward_dense(x), ref, rtol=1e-10, atol=1e-10)


def test_token_mlp_rejects_other_sizes():
    aff = TokenMLPAffinity(12, grid=(3, 4))
    with pytest.raises(ValueError, match="fixed to 12 tokens"):
        aff(torch.randn(1, 4, 4, 4))


@pytest.mark.parametrize("static", ["conv", "mlp"])
def test_mixed_is_convex_combination(static):
    dim, heads, h, w = 16, 2, 4, 4
    static_aff = DepthwiseConvAffinity(dim, 5) if static == "conv" else TokenMLPAffinity(h * w)
    mixed = MixedAffinity(AttentionAffinity(dim, heads), static_aff)
    block = ContextAggregation(dim, mixed).double()
    _randomise(block)
    x = torch.randn(2, dim, h, w)
    v, q, k = block.project(x)
    alpha = 1 / (1 + math.exp(-block.affinity.mix_logit.item()))
    ref = block.output_proj(alpha * mixed.dynamic_affinity(v, q, k) + (1 - alpha) * mixed.static_affinity(v))
    torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(block.forward_dense(x), ref, rtol=1e-10, atol=1e-10)


def test_mixed_gate_starts_even():
    mixed = MixedAffinity(AttentionAffinity(8, 2), DepthwiseConvAffinity(8))
    assert mixed.mix_logit.item() == 0.0
    with pytest.raises(ValueError):
        MixedAffinity(DepthwiseConvAffinity(8), AttentionAffinity(8, 2))
