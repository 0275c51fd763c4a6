"""MultiCropWrapper: one backbone call per resolution run, one head call, crop-major output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_container.dino import DINOHead, MultiCropWrapper, group_crops_by_resolution


class CountingBackbone(nn.Module):
    """Tiny conv net without BatchNorm that records the input shape of every call."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, self.num_features, kernel_size=3, padding=1)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def _crops(batch: int, sizes: list[int], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, s, s, dtype=dtype) for s in sizes]


def _model() -> MultiCropWrapper:
    head = DINOHead(CountingBackbone.num_features, out_dim=11, hidden_dim=16, bottleneck_dim=5)
    return MultiCropWrapper(CountingBackbone(), head).double().eval()


def test_one_backbone_call_per_resolution_and_one_head_call() -> None:
    torch.manual_seed(0)
    model = _model()
    head_calls: list[int] = []
    model.head.register_forward_hook(lambda m, inp, out: head_calls.append(inp[0].shape[0]))
    batch = 3
    out = model(_crops(batch, [16, 16, 8, 8, 8, 8]))
    assert model.backbone.calls == [(2 * batch, 3, 16, 16), (4 * batch, 3, 8, 8)]
    assert head_calls == [6 * batch]
    assert out.shape == (6 * batch, 11)


def test_only_consecutive_equal_resolutions_are_merged() -> None:
    torch.manual_seed(1)
    model = _model()
    model(_crops(2, [16, 8, 8, 16]))
    assert model.backbone.calls == [(2, 3, 16, 16), (4, 3, 8, 8), (2, 3, 16, 16)]
    crops = _crops(1, [16, 8, 8, 16, 16])
    assert group_crops_by_resolution(crops) == [(0, 1), (1, 3), (3, 5)]


def test_equals_running_crops_one_by_one() -> None:
    """Crop-major: row c * B + b is image b of crop c, as if each crop ran alone."""
    torch.manual_seed(2)
    model = _model()
    batch = 4
    crops = _crops(batch, [16, 16, 8, 8, 8])
    with torch.no_grad():
        out = model(crops)
        feats = model.features(crops)
        one_by_one = [model.head(model.backbone(c)) for c in crops]
        feats_one_by_one = [model.backbone(c) for c in crops]
    for c in range(len(crops)):
        torch.testing.assert_close(out[c * batch:(c + 1) * batch], one_by_one[c],
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(feats[c * batch:(c + 1) * batch], feats_one_by_one[c],
                                   rtol=1e-12, atol=1e-12)
    assert feats.shape == (5 * batch, CountingBackbone.num_features)


def test_single_tensor_features_and_forward_with_features() -> None:
    torch.manual_seed(3)
    model = _model()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    feats, out = model.forward_with_features(x)
    assert len(model.backbone.calls) == 1
    assert feats.shape == (2, CountingBackbone.num_features) and out.shape == (2, 11)
    torch.testing.assert_close(out, model.head(model.backbone(x)))


def test_tuple_backbone_output_is_accepted() -> None:
    class TupleBackbone(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pooled = x.mean(dim=(2, 3))
            return pooled, x

    model = MultiCropWrapper(TupleBackbone(), nn.Identity())
    out = model(_crops(2, [4, 4, 2]))
    assert out.shape == (6, 3)


def test_errors_are_explained() -> None:
    model = _model()
    with pytest.raises(ValueError, match="same images"):
        model([torch.randn(2, 3, 8, 8, dtype=torch.float64),
               torch.randn(3, 3, 8, 8, dtype=torch.float64)])
    with pytest.raises(ValueError, match="empty"):
        model([])

    class Unpooled(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(ValueError, match="num_classes=0"):
        MultiCropWrapper(Unpooled(), nn.Identity())(torch.randn(1, 3, 4, 4))


def test_gradients_flow_to_backbone_and_head() -> None:
    torch.manual_seed(4)
    model = _model().train()
    model(_crops(2, [8, 8, 4])).sum().backward()
    assert model.backbone.conv.weight.grad is not None
    assert model.head.last_layer_direction.grad is not None
