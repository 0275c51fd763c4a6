"""Data: WebDataset shards (write/verify), DINO multi-crop (CPU and batched tensor paths), train/eval streams.

This package never imports ``ssl_container.models``. Its names load on first use (``data.config``
is torch-free and the command line reads it; the rest imports torch).
"""
from ssl_container.utils.lazy import lazy_exports

_WHERE = {
    "BadDataError": "sources",
    "DatasetInfo": "sources",
    "dataset_info": "sources",
    "EvalTransformConfig": "config",
    "MultiCropConfig": "config",
    "TrainDataConfig": "config",
    "TrainLoader": "stream",
    "make_eval_loader": "stream",
    "make_train_loader": "stream",
    "samples_per_rank": "stream",
    "steps_per_epoch": "stream",
    "stream_positions": "stream",
}

__all__, __getattr__ = lazy_exports(__name__, _WHERE)
