"""Distillation from a frozen pretrained backbone (``method: distill``), the way DINOv3 and LightlyTrain
make small deployable models from a large one: the student sees the same crops as the teacher and learns
to reproduce its features, with no labels and no EMA.

The loss, per crop (all crops, global and local, pass through both networks):

* **global**: 1 - cosine between the teacher's pooled feature and the student's pooled feature through a
  linear projector (student width -> teacher width);
* **patch**: 1 - cosine, averaged over positions, between the teacher's last feature map and the student's
  through a 1x1 convolution, the student's map resized to the teacher's grid where the strides differ
  (skipped for backbones whose features are not maps, e.g. a ViT's tokens).

``distill.global_weight`` and ``distill.patch_weight`` weigh the two. Cosine rather than MSE: the
teacher's feature norms differ from layer to layer and model to model, its directions are what k-NN and
linear probes read. The projector (``projector.*`` in the student's state dict) is training-only:
exports hold the student's backbone. The teacher runs in eval mode (its BatchNorm statistics as trained)
and is not saved in checkpoints: ``distill.teacher`` names it, and a resume reads it again.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl_container.export import load_backbone
from ssl_container.methods.base import Losses, Method, build_backbone
from ssl_container.models import create_model

__all__ = ["DistillMethod", "DistillStudent", "read_teacher"]


def read_teacher(spec: str, which: str = "teacher", model: str | None = None) -> nn.Module:
    """The frozen teacher ``distill.teacher`` names: a path (anything ``load_backbone`` reads) or a model
    name with local weights."""
    from pathlib import Path

    if not spec:
        raise ValueError("method=distill needs distill.teacher: an export folder, a run or step folder, a weights "
                         "file, or a model name with local weights")
    if Path(spec).expanduser().exists():
        net = load_backbone(spec, which, model_name=model, num_classes=0)
    else:
        try:
            net = create_model(spec, pretrained=True, num_classes=0)
        except Exception as err:  # unknown name, or timm has no local weights for it
            raise ValueError(f"distill.teacher={spec}: neither an existing path nor a model whose pretrained weights "
                             f"load here ({type(err).__name__}: {str(err)[:200]})") from None
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def _digest(net: nn.Module) -> str:
    """sha256 of a network's state (names, shapes and values), to recognise the same teacher on a resume."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _maps_and_pooled(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(last feature map or tokens, pooled feature) from one pass, through timm's two-part forward."""
    maps = backbone.forward_features(x)
    return maps, backbone.forward_head(maps, pre_logits=True)


class DistillStudent(nn.Module):
    """The student backbone and its training-only projector onto the teacher's width."""

    def __init__(self, backbone: nn.Module, teacher_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        width = backbone.num_features
        self.projector = nn.ModuleDict({"pooled": nn.Linear(width, teacher_dim),
                                        "maps": nn.Conv2d(width, teacher_dim, kernel_size=1)})

    def forward(self, crops: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(projected map or None, projected pooled feature) for each run of equal-size crops."""
        out = []
        for x in _groups(crops):
            maps, pooled = _maps_and_pooled(self.backbone, x)
            projected = self.projector["maps"](maps) if maps.ndim == 4 else None
            out.append((projected, self.projector["pooled"](pooled)))
        return out


def _groups(crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive crops of one size as one batch (the multi-crop layout: globals, then locals)."""
    groups: list[list[torch.Tensor]] = []
    for c in crops:
        if groups and groups[-1][0].shape[-2:] == c.shape[-2:]:
            groups[-1].append(c)
        else:
            groups.append([c])
    return [g[0] if len(g) == 1 else torch.cat(g) for g in groups]


def _cosine_distance(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=dim)).mean()


class DistillMethod(Method):
    name = "distill"

    def __init__(self, model: Any, cfg: Any) -> None:
        super().__init__()
        self.model_cfg, self.cfg = model, cfg
        # Read at build time: the student's projector needs the teacher's width, and a wrong path is
        # refused before the run folder is touched.
        self.teacher = read_teacher(cfg.teacher, cfg.which, cfg.teacher_model)
        self.teacher_sha256 = _digest(self.teacher)

    @classmethod
    def from_config(cls, cfg: Any) -> "DistillMethod":
        return cls(cfg.model, cfg.distill)

    def build_student(self) -> nn.Module:
        backbone = build_backbone(self.model_cfg)
        return DistillStudent(backbone, self.teacher.num_features)

    def attach(self, student: nn.Module, device: torch.device) -> None:
        self.teacher.to(device)

    def networks(self) -> Sequence[nn.Module]:
        return (self.teacher,)

    def losses(self, student: Callable[..., Any], crops: list[torch.Tensor], values: dict[str, float],
               autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> Losses:
        with torch.no_grad(), autocast():
            targets = [_maps_and_pooled(self.teacher, x) for x in _groups(crops)]
        outputs = student(crops)
        pooled = sum(_cosine_distance(s, t, dim=1) for (_, s), (_, t) in zip(outputs, targets)) / len(targets)
        loss = self.cfg.global_weight * pooled
        stats = {"distill_pooled": pooled.detach()}
        pairs = [(s, t) for (s, _), (t, _) in zip(outputs, targets) if s is not None and t.ndim == 4]
        if pairs and self.cfg.patch_weight > 0:
            maps = sum(_cosine_distance(F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
                                        if s.shape[-2:] != t.shape[-2:] else s, t, dim=1) for s, t in pairs) / len(pairs)
            loss = loss + self.cfg.patch_weight * maps
            stats["distill_maps"] = maps.detach()
        return Losses(loss, stats, outputs[0][1])

    def moving(self) -> tuple[nn.Module, ...]:
        return ()  # the teacher is frozen and in eval mode; the student's buffers are the engine's

    def checkpoint_meta(self, student: nn.Module) -> dict[str, Any]:
        return {"distill": {"teacher": self.cfg.teacher, "teacher_features": self.teacher.num_features,
                            "teacher_sha256": self.teacher_sha256}}

    def resume_refusal(self, saved: dict[str, Any]) -> str | None:
        """The same path may hold other weights by now (a run folder whose training went on): a resume
        distils from the teacher it started with, or refuses."""
        recorded = (saved.get("distill") or {}).get("teacher_sha256")
        if recorded is None or recorded == self.teacher_sha256:
            return None
        return (f"distill.teacher={self.cfg.teacher} now holds other weights than the teacher this run was distilled "
                f"from (sha256 {self.teacher_sha256[:12]}, recorded {recorded[:12]} at step {saved.get('step')}): "
                "point distill.teacher at those weights (an export or a step folder stays fixed; a run folder that "
                "is still training does not), or start a new run_dir; nothing was changed")
