"""DINO multi-crop on CPU: parameters drawn from an explicit generator, applied with fast kernels.

The recipe is the official one (../shared/reference/dino.md): RandomResizedCrop (bicubic), flip 0.5,
ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8 in random order, grayscale 0.2, Gaussian blur (global 1: p 1.0,
global 2: p 0.1 + solarise p 0.2, locals: p 0.5, sigma U(0.1, 2.0)), ImageNet normalisation.

Two ideas make it deterministic and fast:

* All randomness of one sample is drawn up front by :func:`sample_multicrop_params` from a
  ``numpy.random.Generator`` the caller seeds per sample, so the crops depend on (seed, epoch, rank,
  worker, position) and never on worker scheduling or on torch's global RNG. The same parameters drive
  this CPU path, the batched tensor path (``gpu_augment.py``) and the PIL reference used in tests.
* The colour operations are the PIL uint8 kernels the official recipe uses (bit-identical results for
  the same parameters), but each crop's colour work runs at the *lower* of its source-box and output
  resolutions (``colour_at_lower_resolution``): an upsampled crop is jittered before it is resized.
  Resizing uses torch's uint8 antialiased bicubic kernel (about 3x faster than PIL's), and the blur a
  separable float Gaussian. See docs/performance.md for the measured effect of each choice.
"""
from __future__ import annotations

import io
import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# the configs live in data/config.py (no torch: the command line reads them); re-exported here
from ssl_container.data.config import IMAGENET_MEAN, IMAGENET_STD, EvalTransformConfig, MultiCropConfig  # noqa: E402,F401

_FLIP = Image.Transpose.FLIP_LEFT_RIGHT


class BadImageError(ValueError):
    """The bytes are not a decodable image (corrupt, truncated, unsupported, or refused as too large)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class CropParams(NamedTuple):
    """Everything random about one crop. ``jitter`` is None or (order of the 4 ops, b, c, s, h)."""

    top: int
    left: int
    height: int
    width: int
    size: int
    flip: bool
    jitter: tuple[tuple[int, int, int, int], float, float, float, float] | None
    gray: bool
    blur_sigma: float  # 0.0: no blur
    solarize: bool


# ------------------------------------------------------------------------------------------------
# parameters


def sample_crop_box(rng: np.random.Generator, height: int, width: int, scale: Sequence[float],
                    ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from ``rng``: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # fallback: central crop at the nearest allowed aspect ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_multicrop_params(rng: np.random.Generator, height: int, width: int,
                            cfg: MultiCropConfig) -> list[CropParams]:
    """Draw the parameters of all crops of one image (globals first), in a fixed order from ``rng``."""
    out = []
    bj, cj, sj, hj = cfg.jitter
    for i in range(cfg.n_crops):
        is_global = i < cfg.n_global
        size = cfg.global_size if is_global else cfg.local_size
        scale = cfg.global_scale if is_global else cfg.local_scale
        top, left, h, w = sample_crop_box(rng, height, width, scale, cfg.ratio)
        flip = bool(rng.random() < cfg.flip_p)
        jitter = None
        if rng.random() < cfg.jitter_p:
            order = tuple(int(k) for k in rng.permutation(4))
            jitter = (order, rng.uniform(max(0.0, 1 - bj), 1 + bj), rng.uniform(max(0.0, 1 - cj), 1 + cj),
                      rng.uniform(max(0.0, 1 - sj), 1 + sj), rng.uniform(-hj, hj))
        gray = bool(rng.random() < cfg.grayscale_p)
        if is_global:
            blur_p = cfg.global_blur_p[i % len(cfg.global_blur_p)]
            sol_p = cfg.global_solarize_p[i % len(cfg.global_solarize_p)]
        else:
            blur_p, sol_p = cfg.local_blur_p, cfg.local_solarize_p
        sigma = float(rng.uniform(*cfg.blur_sigma)) if rng.random() < blur_p else 0.0
        solarize = bool(rng.random() < sol_p)
        out.append(CropParams(top, left, h, w, size, flip, jitter, gray, sigma, solarize))
    return out


# ------------------------------------------------------------------------------------------------
# decoding


def open_image(data: bytes, max_image_pixels: int | None = None) -> Image.Image:
    """Open (header only) with the decompression-bomb limit enforced as an error, not a warning."""
    limit = Image.MAX_IMAGE_PIXELS if max_image_pixels is None else max_image_pixels
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exn:
        raise BadImageError("image_too_large", str(exn)) from exn
    except Exception as exn:  # UnidentifiedImageError, OSError, SyntaxError from plugins, ...
        raise BadImageError("corrupt_image", f"{type(exn).__name__}: {exn}") from exn
    if limit is not None and img.width * img.height > limit:
        raise BadImageError("image_too_large",
                            f"{img.width}x{img.height} exceeds the decompression-bomb limit of {limit} pixels")
    return img


def load_rgb(img: Image.Image) -> Image.Image:
    """The decoded image as RGB. Transparent pixels are composited on white (what a viewer shows for a
    drawing or a logo): a plain conversion would keep whatever colour they hold, usually black."""
    try:
        img.load()
        if img.mode == "RGB":
            return img
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return img.convert("RGB")
    except Exception as exn:
        raise BadImageError("corrupt_image", f"{type(exn).__name__}: {exn}") from exn


def decode_rgb(data: bytes, max_image_pixels: int | None = None) -> np.ndarray:
    """Full-resolution decode to an (H, W, 3) uint8 array; raises :class:`BadImageError`."""
    return np.array(load_rgb(open_image(data, max_image_pixels)))


def draft_scale(img: Image.Image, params: Sequence[CropParams]) -> float:
    """Ask the JPEG decoder for the smallest DCT scale at which every crop box still covers its output.

    Returns the factor (<= 1) by which the decoded image is smaller than the original."""
    if img.format != "JPEG":
        return 1.0
    need = max(max(p.size / p.height, p.size / p.width) for p in params)  # smallest allowed scale
    if need > 0.5:
        return 1.0
    w0, h0 = img.size
    img.draft("RGB", (math.ceil(w0 * need), math.ceil(h0 * need)))
    return img.size[0] / w0


def decode_for_crops(data: bytes, rng: np.random.Generator, cfg: MultiCropConfig
                     ) -> tuple[Image.Image, list[CropParams]]:
    """Decode one image (RGB, loaded) and draw its crop parameters (in the decoded image's coordinates)."""
    img = open_image(data, cfg.max_image_pixels)
    params = sample_multicrop_params(rng, img.height, img.width, cfg)
    if cfg.draft:
        w0, h0 = img.size
        try:
            scale = draft_scale(img, params)
        except Exception as exn:  # a JPEG whose header the DCT-scaling path rejects
            raise BadImageError("corrupt_image", f"{type(exn).__name__}: {exn}") from exn
        if scale < 1.0:
            sy, sx = img.size[1] / h0, img.size[0] / w0
            params = [_rescale_box(p, sy, sx, img.size[1], img.size[0]) for p in params]
    return load_rgb(img), params


def _rescale_box(p: CropParams, sy: float, sx: float, height: int, width: int) -> CropParams:
    top, left = min(int(round(p.top * sy)), height - 1), min(int(round(p.left * sx)), width - 1)
    h = max(1, min(int(round(p.height * sy)), height - top))
    w = max(1, min(int(round(p.width * sx)), width - left))
    return p._replace(top=top, left=left, height=h, width=w)


# ------------------------------------------------------------------------------------------------
# PIL colour operations: exactly torchvision's functional_pil (what the official recipe runs)


def adjust_brightness(img: Image.Image, f: float) -> Image.Image:
    return Image.blend(Image.new(img.mode, img.size, 0), img, f)


def adjust_contrast(img: Image.Image, f: float) -> Image.Image:
    # ImageEnhance.Contrast's int(mean + 0.5) of the L image; np.mean of uint8 in float64 is exact here
    mean = int(np.asarray(img.convert("L")).mean() + 0.5)
    return Image.blend(Image.new(img.mode, img.size, (mean,) * 3), img, f)


def adjust_saturation(img: Image.Image, f: float) -> Image.Image:
    return Image.blend(img.convert("L").convert(img.mode), img, f)


def adjust_hue(img: Image.Image, f: float) -> Image.Image:
    # torchvision: np_h += np.int32(f * 255).astype(np.uint8), wrapping around; no shortcut for a zero shift
    # (torchvision still round-trips through HSV, which is lossy)
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h)
    np_h += np.uint8(int(f * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def colour_pil(img: Image.Image, p: CropParams) -> Image.Image:
    """Flip, colour jitter, grayscale: the resolution-independent part of one crop's augmentation."""
    if p.flip:
        img = img.transpose(_FLIP)
    if p.jitter is not None:
        order, *factors = p.jitter
        for k in order:
            img = _JITTER_OPS[k](img, factors[k])
    if p.gray:
        img = img.convert("L").convert("RGB")
    return img


# ------------------------------------------------------------------------------------------------
# tensor helpers shared with gpu_augment.py


def gaussian_kernel1d(sigma: float) -> list[float]:
    """Sampled Gaussian truncated at ceil(3 sigma) (at least 1), normalised to sum 1."""
    radius = max(1, math.ceil(3 * sigma))
    k = [math.exp(-0.5 * (x / sigma) ** 2) for x in range(-radius, radius + 1)]
    total = sum(k)
    return [v / total for v in k]


def _blur_dim(x: torch.Tensor, k: list[float], dim: int) -> torch.Tensor:
    r, n = len(k) // 2, x.shape[dim]
    shape = list(x.shape)
    shape[dim] = r
    xp = torch.cat([x.narrow(dim, 0, 1).expand(shape), x, x.narrow(dim, n - 1, 1).expand(shape)], dim=dim)
    y = xp.narrow(dim, 0, n) * k[0]
    for t in range(1, len(k)):
        y.add_(xp.narrow(dim, t, n), alpha=k[t])
    return y


def gaussian_blur_u8(crop: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian with replicated edges on a (3, H, W) uint8 tensor, rounded back to uint8."""
    k = gaussian_kernel1d(sigma)
    y = _blur_dim(_blur_dim(crop.float(), k, 2), k, 1)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def resize_chw(box: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """An (h, w, 3) uint8 view -> a contiguous (3, size, size) uint8 tensor, with torch's antialiased kernel
    (PIL-compatible weights). The channels-last input is torch's fast uint8 path; its output is NCHW."""
    t = box.permute(2, 0, 1)
    if box.shape[0] == size and box.shape[1] == size:
        return t.contiguous()
    return F.interpolate(t.unsqueeze(0), size=(size, size), mode=mode, antialias=True)[0]


# ------------------------------------------------------------------------------------------------
# the CPU multi-crop


class MultiCropAugment:
    """Callable: (image bytes, per-sample generator) -> list of (3, S, S) uint8 tensors, one per crop.

    :meth:`normalize` turns the stacked uint8 crops of a batch into the float crops the model eats.
    """

    def __init__(self, cfg: MultiCropConfig):
        self.cfg = cfg
        self._scale = torch.tensor([1 / (255 * s) for s in cfg.std])
        self._shift = torch.tensor([-m / s for m, s in zip(cfg.mean, cfg.std)])

    def __call__(self, data: bytes, rng: np.random.Generator) -> list[torch.Tensor]:
        img, params = decode_for_crops(data, rng, self.cfg)
        return self.apply(img, params)

    def apply(self, img: Image.Image, params: Sequence[CropParams]) -> list[torch.Tensor]:
        """The crops of one decoded image as contiguous (3, S, S) uint8 tensors."""
        mode = self.cfg.interpolation
        pixels = None  # the decoded image as an (H, W, 3) tensor, made on first use
        out = []
        for p in params:
            if self.cfg.colour_at_lower_resolution and p.height * p.width < p.size * p.size:
                # upsampling: the colour work is cheaper on the source box, then resize
                box = colour_pil(img.crop((p.left, p.top, p.left + p.width, p.top + p.height)), p)
                crop = resize_chw(torch.from_numpy(np.array(box)), p.size, mode)
            else:
                if pixels is None:
                    pixels = torch.from_numpy(np.array(img))
                crop = resize_chw(pixels[p.top:p.top + p.height, p.left:p.left + p.width], p.size, mode)
                coloured = colour_pil(Image.fromarray(crop.permute(1, 2, 0).numpy()), p)
                crop = torch.from_numpy(np.array(coloured)).permute(2, 0, 1).contiguous()
            if p.blur_sigma > 0:
                crop = gaussian_blur_u8(crop, p.blur_sigma)
            if p.solarize:  # ImageOps.solarize(threshold=128)
                crop = torch.where(crop >= 128, 255 - crop, crop)
            out.append(crop)
        return out

    def normalize(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 (or a list of (3, S, S)) -> contiguous (B, 3, S, S) float32, normalised."""
        u8 = torch.stack(list(crops)) if not isinstance(crops, torch.Tensor) else crops
        out = u8.to(torch.float32)
        return out.mul_(self._scale.view(1, 3, 1, 1)).add_(self._shift.view(1, 3, 1, 1))


# ------------------------------------------------------------------------------------------------
# the reference: the recipe as it is usually written (PIL per crop, torchvision transforms), driven by
# the same parameters. Used by the tests (distribution and pixel equivalence) and the benchmark.


# ------------------------------------------------------------------------------------------------
# evaluation


def eval_transform(data: bytes, cfg: EvalTransformConfig) -> torch.Tensor:
    """bytes -> (3, crop, crop) float32 normalised; raises :class:`BadImageError`."""
    img = open_image(data, cfg.max_image_pixels)
    if cfg.draft and img.format == "JPEG":
        s = cfg.resize / min(img.size)
        if s <= 0.5:
            img.draft("RGB", (math.ceil(img.size[0] * s), math.ceil(img.size[1] * s)))
    arr = np.array(load_rgb(img))
    h, w = arr.shape[:2]
    if h <= w:
        nh, nw = cfg.resize, int(cfg.resize * w / h)  # torchvision's Resize(int) rounding
    else:
        nh, nw = int(cfg.resize * h / w), cfg.resize
    t = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
    if (nh, nw) != (h, w):
        t = F.interpolate(t, size=(nh, nw), mode=cfg.interpolation, antialias=True)
    top, left = int(round((nh - cfg.crop) / 2.0)), int(round((nw - cfg.crop) / 2.0))
    t = t[0, :, top:top + cfg.crop, left:left + cfg.crop].float().div_(255)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return t.sub_(mean).div_(std)
