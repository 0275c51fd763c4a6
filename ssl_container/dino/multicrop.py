"""Multi-crop forward: one backbone call per resolution, one head call for all crops.

DINO feeds 2 global crops (224 px) and several local crops (96 px) of every image through the
same network. Running crops one at a time would mean ten small backbone calls per step; stacking
crops of equal resolution into one batch gives one call per resolution, which is what makes
multi-crop affordable. It also matters for BatchNorm backbones such as Container-Light: the
statistics are then computed over all crops of one resolution together, as in the official code.

The head is resolution-independent (it sees pooled ``(B, D)`` features), so it runs once on the
concatenation of all groups.

Crops are expected in a list ordered globals first, then locals; the output is crop-major
(``(ncrops * B, out_dim)``, image ``b`` of crop ``c`` at row ``c * B + b``), the layout
:class:`~ssl_container.dino.loss.DINOLoss` expects.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

__all__ = ["MultiCropWrapper", "group_crops_by_resolution"]

Crops = Union[torch.Tensor, Sequence[torch.Tensor]]


def group_crops_by_resolution(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """Split ``crops`` into runs of consecutive crops of identical shape (except the batch).

    Returns ``(start, end)`` index pairs. Only *consecutive* crops are merged, so the output
    order always equals the input order (merging non-adjacent crops would reorder rows and
    break the crop-major layout the loss depends on).
    """
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[1:] != crops[start].shape[1:]:
            groups.append((start, i))
            start = i
    return groups


def _as_list(crops: Crops) -> list[torch.Tensor]:
    if isinstance(crops, torch.Tensor):
        return [crops]
    out = list(crops)
    if not out:
        raise ValueError("MultiCropWrapper got an empty list of crops")
    batch = out[0].shape[0]
    for i, crop in enumerate(out):
        if crop.shape[0] != batch:
            raise ValueError(
                f"crop {i} has batch {crop.shape[0]} but crop 0 has {batch}; every crop must "
                "hold the same images for the crop-major layout to pair them up"
            )
    return out


class MultiCropWrapper(nn.Module):
    """``backbone`` + ``head`` applied to a list of crops of possibly different resolutions.

    Args:
        backbone: timm-style feature extractor: ``backbone(x)`` returns pooled features
            ``(B, num_features)`` (build it with ``num_classes=0``). A tuple output is
            accepted and its first element used, as some backbones return extras.
        head: maps ``(N, num_features)`` to ``(N, out_dim)``, normally a
            :class:`~ssl_container.dino.head.DINOHead`.

    The teacher is a second instance (a deep copy of the student) called on the global crops
    only; the same wrapper serves both.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def _backbone_call(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim != 2:
            raise ValueError(
                f"backbone returned shape {tuple(out.shape)}; MultiCropWrapper needs pooled "
                "(B, num_features) features (timm: create the model with num_classes=0)"
            )
        return out

    def features(self, crops: Crops) -> torch.Tensor:
        """Pooled backbone features of all crops, ``(ncrops * B, num_features)``, crop-major.

        One backbone call per run of equal-resolution crops. Also the entry point for k-NN
        and linear evaluation, which want backbone features without the head.
        """
        crop_list = _as_list(crops)
        outputs = []
        for start, end in group_crops_by_resolution(crop_list):
            group = crop_list[start:end]
            batch = group[0] if len(group) == 1 else torch.cat(group, dim=0)
            outputs.append(self._backbone_call(batch))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

    def forward(self, crops: Crops, return_features: bool = False):
        """Head outputs of all crops, ``(ncrops * B, out_dim)``, crop-major; with
        ``return_features`` the pair ``(backbone features, head outputs)`` (an engine wrapping this
        module passes keyword arguments through to it)."""
        feats = self.features(crops)
        return (feats, self.head(feats)) if return_features else self.head(feats)

    def forward_with_features(self, crops: Crops) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, head outputs)`` from one pass, for monitoring feature statistics."""
        return self.forward(crops, return_features=True)
