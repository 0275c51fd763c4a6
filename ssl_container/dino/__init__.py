"""DINO, the method: projection head, loss with centering, multi-crop forward and schedules.

Knows tensors and ``nn.Module``s only -- no data pipeline, engine or launcher -- so the trainer,
tests and benchmarks can use it alike. ``loss.py`` is the one place that touches
``torch.distributed`` (the center and Sinkhorn-Knopp sums span all ranks).
"""

from .diagnostics import CollapseMonitor, collapse_stats
from .koleo import koleo_loss
from .head import DINOHead, is_last_layer_parameter_name
from .loss import DINOLoss, sinkhorn_knopp
from .multicrop import MultiCropWrapper, group_crops_by_resolution
from .schedules import (
    DINOSchedules,
    apply_lr_wd,
    cosine_scheduler,
    describe_groups,
    cosine_value,
    get_param_groups,
    linear_warmup_value,
)

__all__ = [
    "CollapseMonitor",
    "collapse_stats",
    "DINOHead",
    "DINOLoss",
    "DINOSchedules",
    "MultiCropWrapper",
    "apply_lr_wd",
    "cosine_scheduler",
    "cosine_value",
    "describe_groups",
    "get_param_groups",
    "group_crops_by_resolution",
    "is_last_layer_parameter_name",
    "koleo_loss",
    "linear_warmup_value",
    "sinkhorn_knopp",
]
