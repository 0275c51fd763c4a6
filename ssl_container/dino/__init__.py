"""DINO, the method: projection head, loss with centering, multi-crop forward and schedules.

Knows tensors and ``nn.Module``s only -- no data pipeline, engine or launcher -- so the trainer,
tests and benchmarks can use it alike. ``loss.py`` is the one place that touches
``torch.distributed`` (the center and Sinkhorn-Knopp sums span all ranks). Names load on first use:
``dino.config`` is torch-free and the command line reads it; the rest imports torch.
"""
from ssl_container.utils.lazy import lazy_exports

_WHERE = {
    "CollapseMonitor": "diagnostics",
    "collapse_stats": "diagnostics",
    "DINOLossConfig": "config",
    "HeadConfig": "config",
    "ScheduleConfig": "config",
    "DINOHead": "head",
    "is_last_layer_parameter_name": "head",
    "DINOLoss": "loss",
    "sinkhorn_knopp": "loss",
    "koleo_loss": "koleo",
    "MultiCropWrapper": "multicrop",
    "group_crops_by_resolution": "multicrop",
    "DINOSchedules": "schedules",
    "apply_lr_wd": "schedules",
    "cosine_value": "schedules",
    "get_param_groups": "schedules",
    "linear_warmup_value": "schedules",
}

__all__, __getattr__ = lazy_exports(__name__, _WHERE)
