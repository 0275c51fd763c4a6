"""Pictures of what a backbone learned: PCA of its feature maps as colour, and its attention.

Two views that DINO made the standard way to look at self-supervised features:

* **PCA of patch features** (DINOv2's figures). The first principal component of all patches of all
  images given separates foreground from background; the background side is thresholded away and
  the first three components of a second PCA, fitted on the foreground patches only, become RGB.
  Patches that share a colour have similar features, across images too, because one PCA is fitted
  jointly on every image of the grid.
* **Attention of the last stage** (DINO's figures). Container-Light attends only in stage 4; there
  is no class token, so the query is the *pooled* query (the mean of the queries over positions, as
  the global average pool is the image's representation) and each head's row
  ``softmax(q̄ K^T / sqrt(d))`` is drawn over the image. For a timm ViT the class token's query is
  used, as in DINO.

The models are plain modules: both views read them through a forward hook, nothing is patched.

    ssl-container visualize runs/demo/export --images photo.jpg folder/ --out pictures/
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_container.data.augment import IMAGENET_MEAN, IMAGENET_STD, EvalTransformConfig, eval_transform
from ssl_container.models.affinity import ContextAggregation, MixedAffinity

__all__ = ["Pictures", "pca_basis", "pca_rgb", "feature_maps", "attention_maps", "describe", "draw",
           "load_images", "nearest", "retrieval_grid", "visualize"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Pictures:
    """What one call computed, all as float32 arrays: ``images`` (B, H, W, 3) in [0, 1]; per stage
    name a PCA picture (B, h, w, 3) in [0, 1] (background black) and its foreground mask (B, h, w);
    ``attention`` (B, heads, H, W), each head's map over the image (rows summed to one before
    upsampling), or None when the model has no attention."""

    images: np.ndarray
    pca: dict[str, np.ndarray]
    foreground: dict[str, np.ndarray]
    attention: np.ndarray | None

    def select(self, rows: Sequence[int] | slice) -> "Pictures":
        """The same pictures for some of the images only (the PCA stays the joint one)."""
        return Pictures(self.images[rows], {k: v[rows] for k, v in self.pca.items()},
                        {k: v[rows] for k, v in self.foreground.items()},
                        None if self.attention is None else self.attention[rows])


# ------------------------------------------------------------------------------------------------
# PCA


def pca_basis(x: torch.Tensor, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), components (n, D)) of the rows of ``x`` (N, D): orthonormal rows, by decreasing
    variance, each signed so that its largest-magnitude coefficient is positive (a fixed choice:
    SVD's sign is arbitrary). Components beyond the rank of ``x`` are zero."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 rows of features, got shape {tuple(x.shape)}")
    x = x.double()
    mean = x.mean(0)
    _, sv, vh = torch.linalg.svd(x - mean, full_matrices=False)
    comps = vh[:n] * (sv[:n] > sv.max() * 1e-6).unsqueeze(1)  # directions of no variance are not components
    if comps.shape[0] < n:  # fewer rows or dimensions than components: the rest are zero
        comps = torch.cat([comps, comps.new_zeros(n - comps.shape[0], comps.shape[1])])
    idx = comps.abs().argmax(1)
    sign = torch.sign(comps[torch.arange(comps.shape[0]), idx])
    comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(1)
    return mean.float(), comps.float()


def _border(h: int, w: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    return m


def pca_rgb(maps: torch.Tensor, threshold: float = 0.5,
            reference: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(B, C, h, w) feature maps -> (RGB (B, h, w, 3) in [0, 1], foreground mask (B, h, w)).

    The first component, min-max scaled to [0, 1], is thresholded at ``threshold``. Which side is the
    foreground: with a ``reference`` (B, h, w) saliency (how much each patch of the image differs from
    its border, :func:`saliency`), the side where it is higher, so that every network's picture marks
    the same object; without one, the side holding fewer of the image borders. A second PCA on the
    foreground patches gives the colours; with a reference its components are ordered and signed to
    follow (red) the saliency, (green) top to bottom and (blue) left to right, so that two networks'
    pictures use their colours the same way. With fewer than 4 foreground patches, or maps of 2 x 2
    and less (no interior), every patch counts as foreground."""
    b, c, h, w = maps.shape
    flat = maps.permute(0, 2, 3, 1).reshape(-1, c).float()
    mean, comps = pca_basis(flat, 1)
    first = (flat - mean) @ comps[0]
    first = (first - first.min()) / (first.max() - first.min()).clamp_min(1e-12)
    high = (first > threshold).view(b, h, w)
    if min(h, w) <= 2:
        fg = torch.ones(b, h, w, dtype=torch.bool)
    elif reference is not None:
        ref = reference.float()
        inside, outside = ref[high], ref[~high]
        fg = high if inside.numel() and (not outside.numel() or inside.mean() >= outside.mean()) else ~high
    else:
        border = _border(h, w).expand(b, h, w)
        fg = ~high if high[border].float().mean() > 0.5 else high
    if fg.sum() < 4:
        fg = torch.ones(b, h, w, dtype=torch.bool)
    mask = fg.reshape(-1)
    mean, comps = pca_basis(flat[mask], 3)
    proj = (flat - mean) @ comps.T
    if reference is not None:
        proj = _aligned(proj, mask, reference.float(), b, h, w)
    lo, hi = proj[mask].min(0).values, proj[mask].max(0).values
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    rgb[~mask] = 0.0
    return rgb.view(b, h, w, 3).numpy(), fg.numpy()


def _aligned(proj: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """The 3 components reordered and signed to correlate best with (saliency, row, column) on the
    foreground patches: PCA's order and signs are arbitrary, this makes them comparable across networks."""
    rows = torch.linspace(0, 1, h).view(1, h, 1).expand(b, h, w)
    cols = torch.linspace(0, 1, w).view(1, 1, w).expand(b, h, w)
    targets = torch.stack([reference, rows, cols], -1).reshape(-1, 3)[mask]
    x = proj[mask]
    x, t = x - x.mean(0), targets - targets.mean(0)
    corr = (x.T @ t) / (x.norm(dim=0).unsqueeze(1) * t.norm(dim=0).unsqueeze(0)).clamp_min(1e-12)  # (comp, target)
    order, signs, free = [], [], list(range(3))
    for target in range(3):  # greedy: each target takes the free component that follows it most closely
        best = max(free, key=lambda k: abs(float(corr[k, target])))
        free.remove(best)
        order.append(best)
        signs.append(1.0 if float(corr[best, target]) >= 0 else -1.0)
    return proj[:, order] * torch.tensor(signs)


def saliency(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, W) images -> (B, h, w): how far each patch's colour is from the median colour of the
    image's border (an object usually differs from what frames it), average-pooled to ``size``."""
    b = images.shape[0]
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], -1)
    background = border.median(-1).values.view(b, 3, 1, 1)
    distance = (images - background).abs().mean(1, keepdim=True)
    return F.adaptive_avg_pool2d(distance, size)[:, 0]


# ------------------------------------------------------------------------------------------------
# features and attention


def feature_maps(model: nn.Module, images: torch.Tensor, stages: Sequence[int] = (-2, -1)) -> list[torch.Tensor]:
    """NCHW maps of the given stages (timm's ``forward_intermediates``; ViT tokens come back as maps too)."""
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(f"{type(model).__name__} has no forward_intermediates(): no feature maps to draw")
    with torch.no_grad():
        out = model.forward_intermediates(images, indices=list(stages), intermediates_only=True)
    return [t.float() for t in out]


def _last_dynamic_aggregation(model: nn.Module) -> ContextAggregation | None:
    found = None
    for m in model.modules():
        if isinstance(m, ContextAggregation) and m.affinity.dynamic:
            found = m
    return found


def _last_vit_attention(model: nn.Module) -> nn.Module | None:
    found = None
    for m in model.modules():
        if hasattr(m, "qkv") and hasattr(m, "num_heads") and isinstance(getattr(m, "qkv"), nn.Linear):
            found = m
    return found


def attention_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor | None:
    """(B, heads, h, w) attention of the last attending block, each (b, head) summing to one; None
    when the model does not attend (a pure conv network)."""
    agg = _last_dynamic_aggregation(model)
    vit = None if agg is not None else _last_vit_attention(model)
    target = agg or vit
    if target is None:
        return None
    seen: list[torch.Tensor] = []
    handle = target.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    x = seen[-1]
    with torch.no_grad():
        if agg is not None:
            _, q, k = agg.project(x)
            attn = agg.affinity.dynamic_affinity if isinstance(agg.affinity, MixedAffinity) else agg.affinity
            b, c, h, w = q.shape
            m = attn.num_heads
            qh = q.reshape(b, m, c // m, h * w).mean(-1, keepdim=True)  # (B, M, d, 1): the pooled query
            kh = k.reshape(b, m, c // m, h * w)
            logits = (qh * kh).sum(2) / math.sqrt(c // m)  # (B, M, N)
            return torch.softmax(logits, dim=-1).view(b, m, h, w)
        b, n, c = x.shape
        m = vit.num_heads
        qkv = vit.qkv(x).reshape(b, n, 3, m, c // m).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        if hasattr(vit, "q_norm"):
            q, k = vit.q_norm(q), vit.k_norm(k)
        prefix = getattr(model, "num_prefix_tokens", 1)
        logits = (q[:, :, :1] @ k[:, :, prefix:].transpose(-1, -2)).squeeze(2) / math.sqrt(c // m)
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        side = int(round(math.sqrt(n - prefix)))
        gh, gw = grid if grid is not None and grid[0] * grid[1] == n - prefix else (side, side)
        return torch.softmax(logits, dim=-1).view(b, m, gh, gw)


# ------------------------------------------------------------------------------------------------
# images in, pictures out


def _image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                kind = "a WebDataset shard" if p.suffix.lower() == ".tar" else f"a {p.suffix or 'suffix-less'} file"
                raise ValueError(f"{p}: {kind}, not an image: pass image files ({', '.join(IMAGE_SUFFIXES)}) or "
                                 "folders of them" + (" (e.g. extract a few: tar -xf SHARD --wildcards '*.jpg')"
                                                      if p.suffix.lower() == ".tar" else ""))
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image file or folder (pass image files or folders of images)")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {', '.join(map(str, paths))}")
    return files


def _padded(data: bytes, size: int) -> torch.Tensor:
    """The whole image, its long side resized to ``size``, centred on white: (3, size, size) normalised."""
    import io

    from PIL import Image

    from ssl_container.data.augment import load_rgb

    img = load_rgb(Image.open(io.BytesIO(data)))
    scale = size / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    t = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float().div_(255)
    return (t - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def load_images(paths: Iterable[str | os.PathLike], size: int = 224, limit: int | None = 8,
                fit: str = "crop") -> tuple[torch.Tensor, list[Path]]:
    """Image files (or folders of them) -> ((B, 3, size, size) normalised, the files): ``fit="crop"``, the
    evaluation transform (short side resized to ``size``, centre crop); ``"pad"``, the whole image on white
    (drawings and other pictures whose edges matter)."""
    if fit not in ("crop", "pad"):
        raise ValueError(f"fit must be 'crop' or 'pad', got {fit!r}")
    files = _image_files(paths)[:limit]
    cfg = EvalTransformConfig(resize=size, crop=size)
    tensors = []
    for f in files:
        try:
            tensors.append(eval_transform(f.read_bytes(), cfg) if fit == "crop" else _padded(f.read_bytes(), size))
        except Exception as err:  # PIL's errors name a BytesIO, not the file
            detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "it", str(err))[:160]
            raise ValueError(f"{f}: not a readable image ({detail})") from None
    return torch.stack(tensors), files


def describe(model: nn.Module, images: torch.Tensor, stages: Sequence[int] = (-2, -1),
             names: Sequence[str] | None = None, threshold: float = 0.5) -> Pictures:
    """PCA pictures of ``stages`` and the attention maps for normalised ``images`` (B, 3, H, W)."""
    was_training = model.training
    model.eval()
    try:
        maps = feature_maps(model, images, stages)
        attn = attention_maps(model, images)
    finally:
        model.train(was_training)
    if names is None:  # Container counts stages, a ViT blocks; other models their feature levels
        parts = getattr(model, "stages", None) if hasattr(model, "stages") else getattr(model, "blocks", None)
        kind = "stage" if hasattr(model, "stages") else "block"
        names = [f"{kind} {s % len(parts) + 1}" if parts is not None else f"level {s}" for s in stages]
    pca, fg = {}, {}
    for name, m in zip(names, maps):
        pca[name], fg[name] = pca_rgb(m, threshold, reference=saliency(images, tuple(m.shape[-2:])))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    shown = (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    if attn is not None:
        attn = F.interpolate(attn, size=images.shape[-2:], mode="nearest").numpy()
    return Pictures(shown, pca, fg, attn)


LEGEND = ("PCA: black = background, the patches on the side of the first principal component's midpoint where "
          "the image differs less from its border; colours = the first three components of the other patches, ordered and signed to follow "
          "(red) how much the patch differs from the image border, (green) top to bottom, (blue) left to right, "
          "so that every network's pictures read the same way. Attention heads: the last attending stage, the "
          "pooled query's weight on each position (bright = high).")


def draw(pictures: Sequence[Pictures], path: str | os.PathLike, titles: Sequence[str] = (), max_heads: int = 8,
         title: str | None = None, caption: str | None = None) -> Path:
    """One titled PNG: a row per image (and per model, side by side when several are given): the image,
    each PCA picture, then each head's attention over the image; below, the legend (:data:`LEGEND`) and
    ``caption``."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssl_container.utils.files import atomic_path

    n_img = pictures[0].images.shape[0]
    cols_per = [1 + len(p.pca) + (min(p.attention.shape[1], max_heads) if p.attention is not None else 0) for p in pictures]
    ncols = sum(cols_per)
    size = pictures[0].images.shape[1]
    grids = ", ".join(f"{name} {rgb.shape[1]}x{rgb.shape[2]}" for name, rgb in pictures[0].pca.items())
    legend = "\n".join(textwrap.wrap(f"{LEGEND} Input {size} px: {grids} positions." + (f" {caption}" if caption else ""),
                                     width=int(ncols * 1.6 * 14)))
    legend_in = 0.25 * (legend.count("\n") + 1) + 0.3
    fig, axes = plt.subplots(n_img, ncols, figsize=(1.6 * ncols, 1.6 * n_img + 0.9 + legend_in), squeeze=False)
    for i in range(n_img):
        col = 0
        for j, p in enumerate(pictures):
            label = titles[j] if j < len(titles) else ""
            panels = [("image" + (f"\n{label}" if label else ""), p.images[i], None)]
            panels += [(f"PCA {name}\n({rgb.shape[1]}x{rgb.shape[2]})", rgb[i], None) for name, rgb in p.pca.items()]
            if p.attention is not None:
                panels += [(f"attention\nhead {h + 1}", p.images[i], p.attention[i, h])
                           for h in range(min(p.attention.shape[1], max_heads))]
            for k, (panel_title, img, overlay) in enumerate(panels):
                ax = axes[i, col]
                ax.imshow(img, interpolation="nearest")
                if overlay is not None:
                    ax.imshow(overlay, cmap="inferno", alpha=0.6, interpolation="nearest")
                if i == 0:
                    ax.set_title(panel_title, fontsize=10, fontweight="bold" if k == 0 else "normal")
                ax.axis("off")
                col += 1
    if title:
        fig.suptitle(title, fontsize=14, fontweight="bold")
    fig.text(0.01, 0.01, legend, fontsize=10, va="bottom", ha="left")
    fig.tight_layout(rect=(0, legend_in / (1.6 * n_img + 0.9 + legend_in), 1, 0.97 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def visualize(model: nn.Module | Sequence[nn.Module], images: torch.Tensor, out: str | os.PathLike,
              titles: Sequence[str] = (), stages: Sequence[int] = (-2, -1), title: str | None = None,
              caption: str | None = None) -> Path:
    """Draw :func:`describe` of one model (or several side by side) for ``images`` into ``out`` (PNG)."""
    models = [model] if isinstance(model, nn.Module) else list(model)
    return draw([describe(m, images, stages) for m in models], out, titles, title=title, caption=caption)


def nearest(query_features: np.ndarray, reference_features: np.ndarray, k: int = 5) -> np.ndarray:
    """(Q, k) indices of each query's ``k`` most cosine-similar reference rows (the k-NN protocol's search)."""
    q = torch.nn.functional.normalize(torch.as_tensor(query_features, dtype=torch.float32), dim=1)
    r = torch.nn.functional.normalize(torch.as_tensor(reference_features, dtype=torch.float32), dim=1)
    return (q @ r.T).topk(k, dim=1).indices.numpy()


def retrieval_grid(queries: torch.Tensor, query_labels: np.ndarray, reference: torch.Tensor,
                   reference_labels: np.ndarray, neighbours: dict[str, np.ndarray], path: str | os.PathLike,
                   title: str, class_names: Sequence[str] | None = None) -> Path:
    """One PNG of what a k-NN accuracy measures: each held-out query (a row) beside its nearest reference
    images under each representation (a column group), framed green where the neighbour's class is the
    query's and red where it is not, with each group's share of green in its heading."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def rgb(t: torch.Tensor) -> np.ndarray:
        return (t.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()

    names = list(neighbours)
    k = next(iter(neighbours.values())).shape[1]
    n = len(queries)
    cols = 1 + len(names) * k
    fig, axes = plt.subplots(n, cols, figsize=(1.15 * cols + 0.6 * len(names), 1.2 * n + 1.0), squeeze=False)
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(rgb(queries[i]))
        label = class_names[query_labels[i]] if class_names else str(query_labels[i])
        ax.set_ylabel(label, fontsize=7)
        ax.set_xticks([]), ax.set_yticks([])
        for g, name in enumerate(names):
            for j, idx in enumerate(neighbours[name][i]):
                ax = axes[i, 1 + g * k + j]
                ax.imshow(rgb(reference[idx]))
                ax.set_xticks([]), ax.set_yticks([])
                same = reference_labels[idx] == query_labels[i]
                for spine in ax.spines.values():
                    spine.set_edgecolor("#1a9850" if same else "#d73027")
                    spine.set_linewidth(3)
    axes[0, 0].set_title("held-out\nquery", fontsize=8)
    for g, name in enumerate(names):
        hits = float(np.mean(reference_labels[neighbours[name]] == query_labels[:, None]))
        axes[0, 1 + g * k + k // 2].set_title(f"{name}\n{100 * hits:.0f} % same class", fontsize=8, fontweight="bold")
    fig.suptitle(title, fontsize=10, fontweight="bold")
    fig.text(0.5, 0.005, "green frame: the neighbour's class is the query's; red: another class", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 0.96))
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
