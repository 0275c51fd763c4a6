"""Container-Light as a torchvision detection backbone: stage outputs -> FPN -> Faster R-CNN / RetinaNet.

The setting of the Container paper's COCO experiments: the four stage outputs (64/128/320/512
channels at strides 4/8/16/32) feed an FPN, BatchNorm is frozen, everything else is fine-tuned
(AdamW, lr 1e-4, wd 0.05). Here:

* :class:`ContainerFPNBackbone` follows torchvision's backbone contract: an ``out_channels``
  attribute and a forward that returns an ``OrderedDict`` of FPN maps. BatchNorm2d layers become
  ``torchvision.ops.FrozenBatchNorm2d`` (``norm="frozen_bn"``, the default; ``"bn"`` keeps them
  trainable); ``freeze_at`` also freezes the early layers, counted as in detectron2: 0 nothing,
  1 the stem (first patch embedding), k = 2..5 the stem and stages 1..k-1 (5: the whole body).
  Inputs whose sides are not multiples of 32 are zero-padded at the bottom/right, which leaves box
  coordinates unchanged.
* :func:`fasterrcnn_container_light_fpn`: FPN on all four stages + a max-pooled P6 (torchvision's
  ``LastLevelMaxPool``), RoIAlign on P2-P5.
* :func:`retinanet_container_light_fpn`: FPN on stages 2-4 (strides 8-32) + P6/P7 computed from the
  last stage output, as torchvision's and mmdetection's RetinaNet (the paper's RetinaNet used
  mmdetection).
* :func:`fasterrcnn_container_light_c4`: the "C4" Faster R-CNN of detectron2 and of the MoCo / DINO
  transfer protocols: the RPN and RoIAlign on the stride-16 map (stages 1-3), and the box head is the
  backbone's own last stage, final norm and average pool (:class:`ContainerC4BoxHead`), so RoIs are
  classified from the pooled features the pretraining shaped. Only the RPN's conv and the final
  linear layers start from scratch: the detector for small detection sets, where FPN heads of
  millions of random parameters learn the few training images by heart.

Both builders set the detector's ``GeneralizedRCNNTransform.size_divisible`` to 32, so batches are
padded to a multiple of the backbone's total stride. ``num_classes`` counts the background class
as torchvision does (COCO's 80 categories mapped to 1..80 -> ``num_classes=81``); RetinaNet just
never predicts label 0 then.

``backbone_weights`` takes anything ``ssl_container.export.load_backbone`` reads (an exported DINO
backbone, a run or step folder, the official supervised checkpoint), a ready backbone module, or
None for random initialisation.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from ssl_container.export import load_backbone
from ssl_container.models import create_model

__all__ = [
    "ContainerFPNBackbone",
    "convert_frozen_batchnorm",
    "container_light_fpn_backbone",
    "ContainerC4Backbone",
    "ContainerC4BoxHead",
    "fasterrcnn_container_light_c4",
    "fasterrcnn_container_light_fpn",
    "recalibrate_batchnorm",
    "retinanet_container_light_fpn",
]

NORMS = ("frozen_bn", "bn")


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` by a ``FrozenBatchNorm2d`` with the same statistics."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = convert_frozen_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


@torch.no_grad()
def recalibrate_batchnorm(body: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every ``BatchNorm2d``'s running mean and variance in ``body`` from ``batches`` (precise BN).

    A backbone pretrained on small crops keeps statistics of its activations at that scale and on that data;
    at detection resolution on another dataset they drift (0.2 standard deviations in the mean, 1.2-1.6 times
    the variance per layer at 384 px on COCO for the 64-px Imagenette teacher, docs/study.md), and frozen
    BatchNorm carries the drift into every feature. The new statistics are exact averages over the batches
    (momentum None); every other module stays in eval mode, so drop-path and dropout do not touch them.
    Returns the number of layers recalibrated."""
    norms = [m for m in body.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("recalibrate_batchnorm: no batches given; the statistics are left as they were")
    if not norms:
        return 0
    modes, momenta = {m: m.training for m in body.modules()}, [m.momentum for m in norms]
    body.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch weighs the same
        m.train()
    try:
        body(first)
        for x in batches:
            body(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
    return len(norms)


def check_norm_and_freeze(norm: str, freeze_at: int, n_stages: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not 0 <= freeze_at <= n_stages + 1:
        raise ValueError(f"freeze_at must be in 0..{n_stages + 1} (0: nothing, 1: stem, {n_stages + 1}: all), got {freeze_at}")


class _PartlyFrozenBody(nn.Module):
    """What the FPN and C4 backbones share: the detectron2-style freezing of a Container body (``freeze_at``
    0 nothing, 1 the stem, k the stem and stages 1..k-1; frozen layers keep eval behaviour) and the
    bottom/right zero padding to ``size_divisible``, which leaves box coordinates unchanged."""

    body: nn.Module
    size_divisible: int

    def _freeze(self, freeze_at: int) -> None:
        stages = self.body.stages
        self._frozen = ([stages[0].patch_embed] if freeze_at >= 1 else []) + list(stages[: max(freeze_at - 1, 0)])
        for module in self._frozen:
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> "_PartlyFrozenBody":
        super().train(mode)
        for module in self._frozen:  # no dropout / drop-path in frozen layers
            module.eval()
        return self

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        s = self.size_divisible
        return F.pad(x, (0, (-w) % s, 0, (-h) % s)) if (-h) % s or (-w) % s else x


class ContainerFPNBackbone(_PartlyFrozenBody):
    """A Container body whose stage outputs feed a ``FeaturePyramidNetwork``.

    Args:
        body: a Container model (``forward_intermediates`` + ``feature_info``); its final norm and
            classifier are removed, since detection uses the stage outputs only.
        out_channels: FPN width (256).
        freeze_at: 0 nothing frozen besides BatchNorm; 1 the stem; k the stem and stages 1..k-1.
        norm: ``"frozen_bn"`` (default) or ``"bn"`` (trainable BatchNorm, batch statistics).
        returned_stages: which stage outputs (0-based) enter the FPN.
        extra_blocks: the FPN's extra levels (``LastLevelMaxPool()`` when None).
    """

    def __init__(
        self,
        body: nn.Module,
        out_channels: int = 256,
        freeze_at: int = 0,
        norm: str = "frozen_bn",
        returned_stages: Sequence[int] = (0, 1, 2, 3),
        extra_blocks: ExtraFPNBlock | None = None,
    ) -> None:
        super().__init__()
        n_stages = len(body.stages)
        check_norm_and_freeze(norm, freeze_at, n_stages)
        returned_stages = sorted(returned_stages)
        if not returned_stages or not all(0 <= i < n_stages for i in returned_stages):
            raise ValueError(f"returned_stages must be stage indices in 0..{n_stages - 1}, got {returned_stages}")
        # Detection needs the stage outputs only: drop the stages after the last one used, the final
        # norm and the classifier, so that every remaining parameter receives a gradient.
        body.prune_intermediate_layers(indices=returned_stages, prune_norm=True, prune_head=True)
        if norm == "frozen_bn":
            convert_frozen_batchnorm(body)
        self.body = body
        self.returned_stages = tuple(returned_stages)
        self.freeze_at = freeze_at
        self.norm_kind = norm
        self.size_divisible = int(getattr(body, "total_stride", 32))
        self.strides = tuple(body.feature_info[i]["reduction"] for i in returned_stages)
        in_channels = [body.feature_info[i]["num_chs"] for i in returned_stages]
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_blocks or LastLevelMaxPool())
        self.out_channels = out_channels
        self._freeze(freeze_at)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self._pad(x)
        maps = self.body.forward_intermediates(x, indices=list(self.returned_stages), intermediates_only=True)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def _body(backbone_weights: Any, which: str | None, model_name: str, model_kwargs: dict[str, Any]) -> nn.Module:
    if isinstance(backbone_weights, nn.Module):
        return backbone_weights
    if backbone_weights is None:
        return create_model(model_name, num_classes=0, **model_kwargs)
    if isinstance(backbone_weights, (str, os.PathLike)):
        return load_backbone(backbone_weights, which, **{**model_kwargs, "num_classes": 0})
    raise TypeError(f"backbone_weights must be a path, an nn.Module or None, got {type(backbone_weights).__name__}")


def container_light_fpn_backbone(
    backbone_weights: Any = None,
    *,
    which: str | None = None,
    out_channels: int = 256,
    freeze_at: int = 0,
    norm: str = "frozen_bn",
    returned_stages: Sequence[int] = (0, 1, 2, 3),
    extra_blocks: ExtraFPNBlock | None = None,
    drop_path_rate: float = 0.0,
    model_name: str = "container_light",
    **model_kwargs: Any,
) -> ContainerFPNBackbone:
    """A :class:`ContainerFPNBackbone` on Container-Light (random, or the weights at ``backbone_weights``)."""
    body = _body(backbone_weights, which, model_name, dict(model_kwargs))
    if hasattr(body, "set_drop_path_rate"):
        body.set_drop_path_rate(drop_path_rate)
    return ContainerFPNBackbone(body, out_channels, freeze_at, norm, returned_stages, extra_blocks)


def _set_size_divisible(model: nn.Module, divisor: int) -> nn.Module:
    model.transform.size_divisible = divisor
    return model


def fasterrcnn_container_light_fpn(
    num_classes: int = 91,
    backbone_weights: Any = None,
    *,
    which: str | None = None,
    freeze_at: int = 0,
    norm: str = "frozen_bn",
    drop_path_rate: float = 0.0,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    backbone_kwargs: dict[str, Any] | None = None,
    box_head_dim: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Faster R-CNN with a Container-Light FPN backbone (P2-P6). ``kwargs`` go to ``FasterRCNN``.

    ``min_size`` as a tuple: each training image is resized to one of them at random (multi-scale
    training); evaluation uses the last. ``box_head_dim``: the width of the box head's two fully connected
    layers (torchvision's 1,024 makes 13.9M parameters on 256 x 7 x 7 RoIs: far more than a few hundred
    training images can fit without learning them by heart)."""

    backbone = container_light_fpn_backbone(
        backbone_weights, which=which, freeze_at=freeze_at, norm=norm, drop_path_rate=drop_path_rate,
        returned_stages=(0, 1, 2, 3), extra_blocks=LastLevelMaxPool(), **(backbone_kwargs or {}),
    )
    if box_head_dim:
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        kwargs["box_head"] = TwoMLPHead(backbone.out_channels * 7 * 7, box_head_dim)  # RoIAlign's 7 x 7 output
        kwargs["box_predictor"] = FastRCNNPredictor(box_head_dim, num_classes)
        num_classes = None  # torchvision: given by the predictor
    model = FasterRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs)
    return _set_size_divisible(model, backbone.size_divisible)


def retinanet_container_light_fpn(
    num_classes: int = 91,
    backbone_weights: Any = None,
    *,
    which: str | None = None,
    freeze_at: int = 0,
    norm: str = "frozen_bn",
    drop_path_rate: float = 0.0,
    min_size: int = 800,
    max_size: int = 1333,
    backbone_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """RetinaNet with a Container-Light FPN backbone (P3-P7; P6 from C5). ``kwargs`` go to ``RetinaNet``."""

    body = _body(backbone_weights, which, "container_light", dict(backbone_kwargs or {}))
    last = body.feature_info[3]["num_chs"]
    backbone = container_light_fpn_backbone(
        body, freeze_at=freeze_at, norm=norm, drop_path_rate=drop_path_rate,
        returned_stages=(1, 2, 3), extra_blocks=LastLevelP6P7(last, 256),
    )
    model = RetinaNet(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs)
    return _set_size_divisible(model, backbone.size_divisible)


class ContainerC4Backbone(_PartlyFrozenBody):
    """The stem and stages 1..3 of a Container body: one stride-16 map (key ``"0"``) for the RPN and
    RoIAlign. ``freeze_at`` as in :class:`ContainerFPNBackbone`; :func:`fasterrcnn_container_light_c4`
    takes the last stage and final norm off the body first, for :class:`ContainerC4BoxHead`."""

    def __init__(self, body: nn.Module, freeze_at: int = 0) -> None:
        super().__init__()
        last = len(body.stages) - 2  # the stage before the last
        body.prune_intermediate_layers(indices=[last], prune_norm=True, prune_head=True)
        self.body = body
        self.returned_stages = (last,)
        self.strides = (int(body.feature_info[last]["reduction"]),)
        self.size_divisible = self.strides[0]
        self.out_channels = int(body.feature_info[last]["num_chs"])
        self._freeze(freeze_at)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        # The stages directly: the body's own input check asks for its full (stride-32) divisibility.
        x = self._pad(x)
        for stage in self.body.stages:
            x = stage(x)
        return OrderedDict([("0", x)])


class ContainerC4BoxHead(nn.Module):
    """The box head of the C4 detector: a Container's last stage, its final norm and the average pool,
    applied to each RoI (``(N, C3, r, r)`` from RoIAlign -> ``(N, C4)``): the same representation the
    pretraining's k-NN and projection head read, here per RoI. ``frozen`` keeps it as pretrained."""

    def __init__(self, stage: nn.Module, norm: nn.Module, out_channels: int, frozen: bool = False) -> None:
        super().__init__()
        self.stage = stage
        self.norm = norm
        self.out_channels = out_channels
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)

    def train(self, mode: bool = True) -> "ContainerC4BoxHead":
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stage(x)).mean(dim=(2, 3))


def c4_anchor_sizes(max_size: int) -> tuple[int, ...]:
    """Detectron2's five C4 anchor sizes (32-512 px at an 800-px short side) from 16 px, the smallest
    that the stride-16 map places densely, up to the image's long side."""
    sizes = tuple(s for s in (16, 32, 64, 128, 256, 512) if s <= max_size)
    return sizes or (16,)


def fasterrcnn_container_light_c4(
    num_classes: int = 91,
    backbone_weights: Any = None,
    *,
    which: str | None = None,
    freeze_at: int = 0,
    norm: str = "frozen_bn",
    drop_path_rate: float = 0.0,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    roi_size: int = 14,
    backbone_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Faster R-CNN, C4 style: RPN and RoIAlign (``roi_size`` x ``roi_size``) on the stride-16 map, the
    backbone's last stage as the box head (:class:`ContainerC4BoxHead`, frozen when ``freeze_at`` is
    5), one linear layer each for class scores and box deltas. ``roi_size``: 14 is detectron2's; a
    backbone pretrained on small crops sees its objects at their pretraining scale with
    ``roi_size = pretraining resolution / 16`` (4 for 64-px crops). ``kwargs`` go to ``FasterRCNN``."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    if roi_size < 2 or roi_size % 2:
        raise ValueError(f"roi_size must be even and >= 2 (the last stage halves it), got {roi_size}")
    body = _body(backbone_weights, which, "container_light", dict(backbone_kwargs or {}))
    if hasattr(body, "set_drop_path_rate"):
        body.set_drop_path_rate(drop_path_rate)
    n = len(body.stages)
    check_norm_and_freeze(norm, freeze_at, n)
    if norm == "frozen_bn":
        convert_frozen_batchnorm(body)
    box_head = ContainerC4BoxHead(body.stages[n - 1], body.norm, int(body.feature_info[n - 1]["num_chs"]),
                                  frozen=freeze_at >= n + 1)
    backbone = ContainerC4Backbone(body, freeze_at)
    sizes = c4_anchor_sizes(max_size)
    model = FasterRCNN(
        backbone, num_classes=None, min_size=min_size, max_size=max_size,
        rpn_anchor_generator=AnchorGenerator((sizes,), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=roi_size, sampling_ratio=2),
        box_head=box_head, box_predictor=FastRCNNPredictor(box_head.out_channels, num_classes), **kwargs,
    )
    return _set_size_divisible(model, backbone.size_divisible)
