"""DINO multi-crop as batched tensor operations, for nodes whose CPUs cannot feed the GPUs.

The DataLoader workers only decode JPEGs and draw the crop parameters (the same per-sample generators and
the same :func:`~ssl_container.data.augment.sample_multicrop_params` as the CPU path, so a batch has the
same crop geometry and the same random decisions on either path). Everything else runs here on whatever
device the tensors live on, in the recipe's order: crop + antialiased resize, flip, colour jitter (the
four operations in each crop's own random order), grayscale, Gaussian blur, solarise, normalise.

Differences from the PIL path are numerical only: float arithmetic instead of uint8 rounding at each
step, HSV hue shift by the exact factor instead of PIL's 1/255 steps, a true Gaussian kernel instead of
PIL's three box passes. ``tests/test_data_gpu_augment.py`` checks the two paths for pixel agreement on
the same parameters and for equal output statistics.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ssl_container.data.augment import CropParams, MultiCropConfig

# columns of the packed parameter tensor (B, n_crops, N_COLS)
(TOP, LEFT, HEIGHT, WIDTH, SIZE, FLIP, JITTER, ORDER0, ORDER1, ORDER2, ORDER3,
 BRIGHT, CONTRAST, SATUR, HUE, GRAY, SIGMA, SOLAR) = range(18)
N_COLS = 18
_GRAY_W = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")


def pack_params(params: Sequence[Sequence[CropParams]]) -> torch.Tensor:
    """Per-sample crop parameters -> a float64 tensor (B, n_crops, 18) that crosses process boundaries."""
    rows = []
    for sample in params:
        for p in sample:
            if p.jitter is None:
                jit = [0.0, 0, 1, 2, 3, 1.0, 1.0, 1.0, 0.0]
            else:
                order, b, c, s, h = p.jitter
                jit = [1.0, *order, b, c, s, h]
            rows.append([p.top, p.left, p.height, p.width, p.size, float(p.flip), *jit, float(p.gray),
                         p.blur_sigma, float(p.solarize)])
    return torch.tensor(rows, dtype=torch.float64).view(len(params), -1, N_COLS)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GRAY_W[0] * r + _GRAY_W[1] * g + _GRAY_W[2] * b).unsqueeze(1)


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, torch.remainder(h / 6.0, 1.0), torch.zeros_like(h))
    return h, s, maxc


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long().remainder(6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q], dim=1)  # (N, 18, H, W)
    idx = torch.stack([i, i + 6, i + 12], dim=1)
    return table.gather(1, idx)


def _jitter_op(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    """One of brightness / contrast / saturation / hue on a (n, 3, H, W) batch in [0, 1], factors (n,)."""
    f4 = f.view(-1, 1, 1, 1).to(x.dtype)
    if op == 0:
        return (x * f4).clamp_(0, 1)
    if op == 1:
        mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        return (f4 * x + (1 - f4) * mean).clamp_(0, 1)
    if op == 2:
        return (f4 * x + (1 - f4) * rgb_to_grayscale(x)).clamp_(0, 1)
    h, s, v = rgb_to_hsv(x)
    h = torch.remainder(h + f.view(-1, 1, 1).to(x.dtype), 1.0)
    return hsv_to_rgb(h, s, v)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian (replicated edges), each kernel truncated at ceil(3 sigma) like the CPU path.

    Written as K shifted multiply-adds per direction with per-image weights: a grouped convolution would
    need one group per image and channel, and oneDNN builds a new kernel for every batch size on CPU."""
    n, _, hgt, wid = x.shape
    radius = torch.clamp(torch.ceil(3 * sigma), min=1)
    r_max = int(radius.max().item())
    t = torch.arange(-r_max, r_max + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].to(x.dtype)) ** 2)
    k = torch.where(t[None].abs() <= radius[:, None].to(x.dtype), k, torch.zeros_like(k))
    k = (k / k.sum(1, keepdim=True)).view(n, 1, 1, 1, -1)
    xp = F.pad(x, (r_max, r_max, 0, 0), mode="replicate")
    y = sum(k[..., j] * xp[..., j:j + wid] for j in range(2 * r_max + 1))
    yp = F.pad(y, (0, 0, r_max, r_max), mode="replicate")
    return sum(k[..., j] * yp[..., j:j + hgt, :] for j in range(2 * r_max + 1))


class GpuMultiCrop:
    """Batched multi-crop on ``device``: decoded uint8 images + packed parameters -> normalised crops."""

    def __init__(self, cfg: MultiCropConfig, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std, device=self.device).view(1, 3, 1, 1)

    def from_packed(self, packed: dict) -> list[torch.Tensor]:
        """The ``crops`` entry of a batch made with ``augment_on="device"`` (one host->device copy)."""
        flat = packed["image_data"].to(self.device, non_blocking=True)
        images, offset = [], 0
        for h, w in packed["image_shapes"].tolist():
            images.append(flat[offset:offset + h * w * 3].view(h, w, 3))
            offset += h * w * 3
        return self(images, packed["params"])

    @torch.no_grad()
    def __call__(self, images: Sequence[torch.Tensor | np.ndarray | Image.Image],
                 params: torch.Tensor | Sequence[Sequence[CropParams]]) -> list[torch.Tensor]:
        """images: B decoded (H, W, 3) uint8 images (arrays, tensors or RGB PIL images);
        params: packed (B, n_crops, 18) or lists of :class:`CropParams`.

        Returns ``n_crops`` float32 tensors (B, 3, S, S), globals first."""
        if not isinstance(params, torch.Tensor):
            params = pack_params(params)
        images = [torch.as_tensor(np.array(im) if isinstance(im, Image.Image) else im).to(self.device)
                  for im in images]
        B, n_crops, _ = params.shape
        out: list[torch.Tensor | None] = [None] * n_crops
        sizes = params[0, :, SIZE].long().tolist()
        for size in sorted(set(sizes)):  # one batched pass per resolution (globals, locals)
            cols = [c for c in range(n_crops) if sizes[c] == size]
            p = params[:, cols].reshape(-1, N_COLS)  # row = b * len(cols) + j
            x = self._crop_resize(images, p, size, len(cols))
            x = self._augment(x, p.to(self.device))
            x = ((x - self.mean) / self.std).view(B, len(cols), 3, size, size)
            for j, c in enumerate(cols):
                out[c] = x[:, j]
        return out  # type: ignore[return-value]

    def _crop_resize(self, images: list[torch.Tensor], p: torch.Tensor, size: int, per_image: int) -> torch.Tensor:
        crops = []
        for row, (top, left, h, w) in enumerate(p[:, :4].long().tolist()):
            box = images[row // per_image][top:top + h, left:left + w].permute(2, 0, 1).unsqueeze(0).float()
            if (h, w) != (size, size):
                box = F.interpolate(box, size=(size, size), mode=self.cfg.interpolation, antialias=True)
            crops.append(box)
        return torch.cat(crops).clamp_(0, 255).div_(255)

    def _augment(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        flip = p[:, FLIP] > 0
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        jitter = p[:, JITTER] > 0
        factors = p[:, BRIGHT:HUE + 1]
        for k in range(4):  # position k of each crop's random order
            for op in range(4):
                sel = torch.nonzero(jitter & (p[:, ORDER0 + k] == op)).flatten()
                if sel.numel():
                    x[sel] = _jitter_op(x[sel], op, factors[sel, op])
        gray = p[:, GRAY] > 0
        x = torch.where(gray.view(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)
        sel = torch.nonzero(p[:, SIGMA] > 0).flatten()
        if sel.numel():
            x[sel] = _blur(x[sel], p[sel, SIGMA])
        solar = (p[:, SOLAR] > 0).view(-1, 1, 1, 1)
        return torch.where(solar & (x >= 128 / 255), 1 - x, x)

