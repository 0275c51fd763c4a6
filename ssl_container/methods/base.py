"""What the trainer asks of a method (DINOv3's ``SSLMetaArch`` in spirit: the method owns its teacher
and losses; the trainer owns the engine, the optimizer, the schedules, checkpoints and the loop).

The step (``trainer/run.py: train_step``) is generic: fetch the crops, ``method.losses(student, crops,
values)``, the finite check, backward, the update, and the EMA of ``method.ema_target()`` when the method
has one. The student is not a submodule of the method: it lives in the DeepSpeed engine, and the method
receives the engine (or any callable on crops) at each step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

__all__ = ["Losses", "Method", "build_backbone"]


def build_backbone(model: Any) -> nn.Module:
    """The student's backbone from the ``model`` section (every method's student starts here)."""
    from ssl_container.models import create_model

    backbone = create_model(model.name, num_classes=0, drop_path_rate=model.drop_path_rate, **model.kwargs)
    if model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return backbone


@dataclass
class Losses:
    """One micro-batch: ``loss`` (what backward takes), ``stats`` (tensors logged to metrics.jsonl) and
    ``anchor``, a tensor of the student's graph: a poisoned micro-batch backpropagates ``anchor * 0`` so that
    every rank still takes part in the gradient all-reduce."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor]
    anchor: torch.Tensor


class Method(nn.Module):
    """The interface; see :class:`ssl_container.methods.dino.DINOMethod` for the reference."""

    name = "method"

    @classmethod
    def from_config(cls, cfg: Any) -> "Method":
        raise NotImplementedError

    def build_student(self) -> nn.Module:
        """A fresh student (``.backbone`` is what is exported); the trainer moves it to the device and
        applies SyncBatchNorm and the CPU kernels before :meth:`attach`."""
        raise NotImplementedError

    def attach(self, student: nn.Module, device: torch.device) -> None:
        """Called once the trainer has prepared the student: build what depends on it (a teacher copy)."""

    def networks(self) -> Sequence[nn.Module]:
        """The method's networks the trainer compiles along with the student (``engine.compile``)."""
        return ()

    def ema_target(self) -> nn.Module | None:
        """A network the trainer keeps as an exponential moving average of the student (``values['momentum']``)."""
        return None

    def step_values(self, schedules: Any, at: int) -> dict[str, float]:
        """The method's scheduled values at schedule step ``at`` (logged, and passed to :meth:`losses`)."""
        return {}

    def losses(self, student: Callable[..., Any], crops: list[torch.Tensor], values: dict[str, float],
               autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> Losses:
        raise NotImplementedError

    def stateful(self) -> dict[str, nn.Module]:
        """What a checkpoint saves besides the student, by file name (``NAME.safetensors``)."""
        return {}

    def moving(self) -> tuple[nn.Module, ...]:
        """Modules whose buffers a step changes (restored when a step is skipped)."""
        return tuple(self.stateful().values())

    def monitored(self, student: nn.Module) -> nn.Module:
        """The backbone the online k-NN follows."""
        return student.backbone

    def checkpoint_meta(self, student: nn.Module) -> dict[str, Any]:
        """What a checkpoint's meta.json records of the method (export reads DINO's ``head``)."""
        return {}

    def resume_refusal(self, saved: dict[str, Any]) -> str | None:
        """Why this method may not go on from a checkpoint whose meta.json is ``saved`` (None: it may)."""
        return None
