"""The batched tensor ("GPU") multi-crop, run on CPU, against the CPU path and the PIL reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from multicrop_reference import reference_crop, reference_multicrop
from ssl_container.data.augment import (
    MultiCropAugment,
    MultiCropConfig,
    decode_for_crops,
    load_rgb,
    open_image,
    sample_multicrop_params,
)
from ssl_container.data.gpu_augment import GpuMultiCrop, hsv_to_rgb, rgb_to_hsv
from shard_fixtures import real_jpegs, synthetic_jpeg

SMALL = dict(global_size=32, local_size=16, n_local=4)
NODRAFT = dict(SMALL, draft=False)  # parameters in full-image coordinates, for comparisons with PIL crops


@pytest.fixture(scope="module")
def jpegs():
    real = real_jpegs(100)
    if real:
        return [b for _, b, _ in real]
    rng = np.random.default_rng(0)
    return [synthetic_jpeg(rng, 64, 80) for _ in range(100)]


def _rate_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits / n - p) <= 4 * math.sqrt(p * (1 - p) / n)


def _to_uint8_scale(x: torch.Tensor, cfg: MultiCropConfig) -> torch.Tensor:
    """Normalised (B, 3, S, S) -> (B, S, S, 3) in [0, 255]."""
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).permute(0, 2, 3, 1)


def _device_crops(jpegs, cfg, seeds):
    arrays, params = [], []
    for s, b in zip(seeds, jpegs):
        a, p = decode_for_crops(b, np.random.default_rng(s), cfg)
        arrays.append(a)
        params.append(p)
    return GpuMultiCrop(cfg, "cpu")(arrays, params), params


def test_hsv_round_trip():
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(hsv_to_rgb(*rgb_to_hsv(x)), x, atol=1e-5)


def test_pixels_match_the_pil_reference(jpegs):
    cfg = MultiCropConfig(global_size=64, local_size=32, colour_at_lower_resolution=False, draft=False)
    out, _ = _device_crops(jpegs[:12], cfg, range(12))
    refs = [reference_multicrop(b, np.random.default_rng(i), cfg) for i, b in enumerate(jpegs[:12])]
    for c in range(cfg.n_crops):
        ours = _to_uint8_scale(out[c], cfg).numpy()
        ref = np.stack([r[c] for r in refs])
        per_image = np.abs(ours - ref).mean(axis=(1, 2, 3))
        assert per_image.mean() < 2.0 and per_image.max() < 4.5, (c, per_image)


def _measured_rates(jpegs, cfg):
    """Flip, grayscale and jitter decisions read off the outputs (not the parameters)."""
    flips = grays = jitters = n = 0
    out, params = _device_crops(jpegs, cfg, range(len(jpegs)))
    out = [_to_uint8_scale(o, cfg).numpy() for o in out]
    plain = MultiCropConfig(**{**NODRAFT, "jitter_p": 0.0, "grayscale_p": 0.0, "local_blur_p": 0.0,
                               "global_blur_p": (0.0,), "global_solarize_p": (0.0,), "flip_p": 0.0})
    for i, b in enumerate(jpegs):
        img = load_rgb(open_image(b))
        for c in range(cfg.n_crops):
            o = out[c][i]
            p = params[i][c]._replace(jitter=None, gray=False, blur_sigma=0.0, solarize=False, flip=False)
            base = reference_crop(img, p, plain).astype(np.float32)
            d_plain, d_flip = np.abs(o - base).mean(), np.abs(o - base[:, ::-1]).mean()
            flips += d_flip < d_plain
            grays += np.abs(o[..., 0] - o[..., 1]).max() < 1.5 and np.abs(o[..., 1] - o[..., 2]).max() < 1.5
            jitters += min(d_plain, d_flip) > 2.5
            n += 1
    return flips, grays, jitters, n


def test_flip_gray_jitter_rates_measured_on_outputs(jpegs):
    # blur and solarise off so that every difference from the plain crop is flip, jitter or gray
    base = dict(NODRAFT, local_blur_p=0.0, global_blur_p=(0.0,), global_solarize_p=(0.0,))
    jpegs = jpegs[:60]
    flips, _, _, n = _measured_rates(jpegs, MultiCropConfig(**base, jitter_p=0.0, grayscale_p=0.0))
    assert _rate_ok(flips, n, 0.5), flips / n
    _, grays, _, n = _measured_rates(jpegs, MultiCropConfig(**base, flip_p=0.0, jitter_p=0.0))
    assert _rate_ok(grays, n, 0.2), grays / n
    _, _, jitters, n = _measured_rates(jpegs, MultiCropConfig(**base, flip_p=0.0, grayscale_p=0.0))
    assert _rate_ok(jitters, n, 0.8), jitters / n
    # and a wrong distribution is caught
    flips, _, _, n = _measured_rates(jpegs, MultiCropConfig(**base, flip_p=0.3, jitter_p=0.0, grayscale_p=0.0))
    assert not _rate_ok(flips, n, 0.5)


def _stats(crops: list[torch.Tensor], n_global: int) -> torch.Tensor:
    """Per channel mean and std, and the mean chroma (std across channels), of globals and of locals."""
    out = []
    for x in (torch.cat(crops[:n_global]), torch.cat(crops[n_global:])):
        out += [x.mean((0, 2, 3)), x.std((0, 2, 3)), x.std(1).mean().expand(3)]
    return torch.stack(out)


def _cpu_crops(jpegs, cfg, seeds):
    aug = MultiCropAugment(cfg)
    per_crop = [[] for _ in range(cfg.n_crops)]
    for s, b in zip(seeds, jpegs):
        for c, x in enumerate(aug(b, np.random.default_rng(s))):
            per_crop[c].append(x)
    return [aug.normalize(x) for x in per_crop]


def test_output_mean_and_variance_match_the_cpu_path(jpegs):
    jpegs = jpegs[:40]
    cfg = MultiCropConfig(**SMALL)
    cpu = _stats(_cpu_crops(jpegs, cfg, range(40)), 2)
    dev = _stats(_device_crops(jpegs, cfg, range(40))[0], 2)
    # same per-sample seeds, so the same parameters: only the arithmetic differs (measured about 0.02)
    assert (cpu - dev).abs().max() < 0.045, (cpu - dev)
    # independent seeds: only the sampling noise of 40 images x 6 crops (measured up to about 0.15)
    other = _stats(_device_crops(jpegs, cfg, range(1000, 1040))[0], 2)
    assert (cpu - other).abs().max() < 0.25
    # the same tolerance rejects a genuinely different distribution on the same seeds (measured 0.059-0.14)
    for wrong in (dict(grayscale_p=0.6), dict(jitter=(0.8, 0.4, 0.2, 0.1)), dict(local_blur_p=1.0)):
        wrong_cfg = MultiCropConfig(**SMALL, **wrong)
        assert (cpu - _stats(_device_crops(jpegs, wrong_cfg, range(40))[0], 2)).abs().max() > 0.045, wrong


def test_runs_on_any_device_and_keeps_shapes(jpegs):
    cfg = MultiCropConfig(**SMALL)
    img = load_rgb(open_image(jpegs[0]))
    params = [sample_multicrop_params(np.random.default_rng(0), img.height, img.width, cfg)]
    crops = GpuMultiCrop(cfg, torch.device("cpu"))([torch.from_numpy(np.array(img))], params)
    assert [tuple(c.shape) for c in crops] == [(1, 3, 32, 32)] * 2 + [(1, 3, 16, 16)] * 4
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
