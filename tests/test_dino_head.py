"""DINOHead: size, initialisation, weight-norm semantics, copy and checkpoint compatibility."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from ssl_container.dino import DINOHead, is_last_layer_parameter_name


def _count(params) -> int:
    return sum(p.numel() for p in params)


def test_param_count_matches_dino_for_in_dim_512() -> None:
    """DINO's 22,614,272 counts *all* parameters, the frozen weight-norm gain included.

    By hand: MLP 512*2048+2048 + 2048*2048+2048 + 2048*256+256 = 5,771,520; prototypes
    v: 256*65536 = 16,777,216; gain g: 65,536 (frozen with norm_last_layer=True).
    5,771,520 + 16,777,216 + 65,536 = 22,614,272; the trainable count is 22,548,736.
    """
    head = DINOHead(512)
    assert _count(head.parameters()) == 22_614_272
    assert _count(p for p in head.parameters() if p.requires_grad) == 22_548_736
    assert _count(head.mlp.parameters()) == 5_771_520
    assert head.last_layer_gain.numel() == 65_536
    assert head.last_layer_direction.shape == (65_536, 256)


def test_last_layer_uses_parametrization_api_with_frozen_unit_gain() -> None:
    head = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    assert parametrize.is_parametrized(head.last_layer, "weight")
    assert not hasattr(head.last_layer, "weight_g")  # not the deprecated hook
    gain = head.last_layer.parametrizations.weight.original0
    assert gain.shape == (32, 1)
    assert torch.equal(gain.detach(), torch.ones(32, 1))
    assert not gain.requires_grad
    assert head.last_layer.parametrizations.weight.original1.requires_grad


def test_norm_last_layer_false_keeps_gain_trainable() -> None:
    head = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=False)
    assert head.last_layer_gain.requires_grad
    assert torch.equal(head.last_layer_gain.detach(), torch.ones(32, 1))
    assert all(p.requires_grad for p in head.parameters())


def test_logits_are_cosines_with_prototypes() -> None:
    """With g = 1 each logit must be <embedding, v_k / ||v_k||>, computed here by hand."""
    torch.manual_seed(0)
    head = DINOHead(10, out_dim=7, hidden_dim=12, bottleneck_dim=5).double()
    x = torch.randn(4, 10, dtype=torch.float64)
    out = head(x)
    h = head.mlp(x)
    v = head.last_layer_direction.detach()
    for n in range(4):
        hn = h[n] / torch.sqrt((h[n] ** 2).sum())
        for k in range(7):
            vk = v[k] / torch.sqrt((v[k] ** 2).sum())
            assert out[n, k].item() == pytest.approx((hn * vk).sum().item(), abs=1e-12)
    assert out.abs().max() <= 1.0


def test_init_trunc_normal_weights_and_zero_biases() -> None:
    torch.manual_seed(0)
    head = DINOHead(64, out_dim=128, hidden_dim=512, bottleneck_dim=32)
    linears = [m for m in head.mlp.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for lin in linears:
        assert torch.count_nonzero(lin.bias) == 0
        assert lin.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert head.last_layer.bias is None


def test_mlp_structure_options() -> None:
    h1 = DINOHead(8, out_dim=4, hidden_dim=6, bottleneck_dim=3, nlayers=1)
    assert isinstance(h1.mlp, nn.Linear) and h1.mlp.in_features == 8
    hbn = DINOHead(8, out_dim=4, hidden_dim=6, bottleneck_dim=3, nlayers=3, use_bn=True)
    kinds = [type(m).__name__ for m in hbn.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    with pytest.raises(ValueError):
        DINOHead(8, nlayers=0)


def test_deepcopy_after_backward_for_the_teacher() -> None:
    """The teacher is a deep copy of the student; the deprecated weight_norm breaks this."""
    head = DINOHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=4)
    head(torch.randn(3, 8)).sum().backward()
    teacher = copy.deepcopy(head)
    x = torch.randn(5, 8)
    assert torch.equal(teacher(x), head(x))
    assert not teacher.last_layer_gain.requires_grad
    # independent storage
    with torch.no_grad():
        teacher.last_layer_direction.add_(1.0)
    assert not torch.equal(teacher.last_layer_direction, head.last_layer_direction)


def test_loads_official_weight_g_weight_v_keys() -> None:
    src = DINOHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=4)
    state = {}
    for k, v in src.state_dict().items():
        k = k.replace("last_layer.parametrizations.weight.original0", "last_layer.weight_g")
        k = k.replace("last_layer.parametrizations.weight.original1", "last_layer.weight_v")
        state[k] = v.clone()
    assert "last_layer.weight_v" in state
    dst = DINOHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=4)
    dst.load_state_dict(state)
    x = torch.randn(2, 8)
    assert torch.equal(dst(x), src(x))


def test_last_layer_parameter_helpers() -> None:
    head = DINOHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=4)
    ids = {id(p) for p in head.last_layer_parameters()}
    assert ids == {id(head.last_layer_gain), id(head.last_layer_direction)}
    names = {n for n, _ in head.named_parameters() if is_last_layer_parameter_name(n)}
    assert names == {
        "last_layer.parametrizations.weight.original0",
        "last_layer.parametrizations.weight.original1",
    }
    assert is_last_layer_parameter_name("module.head.last_layer.parametrizations.weight.original1")
    assert not is_last_layer_parameter_name("mlp.0.weight")
