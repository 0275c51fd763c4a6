"""Data: WebDataset shards (write/verify), DINO multi-crop (CPU and batched tensor paths), train/eval streams.

This package never imports ``ssl_container.models``. Heavy modules are imported by the caller on use.
"""
from ssl_container.data.augment import EvalTransformConfig, MultiCropConfig
from ssl_container.data.sources import BadDataError
from ssl_container.data.stream import (
    TrainDataConfig,
    TrainLoader,
    make_eval_loader,
    make_train_loader,
    steps_per_epoch,
)

__all__ = [
    "BadDataError",
    "EvalTransformConfig",
    "MultiCropConfig",
    "TrainDataConfig",
    "TrainLoader",
    "make_eval_loader",
    "make_train_loader",
    "steps_per_epoch",
]
