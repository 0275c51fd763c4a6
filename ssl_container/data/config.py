"""The data pipeline's configs: the training stream (``TrainDataConfig``, which *is* the run config's
``data`` section, with DINO's multi-crop recipe inside as ``crops``) and the evaluation transform.

Plain dataclasses with their validation and no torch, so that the run config (``ssl_container.config``)
and the command line can use them without importing the pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ssl_container.utils.checks import check_fields

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EvalTransformConfig", "MultiCropConfig", "TrainDataConfig"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class MultiCropConfig:
    """DINO multi-crop; defaults are the official ViT-S/16 recipe (2x224 + 8x96)."""

    n_global: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    n_local: int = 8
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    # per global crop, cycled when n_global exceeds the tuple (global 1: blur always; global 2: rarely + solarise)
    global_blur_p: tuple[float, ...] = (1.0, 0.1)
    global_solarize_p: tuple[float, ...] = (0.0, 0.2)
    local_blur_p: float = 0.5
    local_solarize_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"  # or "bilinear"
    # speed switches (see module docstring); both keep the parameter distribution of the recipe
    colour_at_lower_resolution: bool = True
    draft: bool = True  # JPEG decode at 1/2, 1/4, 1/8 scale when every crop box stays >= its output size
    max_image_pixels: Optional[int] = None  # None: PIL's Image.MAX_IMAGE_PIXELS (decompression-bomb limit kept on)

    def __post_init__(self) -> None:
        for name in ("global_scale", "local_scale", "ratio", "jitter", "global_blur_p", "global_solarize_p",
                     "blur_sigma", "mean", "std"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        check_fields(self, "data.crops", positive=("n_global", "global_size", "local_size"), non_negative=("n_local",),
                     choices={"interpolation": ("bicubic", "bilinear")})
        for name in ("global_scale", "local_scale"):
            if len(getattr(self, name)) != 2 or not 0 < getattr(self, name)[0] <= getattr(self, name)[1] <= 1:
                raise ValueError(f"config key 'data.crops.{name}' must be [low, high] with 0 < low <= high <= 1, "
                                 f"got {list(getattr(self, name))}")
        if len(self.blur_sigma) != 2 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"config key 'data.crops.blur_sigma' must be [low, high] with 0 < low <= high, "
                             f"got {list(self.blur_sigma)}")

    @property
    def n_crops(self) -> int:
        return self.n_global + self.n_local

    def crop_sizes(self) -> list[int]:
        return [self.global_size] * self.n_global + [self.local_size] * self.n_local


@dataclass
class EvalTransformConfig:
    """Resize the short side (bicubic) then center-crop: the k-NN / linear-probe protocol."""

    resize: int = 256
    crop: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    draft: bool = False  # off: the protocol is defined on the full-resolution decode
    max_image_pixels: Optional[int] = None

    def __post_init__(self) -> None:
        if self.crop > self.resize:
            raise ValueError(f"eval crop {self.crop} larger than resize {self.resize}")


@dataclass
class TrainDataConfig:
    """The training stream's config, and the run config's ``data`` section as it is."""

    urls: list[str] = field(default_factory=list)  # brace patterns, paths, pipe:/http(s) URLs; with weights: one source each
    weights: Optional[list[float]] = None  # mixing weights, one per source (sample level)
    batch_size: int = 64  # per rank (per GPU)
    num_workers: int = 8
    shuffle_buffer: int = 1000  # raw samples (bytes), per worker
    samples_per_epoch: Optional[int] = None  # per rank; None: from dataset.json beside the shards / world_size
    seed: Optional[int] = None  # of the data order and the crops; None: the run's seed
    max_bad_fraction: float = 0.01
    bad_check_min_samples: int = 500  # the ceiling is checked once this many samples were seen
    augment_on: str = "cpu"  # cpu: crops made in the loader workers | device: workers decode, crops on the GPU
    prefetch_factor: int = 2
    pin_memory: Optional[bool] = None  # None: pinned when the batches go to a GPU (non-blocking copies)
    mp_context: Optional[str] = None  # DataLoader multiprocessing context (None: the platform default)
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)

    def __post_init__(self) -> None:
        if isinstance(self.urls, str):
            self.urls = [self.urls]
        if isinstance(self.crops, dict):
            self.crops = MultiCropConfig(**self.crops)
        check_fields(self, "data", positive=("batch_size", "samples_per_epoch"), non_negative=("num_workers",),
                     unit=("max_bad_fraction",), choices={"augment_on": ("cpu", "device")})
        if self.weights is not None and len(self.weights) != len(self.urls):
            raise ValueError(f"config key 'data.weights' has {len(self.weights)} entries for {len(self.urls)} "
                             "data.urls: give one weight per source, or drop data.weights")
