"""The multi-crop as the official DINO code computes it, one PIL operation at a time: the reference
the product's vectorised crops (CPU and GPU) are checked against. Test code, not the product's."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from ssl_container.data.augment import (
    CropParams,
    MultiCropConfig,
    colour_pil,
    load_rgb,
    open_image,
    sample_multicrop_params,
)

_SOLARIZE_LUT = [i if i < 128 else 255 - i for i in range(256)] * 3  # ImageOps.solarize(threshold=128)


def reference_crop(img: Image.Image, p: CropParams, cfg: MultiCropConfig) -> np.ndarray:
    """One crop exactly as the official code computes it: PIL resize, PIL colour, PIL blur, solarise."""
    resample = Image.Resampling.BICUBIC if cfg.interpolation == "bicubic" else Image.Resampling.BILINEAR
    img = img.resize((p.size, p.size), resample, box=(p.left, p.top, p.left + p.width, p.top + p.height))
    img = colour_pil(img, p)
    if p.blur_sigma > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=p.blur_sigma))
    if p.solarize:
        img = img.point(_SOLARIZE_LUT)
    return np.asarray(img)


def reference_multicrop(data: bytes, rng: np.random.Generator, cfg: MultiCropConfig) -> list[np.ndarray]:
    """The PIL reference for all crops of one image (full-resolution decode: no draft mode)."""
    img = load_rgb(open_image(data, cfg.max_image_pixels))
    return [reference_crop(img, p, cfg) for p in sample_multicrop_params(rng, img.height, img.width, cfg)]
