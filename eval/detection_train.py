"""The fine-tuning half of ``eval.detection``: the detector, its parameter groups and learning-rate schedule,
the training loop, and the BatchNorm recalibration of ``--bn-recalibration``. ``eval.detection`` re-exports
every name here."""
from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
from torch import nn

from ssl_container.data.workers import DataLoader
from ssl_container.utils.progress import hms

__all__ = ["ARCHS", "build_detector", "collate", "is_backbone_param", "lr_factor", "param_groups", "recalibrated_body", "train"]

ARCHS = ("fasterrcnn", "fasterrcnn_c4", "retinanet")


def collate(batch: list) -> tuple:
    return tuple(zip(*batch))


def build_detector(
    arch: str,
    num_classes: int,
    weights: str | os.PathLike | None = None,
    *,
    which: str | None = None,
    min_size: int | tuple[int, ...] = 320,
    max_size: int = 533,
    freeze_at: int = 0,
    norm: str = "frozen_bn",
    drop_path_rate: float = 0.0,
    **detector_kwargs: Any,
) -> nn.Module:
    """A detector with a Container-Light FPN backbone; ``detector_kwargs`` go to torchvision's
    ``FasterRCNN`` / ``RetinaNet`` (e.g. ``box_batch_size_per_image``, ``rpn_post_nms_top_n_train``)."""
    from ssl_container.downstream.detection_backbone import (
        fasterrcnn_container_light_c4, fasterrcnn_container_light_fpn, retinanet_container_light_fpn,
    )

    builders = {"fasterrcnn": fasterrcnn_container_light_fpn, "fasterrcnn_c4": fasterrcnn_container_light_c4,
                "retinanet": retinanet_container_light_fpn}
    if arch not in builders:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return builders[arch](
        num_classes, weights, which=which, min_size=min_size, max_size=max_size,
        freeze_at=freeze_at, norm=norm, drop_path_rate=drop_path_rate, **detector_kwargs,
    )


def is_backbone_param(name: str) -> bool:
    """The pretrained network's parameters: the backbone and, in the C4 detector, its last stage serving as the
    box head."""
    return name.startswith("backbone.body.") or name.startswith("roi_heads.box_head.stage.") \
        or name.startswith("roi_heads.box_head.norm.")


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 backbone_lr_mult: float = 1.0, split_backbone: bool = False) -> list[dict[str, Any]]:
    """Weight decay on weight matrices / kernels only: not on norms, biases or scalar gates. With
    ``backbone_lr_mult`` != 1 (or ``split_backbone``) the backbone's parameters (:func:`is_backbone_param`) are
    groups of their own, marked ``backbone: True``, with ``lr`` times ``backbone_lr_mult``."""
    split = split_backbone or backbone_lr_mult != 1.0
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith("mix_logit")
        groups.setdefault((no_decay, split and is_backbone_param(name)), []).append(p)
    out = []
    for (no_decay, backbone), params in sorted(groups.items()):
        group: dict[str, Any] = dict(params=params, weight_decay=0.0 if no_decay else weight_decay)
        if backbone:
            if lr is None:
                raise ValueError("param_groups: pass lr when the backbone gets a group of its own "
                                 "(backbone_lr_mult != 1 or split_backbone)")
            group.update(lr=lr * backbone_lr_mult, backbone=True)
        out.append(group)
    return out


def lr_factor(it: int, total: int, warmup: int, frozen: int = 0) -> float:
    """Linear warm-up from 0.001, then x0.1 at 8/12 and x0.01 at 11/12 of ``total`` iterations.

    ``frozen`` > 0 is the pretrained layers' factor under ``--backbone-frozen-iters``: zero for the first
    ``frozen`` iterations (only the new heads learn), then the same schedule with a warm-up of its own, so the
    layers start moving under gradients from heads that already score boxes rather than from random ones."""
    if it < frozen:
        return 0.0
    f = 0.1 ** sum(it >= math.floor(total * m / 12) for m in (8, 11)) if total >= 12 else 1.0
    since = it - frozen
    if since < warmup:
        f *= 0.001 + (1 - 0.001) * since / warmup
    return f


def train(
    model: nn.Module,
    dataset: Any,
    *,
    epochs: int = 1,
    batch_size: int = 2,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    warmup_iters: int = 50,
    clip_grad: float | None = None,
    backbone_lr_mult: float = 1.0,
    backbone_frozen_iters: int = 0,
    max_iters: int | None = None,
    seed: int = 0,
    log_every: int = 20,
    log=print,
) -> dict[str, Any]:
    """Fine-tune ``model`` on ``dataset``; returns per-epoch mean losses and timings."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator, drop_last=False
    )
    total = epochs * len(loader) if max_iters is None else min(max_iters, epochs * len(loader))
    warmup = min(warmup_iters, max(total // 5, 1))
    if backbone_frozen_iters >= total:
        raise ValueError(f"--backbone-frozen-iters {backbone_frozen_iters} leaves nothing of the {total} iterations "
                         "to fine-tune the backbone in: lower it, or use --freeze-at to freeze the backbone throughout")
    groups = param_groups(model, weight_decay, lr, backbone_lr_mult, split_backbone=backbone_frozen_iters > 0)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [
        (lambda it, f=backbone_frozen_iters if g.get("backbone") else 0: lr_factor(it, total, warmup, f))
        for g in groups])
    # Frozen for real while the heads learn alone: no gradients (so none in clipping, nor in AdamW's moments
    # and step count, which start when the layers join) and no backward through them.
    held = [p for g in groups if g.get("backbone") for p in g["params"]] if backbone_frozen_iters else []
    for p in held:
        p.requires_grad_(False)
    model.train()
    history, it, start = [], 0, time.perf_counter()
    for epoch in range(epochs):
        sums: dict[str, float] = {}
        n = 0
        t0 = time.perf_counter()
        for images, targets in loader:
            if it >= total:
                break
            if held and it == backbone_frozen_iters:
                for p in held:
                    p.requires_grad_(True)
            losses = model(list(images), list(targets))
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at iteration {it}: { {k: v.item() for k, v in losses.items()} }")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            scheduler.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            n += 1
            it += 1
            if log_every and it % log_every == 0:
                per_it = (time.perf_counter() - start) / it
                log(f"  it {it}/{total}  loss {loss.item():.3f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                    f"{per_it:.2f} s/it  elapsed {hms(per_it * it)}  eta {hms(per_it * (total - it))}")
        if n:
            history.append({"epoch": epoch + 1, "iters": n, "seconds": round(time.perf_counter() - t0, 1),
                            **{k: round(v / n, 4) for k, v in sums.items()}})
            log(f"  epoch {epoch + 1}: " + ", ".join(f"{k} {v / n:.3f}" for k, v in sums.items()))
    return {"iters": it, "seconds": round(time.perf_counter() - start, 1), "epochs": history}


def recalibrated_body(body: Any, which: str | None, dataset: Any, n_images: int, min_size: int,
                      max_size: int, batch_size: int, log=print) -> nn.Module:
    """``--bn-recalibration N``: the backbone (weights path or module) with its BatchNorm statistics
    re-estimated on the first ``N`` training images, resized, normalised and padded as the detector does it
    (:func:`ssl_container.downstream.detection_backbone.recalibrate_batchnorm`), before they are frozen.
    ``dataset``: an ``eval.detection.CocoDetection`` (its ``ids`` and ``load_image``); the images are read
    without the training flips, so the fine-tuning's random stream is untouched."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from ssl_container.downstream.detection_backbone import recalibrate_batchnorm
    from ssl_container.export import load_backbone

    if not isinstance(body, nn.Module):
        body = load_backbone(body, which, num_classes=0)
    # Eval mode: in training mode the transform draws its resize from torch's generator, which would shift the
    # heads' initialisation that follows.
    prepare = GeneralizedRCNNTransform(min_size, max_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
                                       size_divisible=32).eval()
    ids = dataset.ids[:n_images]
    batches = (prepare([dataset.load_image(i) for i in ids[k: k + batch_size]])[0].tensors
               for k in range(0, len(ids), batch_size))
    t0 = time.perf_counter()
    layers = recalibrate_batchnorm(body, batches)
    log(f"  BatchNorm statistics of {layers} layers re-estimated on {len(ids)} training images at {min_size} px "
        f"({time.perf_counter() - t0:.1f} s)")
    return body
