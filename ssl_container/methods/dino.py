"""DINO (Caron et al. 2021) as a method: an EMA teacher (a copy of the student) sees the global crops,
the student every crop; the centred, sharpened teacher distribution supervises the student's on every
pair of different crops (``dino/loss.py``), optionally with DINOv2's KoLeo on the student's global-crop
features. Config: ``dino.*`` (loss), ``head.*`` (projection head), ``schedule.*`` (teacher temperature
and momentum). A checkpoint holds ``teacher.safetensors`` and ``dino_state.safetensors`` (the centre),
as before methods were modules, so older run folders resume unchanged."""
from __future__ import annotations

import contextlib
from dataclasses import asdict
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from ssl_container.dino import DINOHead, DINOLoss, MultiCropWrapper, koleo_loss
from ssl_container.methods.base import Losses, Method, build_backbone
from ssl_container.models.container import DropPath

__all__ = ["DINOMethod", "make_teacher"]


def make_teacher(student: nn.Module) -> nn.Module:
    """An fp32 copy of the student that never receives gradients and has no stochastic depth. It stays in
    train mode during training: with BatchNorm backbones DINO's teacher normalises with batch statistics."""
    import copy

    from timm.layers import DropPath as TimmDropPath

    teacher = copy.deepcopy(student).float()
    for p in teacher.parameters():
        p.requires_grad_(False)
    for m in teacher.modules():
        if isinstance(m, (DropPath, TimmDropPath)):  # ours, and timm's in a timm backbone
            m.drop_prob = 0.0
    return teacher


class DINOMethod(Method):
    name = "dino"

    def __init__(self, model: Any, head: Any, loss: DINOLoss, n_global: int, koleo_weight: float = 0.0) -> None:
        super().__init__()
        self.model_cfg, self.head_cfg, self.n_global = model, head, n_global
        self.loss = loss
        self.koleo_weight = koleo_weight
        self.teacher: nn.Module | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "DINOMethod":
        crops = cfg.data.crops
        loss = DINOLoss.from_config(cfg.dino, cfg.head.out_dim, crops.n_global + crops.n_local, crops.n_global)
        return cls(cfg.model, cfg.head, loss, crops.n_global, cfg.dino.koleo_weight)

    def build_student(self) -> nn.Module:
        backbone = build_backbone(self.model_cfg)
        return MultiCropWrapper(backbone, DINOHead(backbone.num_features, **asdict(self.head_cfg)))

    def attach(self, student: nn.Module, device: torch.device) -> None:
        self.teacher = make_teacher(student)
        self.loss.to(device)

    def networks(self) -> Sequence[nn.Module]:
        return (self.teacher,)

    def ema_target(self) -> nn.Module:
        return self.teacher

    def step_values(self, schedules: Any, at: int) -> dict[str, float]:
        return {"momentum": schedules.momentum(at), "teacher_temp": schedules.teacher_temp(at)}

    def losses(self, student: Callable[..., Any], crops: list[torch.Tensor], values: dict[str, float],
               autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> Losses:
        n_global = self.n_global
        with torch.no_grad(), autocast():
            teacher_out = self.teacher(crops[:n_global])
        if self.koleo_weight > 0:
            feats, student_out = student(crops, return_features=True)
        else:
            student_out = student(crops)
        loss = self.loss(student_out, teacher_out, values["teacher_temp"])
        stats = dict(self.loss.last_stats)
        if self.koleo_weight > 0:
            # DINOv2: on the student's global crops, each crop's batch on its own.
            koleo = sum(koleo_loss(f) for f in feats[:n_global * crops[0].shape[0]].chunk(n_global))
            stats["koleo"] = koleo.detach().float()
            loss = loss + self.koleo_weight * koleo
        return Losses(loss, stats, student_out)

    def stateful(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher, "dino_state": self.loss}

    def monitored(self, student: nn.Module) -> nn.Module:
        return self.teacher.backbone

    def checkpoint_meta(self, student: nn.Module) -> dict[str, Any]:
        return {"head": {"in_dim": student.backbone.num_features, **asdict(self.head_cfg)}}
