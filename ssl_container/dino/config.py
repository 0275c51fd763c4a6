"""The method's config sections, each the arguments of the component it builds.

``head`` is :class:`DINOHead`'s arguments (less ``in_dim``, which the backbone gives), ``dino`` the
loss and its regularisers, ``schedule`` every per-iteration schedule :class:`DINOSchedules`
evaluates. Plain dataclasses with their validation and no torch, so that the run config and the
command line read them without importing the method.
"""
from __future__ import annotations

from dataclasses import dataclass

from ssl_container.utils.checks import check_fields

__all__ = ["HeadConfig", "DINOLossConfig", "ScheduleConfig"]


@dataclass
class HeadConfig:
    """``DINOHead(in_dim, **asdict(head))``; defaults are the official recipe."""

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    norm_last_layer: bool = True
    use_bn: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "head", positive=("out_dim", "hidden_dim", "bottleneck_dim", "nlayers"))


@dataclass
class DINOLossConfig:
    """The ``dino`` section: :class:`DINOLoss` (``DINOLoss.from_config``): the student temperature,
    centering (or Sinkhorn-Knopp); and the KoLeo regulariser's weight beside it in the step."""

    student_temp: float = 0.1
    center_momentum: float = 0.9
    sinkhorn_knopp: bool = False
    koleo_weight: float = 0.0  # DINOv2's KoLeo regulariser on the student's global-crop features (DINOv2: 0.1)

    def __post_init__(self) -> None:
        check_fields(self, "dino", positive=("student_temp",), non_negative=("koleo_weight",),
                     unit=("center_momentum",))


@dataclass
class ScheduleConfig:
    """Everything that changes per iteration, as closed-form functions of it (dino/schedules.py).

    The peak lr is ``lr * global batch / lr_reference_batch`` (DINO's linear scaling); ``min_lr``
    is not scaled. The teacher temperature warms up from ``warmup_teacher_temp`` to
    ``teacher_temp``; the prototype layer keeps lr 0 for ``freeze_last_layer`` epochs.
    """

    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    lr_reference_batch: int = 256
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    freeze_last_layer: int = 1  # epochs with the prototype layer at lr 0

    def __post_init__(self) -> None:
        check_fields(self, "schedule", positive=("lr", "lr_reference_batch", "teacher_temp", "warmup_teacher_temp"),
                     non_negative=("min_lr", "warmup_epochs", "weight_decay", "weight_decay_end",
                                   "warmup_teacher_temp_epochs", "freeze_last_layer"),
                     unit=("momentum_teacher", "momentum_teacher_end"))
