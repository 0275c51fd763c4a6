"""The CPU multi-crop against the recipe: parameter statistics, PIL/torchvision equivalence, draft, eval."""
from __future__ import annotations

import io
import math
from itertools import permutations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from multicrop_reference import reference_multicrop
from ssl_container.data.augment import (
    EvalTransformConfig,
    MultiCropAugment,
    MultiCropConfig,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    draft_scale,
    eval_transform,
    load_rgb,
    open_image,
    sample_crop_box,
    sample_multicrop_params,
)
from shard_fixtures import real_jpegs, synthetic_jpeg


def _rate_ok(hits: int, n: int, p: float) -> bool:
    """Within 4 binomial standard deviations (a correct sampler fails about once in 16,000 runs)."""
    return abs(hits / n - p) <= 4 * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9


@pytest.fixture(scope="module")
def jpegs():
    real = real_jpegs(12)
    if real:
        return [b for _, b, _ in real]
    rng = np.random.default_rng(0)
    return [synthetic_jpeg(rng, 128, 170) for _ in range(12)]


def _params(cfg: MultiCropConfig, n: int, h: int = 128, w: int = 170):
    return [sample_multicrop_params(np.random.default_rng(i), h, w, cfg) for i in range(n)]


def test_random_decisions_follow_the_recipe():
    cfg = MultiCropConfig()
    ps = _params(cfg, 1500)
    flat = [p for sample in ps for p in sample]
    n = len(flat)
    assert _rate_ok(sum(p.flip for p in flat), n, 0.5)
    assert _rate_ok(sum(p.jitter is not None for p in flat), n, 0.8)
    assert _rate_ok(sum(p.gray for p in flat), n, 0.2)
    for crop, blur, solar in [(0, 1.0, 0.0), (1, 0.1, 0.2)] + [(c, 0.5, 0.0) for c in range(2, 10)]:
        assert _rate_ok(sum(s[crop].blur_sigma > 0 for s in ps), len(ps), blur), crop
        assert _rate_ok(sum(s[crop].solarize for s in ps), len(ps), solar), crop
    sigmas = np.array([p.blur_sigma for p in flat if p.blur_sigma > 0])
    assert 0.1 <= sigmas.min() and sigmas.max() <= 2.0 and abs(sigmas.mean() - 1.05) < 0.03
    jit = np.array([p.jitter[1:] for p in flat if p.jitter is not None])
    for col, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert lo <= jit[:, col].min() and jit[:, col].max() <= hi
        assert abs(jit[:, col].mean() - (lo + hi) / 2) < 0.01 * (hi - lo) * 3
    orders = [p.jitter[0] for p in flat if p.jitter is not None]
    counts = np.array([orders.count(o) for o in permutations(range(4))])
    expected = len(orders) / 24
    assert ((counts - expected) ** 2 / expected).sum() < 60  # chi-square, 23 dof: p ~ 3e-5 at 60
    # the check is sharp enough to reject a wrong sampler
    wrong = [p for s in _params(MultiCropConfig(flip_p=0.3), 1500) for p in s]
    assert not _rate_ok(sum(p.flip for p in wrong), len(wrong), 0.5)


def test_crop_geometry_matches_torchvision():
    """Our RandomResizedCrop sampler vs torchvision's, for the global and the local scale ranges."""
    torch.manual_seed(0)
    img = torch.zeros(3, 128, 170)
    for scale in [(0.4, 1.0), (0.05, 0.4)]:
        rng = np.random.default_rng(0)
        ours = np.array([sample_crop_box(rng, 128, 170, scale, (3 / 4, 4 / 3)) for _ in range(3000)])
        ref = np.array([T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(3000)])
        for boxes in (ours, ref):
            area = boxes[:, 2] * boxes[:, 3] / (128 * 170)
            assert area.min() >= scale[0] - 0.02 and area.max() <= scale[1] + 0.02
        a_ours = np.sort(ours[:, 2] * ours[:, 3] / (128 * 170))
        a_ref = np.sort(ref[:, 2] * ref[:, 3] / (128 * 170))
        assert np.abs(a_ours - a_ref).max() < 0.05 * (scale[1] - scale[0]) + 0.01  # quantiles (KS-like)
        r_ours, r_ref = np.log(ours[:, 3] / ours[:, 2]), np.log(ref[:, 3] / ref[:, 2])
        assert abs(r_ours.mean() - r_ref.mean()) < 0.02 and abs(r_ours.std() - r_ref.std()) < 0.02
        centre = ours[:, 0] + ours[:, 2] / 2  # positions uniform: centres symmetric around the middle
        assert abs(centre.mean() - 64) < 2


def test_colour_operations_are_torchvisions(jpegs):
    img = load_rgb(open_image(jpegs[0]))
    for f in (0.6, 0.93, 1.4):
        assert np.array_equal(np.asarray(adjust_brightness(img, f)), np.asarray(TF.adjust_brightness(img, f)))
        assert np.array_equal(np.asarray(adjust_contrast(img, f)), np.asarray(TF.adjust_contrast(img, f)))
        assert np.array_equal(np.asarray(adjust_saturation(img, f)), np.asarray(TF.adjust_saturation(img, f)))
    for h in (-0.1, -0.002, 0.0, 0.05):
        assert np.array_equal(np.asarray(adjust_hue(img, h)), np.asarray(TF.adjust_hue(img, h)))


@pytest.mark.parametrize("lower", [False, True])
def test_fast_path_close_to_the_reference(jpegs, lower):
    """Same parameters: the fast path differs from PIL-per-crop only by resize/blur kernels (and, with
    ``colour_at_lower_resolution``, by where the colour work happens)."""
    cfg = MultiCropConfig(global_size=96, local_size=48, colour_at_lower_resolution=lower)
    aug = MultiCropAugment(cfg)
    diffs = []
    for i, b in enumerate(jpegs[:8]):
        ours = aug(b, np.random.default_rng(i))
        ref = reference_multicrop(b, np.random.default_rng(i), cfg)
        ours = [o.permute(1, 2, 0).numpy() for o in ours]  # (3, S, S) -> (S, S, 3) like PIL
        assert [o.shape for o in ours] == [r.shape for r in ref]
        diffs += [np.abs(o.astype(np.int16) - r.astype(np.int16)).mean() for o, r in zip(ours, ref)]
    assert np.mean(diffs) < (1.0 if not lower else 2.0) and np.max(diffs) < (3.0 if not lower else 6.0)
    crops = aug.normalize([aug(jpegs[0], np.random.default_rng(0))[0]] * 2)
    assert crops.shape == (2, 3, 96, 96) and crops.dtype == torch.float32


def test_draft_decode_only_when_every_crop_fits():
    rng = np.random.default_rng(0)
    big = synthetic_jpeg(rng, 700, 900)
    cfg = MultiCropConfig(global_size=64, local_size=32, global_scale=(0.3, 0.5))
    img = open_image(big)
    assert draft_scale(img, sample_multicrop_params(np.random.default_rng(1), 700, 900, cfg)) == 0.25
    assert img.size == (225, 175)
    big_crops = MultiCropConfig(global_size=600, local_size=32)
    assert draft_scale(open_image(big), sample_multicrop_params(np.random.default_rng(1), 700, 900, big_crops)) == 1
    nodraft = MultiCropConfig(global_size=64, local_size=32, global_scale=(0.3, 0.5), draft=False)
    for i in range(3):
        a = MultiCropAugment(cfg)(big, np.random.default_rng(i))
        b = MultiCropAugment(nodraft)(big, np.random.default_rng(i))
        assert np.mean([(x.int() - y.int()).abs().float().mean() for x, y in zip(a, b)]) < 2.0


def test_eval_transform_is_resize_then_center_crop():
    rng = np.random.default_rng(3)
    cfg = EvalTransformConfig()
    ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                     T.Normalize(cfg.mean, cfg.std)])
    for h, w in [(375, 500), (500, 333)]:
        data = synthetic_jpeg(rng, h, w)
        ours = eval_transform(data, cfg)
        assert ours.shape == (3, 224, 224)
        assert float((ours - ref(Image.open(io.BytesIO(data)).convert("RGB"))).abs().mean()) < 0.01
    small = eval_transform(synthetic_jpeg(rng, 32, 32), EvalTransformConfig(resize=32, crop=28))
    assert small.shape == (3, 28, 28)


def test_config_validation():
    with pytest.raises(ValueError, match="local_scale"):
        MultiCropConfig(local_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="interpolation"):
        MultiCropConfig(interpolation="nearest")
    assert MultiCropConfig(n_local=0).crop_sizes() == [224, 224]
