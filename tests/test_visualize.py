"""Pictures of what a backbone learned: the PCA and attention maths on hand-made inputs, the CLI."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import ssl_container  # noqa: F401  (registers the models with timm)
from ssl_container.models import create_model
from ssl_container.downstream.visualize import attention_maps, describe, pca_basis, pca_rgb, visualize

REPO = Path(__file__).resolve().parents[1]


def test_pca_basis_on_points_of_a_line_and_random_data():
    t = torch.linspace(-1, 1, 11)
    mean, comps = pca_basis(torch.stack([1 + t, 2 + 2 * t], 1), n=1)
    assert torch.allclose(mean, torch.tensor([1.0, 2.0]), atol=1e-6)
    assert torch.allclose(comps[0], torch.tensor([1.0, 2.0]) / math.sqrt(5), atol=1e-6)  # the line's direction

    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)) * torch.linspace(3, 0.1, 16)
    _, comps = pca_basis(x, n=3)
    assert torch.allclose(comps @ comps.T, torch.eye(3), atol=1e-5)  # orthonormal
    cov = np.cov(x.numpy().T)
    w, v = np.linalg.eigh(cov)
    top = v[:, ::-1][:, :3].T  # the covariance's eigenvectors by decreasing eigenvalue
    assert np.allclose(np.abs((comps.numpy() * top).sum(1)), 1.0, atol=1e-4)
    # rank-deficient input: the components beyond the rank are zero, not NaN
    _, comps = pca_basis(torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), n=3)
    assert torch.isfinite(comps).all() and torch.allclose(comps[1:], torch.zeros(2, 3))


def test_pca_rgb_finds_an_object_framed_by_background():
    # 8 x 8 maps whose centre 4 x 4 holds a different feature: the centre is the foreground.
    g = torch.Generator().manual_seed(0)
    maps = 0.01 * torch.randn(2, 6, 8, 8, generator=g)
    maps[:, 0, 2:6, 2:6] += 1.0
    maps[:, 1, 2:4, 2:6] += 0.5  # two parts of the object, so that the colours differ
    rgb, fg = pca_rgb(maps)
    want = np.zeros((8, 8), bool)
    want[2:6, 2:6] = True
    assert rgb.shape == (2, 8, 8, 3) and fg.shape == (2, 8, 8)
    assert (fg == want).all()
    assert rgb.min() >= 0 and rgb.max() <= 1 and (rgb[~fg] == 0).all()
    assert np.abs(rgb[0, 2, 2] - rgb[0, 5, 5]).max() > 0.5  # the two parts get different colours
    # flipping the feature's sign flips the first component: the border rule still picks the centre
    assert (pca_rgb(-maps)[1] == want).all()


def test_container_attention_is_a_distribution_per_head_from_the_pooled_query():
    torch.manual_seed(0)
    model = create_model("container_light_narrow", num_classes=0).eval()
    x = torch.randn(2, 3, 128, 128)
    attn = attention_maps(model, x)
    last = model.stages[-1].blocks[-1]
    heads = last.aggregation.affinity.num_heads
    assert attn.shape == (2, heads, 4, 4)
    assert torch.allclose(attn.sum((2, 3)), torch.ones(2, heads), atol=1e-5)
    # the same by hand: the last block's input, its Q and K, the mean query per head
    with torch.no_grad():
        h = x
        for stage in model.stages[:-1]:
            h = stage(h)
        h = model.stages[-1].patch_embed(h)
        for block in model.stages[-1].blocks[:-1]:
            h = block(h)
        h = h + last.pos_embed(h)
        v, q, k = last.aggregation.project(last.norm1(h))
        d = q.shape[1] // heads
        qh, kh = q.reshape(2, heads, d, 16), k.reshape(2, heads, d, 16)
        want = torch.softmax(torch.einsum("bmd,bmdn->bmn", qh.mean(-1), kh) / math.sqrt(d), -1).view(2, heads, 4, 4)
    assert torch.allclose(attn, want, atol=1e-5)
    assert attn.std() > 0  # not uniform: the queries and keys of a random network differ


def test_vit_attention_uses_the_class_token_and_conv_nets_have_none():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0).eval()
    attn = attention_maps(vit, torch.randn(1, 3, 224, 224))
    assert attn.shape == (1, 3, 14, 14) and torch.allclose(attn.sum((2, 3)), torch.ones(1, 3), atol=1e-5)
    resnet = timm.create_model("resnet18", num_classes=0).eval()
    assert attention_maps(resnet, torch.randn(1, 3, 64, 64)) is None
    pics = describe(resnet, torch.randn(2, 3, 64, 64))
    assert pics.attention is None and set(pics.pca) == {"level -2", "level -1"}
    assert set(describe(vit, torch.randn(2, 3, 224, 224)).pca) == {"block 11", "block 12"}


def test_describe_and_draw_two_models_side_by_side(tmp_path):
    torch.manual_seed(0)
    a, b = create_model("container_light_narrow", num_classes=0), create_model("container_light_narrow", num_classes=0)
    x = torch.randn(3, 3, 128, 128)
    pics = describe(a, x)
    assert pics.images.shape == (3, 128, 128, 3) and 0 <= pics.images.min() and pics.images.max() <= 1
    assert pics.pca["stage 3"].shape == (3, 8, 8, 3) and pics.pca["stage 4"].shape == (3, 4, 4, 3)
    assert pics.attention.shape == (3, 4, 128, 128)
    assert a.training  # describe leaves the mode as it found it
    path = visualize([a, b], x, tmp_path / "pair.png", titles=["a", "b"])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]


def test_visualize_command_on_a_model_name_and_an_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ssl_container", "visualize", "container_light_narrow",
                           "--images", str(tmp_path), "--out", str(tmp_path / "pics"), "--size", "64"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (tmp_path / "pics").iterdir())
    assert names == ["00_img0.png", "01_img1.png", "02_img2.png", "grid.png"]
    assert "3 images at 64 px" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "ssl_container", "visualize", "no_such_model_or_path",
                          "--images", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "neither a file or folder nor a model name" in bad.stderr


def test_command_line_help_and_print_config_do_not_import_torch():
    # --help, --print-config and --dry-run must answer at once: torch + timm take ~5 s to import.
    code = """
import sys, contextlib, io
from ssl_container.cli import main
for argv in (["--help"], ["train", "--help"], ["demo", "--help"], ["export", "--help"], ["visualize", "--help"],
             ["launch", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
with contextlib.redirect_stdout(io.StringIO()) as out:
    assert main(["train", "--config", "configs/demo.yaml", "--print-config", "schedule.lr=0.01"]) == 0
assert "lr: 0.01" in out.getvalue()
heavy = sorted(m for m in ("torch", "timm", "deepspeed", "numpy") if m in sys.modules)
print("heavy:", heavy)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("heavy: []"), proc.stdout


def test_a_shard_or_a_broken_image_is_named_with_what_visualize_wants(tmp_path):
    """Given a .tar, visualize said "cannot identify image file <_io.BytesIO ...>", naming no file."""
    from ssl_container.downstream.visualize import load_images

    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"\0" * 1024)
    with pytest.raises(ValueError, match=r"train-000000\.tar: a WebDataset shard, not an image: pass image files"):
        load_images([shard], size=64)
    (tmp_path / "fake.jpg").write_text("not a JPEG")
    with pytest.raises(ValueError, match=r"fake\.jpg: not a readable image \(.*cannot identify image file it") as err:
        load_images([tmp_path / "fake.jpg"], size=64)
    assert "BytesIO" not in str(err.value)


def test_with_a_reference_an_object_touching_the_border_is_the_foreground_and_colours_do_not_depend_on_pca_signs():
    """Fashion-MNIST's garments reach the image border: the border rule called them background (black object,
    coloured border) for one network and not the other. With the image's saliency as reference both mark the
    object, and the colours are the same whatever sign or order the feature PCA comes out in."""
    from ssl_container.downstream.visualize import saliency

    g = torch.Generator().manual_seed(0)
    images = torch.zeros(2, 3, 64, 64)
    images[:, :, 8:64, 8:56] = 1.0  # a bright garment on black, touching the bottom border
    # its features spread over the neighbouring positions (receptive fields): most of the map's border
    maps = 0.01 * torch.randn(2, 6, 8, 8, generator=g)
    maps[:, 0, 1:8, :] += 1.0
    maps[:, 1, 1:4, :] += 0.5
    maps[:, 2, 1:8, 0:4] += 0.3
    want = np.zeros((8, 8), bool)
    want[1:8, :] = True
    ref = saliency(images, (8, 8))
    assert ref.shape == (2, 8, 8) and float(ref[0, 4, 3]) > 0.9 and float(ref[0, 0, 0]) < 0.1
    rgb, fg = pca_rgb(maps, reference=ref)
    assert (fg[0] == want).all() and (fg[1] == want).all()
    assert not (pca_rgb(maps)[1][0] == want).all()  # the border rule alone gets this one wrong
    for changed in (-maps, maps[:, [2, 0, 5, 1, 4, 3]]):  # signs flipped, channels permuted: other PCA signs
        other, other_fg = pca_rgb(changed, reference=ref)
        assert (other_fg == fg).all() and np.allclose(other, rgb, atol=1e-5)


def test_transparent_drawings_are_composited_on_white(tmp_path):
    """visualize flattened transparent PNGs onto black; the demo trained on drawings on white."""
    from PIL import Image

    from ssl_container.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from ssl_container.downstream.visualize import load_images

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (200, 30, 30, 255)  # an opaque red square on a fully transparent (black) ground
    Image.fromarray(rgba, "RGBA").save(tmp_path / "drawing.png")
    images, _ = load_images([tmp_path / "drawing.png"], size=64)
    corner = images[0, :, 2, 2] * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)
    centre = images[0, :, 32, 32] * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)
    assert torch.allclose(corner, torch.ones(3), atol=0.02)  # white, not black
    assert torch.allclose(centre, torch.tensor([200, 30, 30]) / 255, atol=0.02)


def test_the_retrieval_grid_shows_the_k_nn_search(tmp_path):
    from ssl_container.downstream.visualize import nearest, retrieval_grid

    g = torch.Generator().manual_seed(0)
    ref_feats, q_feats = torch.randn(30, 8, generator=g), torch.randn(4, 8, generator=g)
    idx = nearest(q_feats.numpy(), ref_feats.numpy(), k=3)
    sims = torch.nn.functional.normalize(q_feats, dim=1) @ torch.nn.functional.normalize(ref_feats, dim=1).T
    assert (idx == sims.topk(3, dim=1).indices.numpy()).all()
    ref_labels, q_labels = np.arange(30) % 3, np.arange(4) % 3
    out = retrieval_grid(torch.randn(4, 3, 32, 32), q_labels, torch.randn(30, 3, 32, 32), ref_labels,
                         {"a": idx, "b": idx[:, ::-1].copy()}, tmp_path / "r.png", title="t", class_names=["x", "y", "z"])
    from PIL import Image

    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]


def test_pad_shows_the_whole_drawing(tmp_path):
    from PIL import Image

    from ssl_container.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from ssl_container.downstream.visualize import load_images

    wide = np.full((40, 120, 3), 255, np.uint8)
    wide[:, :10] = (0, 0, 200)  # a blue edge at the far left, which a centre crop cuts away
    Image.fromarray(wide).save(tmp_path / "wide.png")
    rgb = lambda t: t * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)  # noqa: E731
    cropped = rgb(load_images([tmp_path / "wide.png"], size=64)[0][0])
    padded = rgb(load_images([tmp_path / "wide.png"], size=64, fit="pad")[0][0])
    assert cropped[2].min() > 0.9  # no blue left after the crop
    assert padded[2, 32, 1] > 0.6 and padded[0, 32, 1] < 0.2  # the edge is there
    assert torch.allclose(padded[:, 2, 32], torch.ones(3), atol=0.02)  # white above the letterboxed drawing
