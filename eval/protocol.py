"""One k-NN protocol for every learning figure: the trained teacher, random init and raw pixels.

A pretraining result only means something next to its floors, measured the same way: the same
held-out images, the same resize + centre crop, the same reference set and DINO's weighted vote
(k = 20, T = 0.07, cosine similarity). This module holds that protocol once; the demo and
``benchmarks/learning.py`` both call it, so their rows are comparable.

    python -m eval.protocol WEIGHTS --data ../shared/data/imagenette --resolution 64 [--seed 0]

prints the rows for any weights (an export, a run folder): the backbone, the same architecture at
random initialisation and raw pixels, on every image of both splits, as JSON.

The held-out and reference images are decoded once into memory (``EvalSplit``): a learning curve
evaluates the same images many times, and decoding dominates the cost for small backbones.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from eval.features import DataSource, make_loader, resolve_data
from eval.knn import knn_classify
from ssl_container.signals import stoppable
from ssl_container.data.augment import EvalTransformConfig
from ssl_container.utils.features import forward_features

__all__ = ["RawPixels", "EvalSplit", "load_split", "embed", "knn_eval", "floors", "KNN_K"]

KNN_K = 20


class RawPixels(nn.Module):
    """The raw-pixel floor: the normalised eval crop, flattened (3 * crop * crop features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@dataclass
class EvalSplit:
    """A labelled split, decoded and transformed once: ``images`` (N, 3, S, S) float32, ``labels`` (N,)."""

    name: str
    images: torch.Tensor
    labels: np.ndarray
    resolution: int

    def __len__(self) -> int:
        return len(self.labels)


def load_split(data: str | DataSource, split: str | None, resolution: int, max_shards: int | None = None,
               num_workers: int = 1) -> EvalSplit:
    """Every image of ``split`` (or of its first ``max_shards`` shards), resized (short side) and
    centre-cropped to ``resolution`` with the evaluation transform."""
    src = data if isinstance(data, DataSource) else resolve_data(str(data), split)
    if max_shards is not None and src.urls is not None:
        src = DataSource(src.name, urls=src.urls[:max_shards], classes=src.classes)
    transform = EvalTransformConfig(resize=resolution, crop=resolution)
    images, labels = [], []
    for x, y, _ in make_loader(src, transform, batch_size=256, num_workers=num_workers):
        images.append(x)
        labels.append(y)
    if not images:
        raise ValueError(f"{src.name}: the split holds no images")
    return EvalSplit(src.name, torch.cat(images), torch.cat(labels).numpy(), resolution)


@torch.no_grad()
def embed(model: nn.Module, split: EvalSplit, batch_size: int = 256) -> np.ndarray:
    """(N, D) float32 features of ``model`` in eval mode (its pooled output)."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        out = [forward_features(model, split.images[i:i + batch_size].to(device))["pooled"].cpu()
               for i in range(0, len(split), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def knn_eval(model: nn.Module, reference: EvalSplit, held_out: EvalSplit, k: int = KNN_K) -> dict[str, float]:
    """k-NN top-1 / top-5 (%) of ``model`` on every ``held_out`` image against every ``reference`` image."""
    if reference.resolution != held_out.resolution:
        raise ValueError("reference and held-out splits must share the evaluation resolution")
    result = knn_classify(embed(model, reference), reference.labels, embed(model, held_out), held_out.labels, ks=(k,))
    top1, top5 = result.top1[k], result.top5[k]
    if not (math.isfinite(top1) and math.isfinite(top5)):
        raise ValueError("k-NN returned a non-finite accuracy: the features hold NaN")
    return {"top1": float(top1), "top5": float(top5), "num_reference": len(reference), "num_held_out": len(held_out)}


def floors(reference: EvalSplit, held_out: EvalSplit, random_models: Sequence[nn.Module] = ()) -> dict[str, dict]:
    """The raw-pixel floor and, for each model given, its random-init floor."""
    out = {"raw_pixels": knn_eval(RawPixels(), reference, held_out)}
    for i, m in enumerate(random_models):
        out["random_init" if i == 0 else f"random_init_{i}"] = knn_eval(m, reference, held_out)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.protocol", description="k-NN of a backbone next to its floors")
    p.add_argument("weights", help="an export folder, a run folder or a step folder")
    p.add_argument("--data", required=True, help="dataset folder with dataset.json")
    p.add_argument("--reference-split", default="train")
    p.add_argument("--held-out-split", default=None, help="default: the set's held-out split (val, else test)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init floor")
    return p


@stoppable("python -m eval.protocol")
def main(argv: Sequence[str] | None = None) -> int:
    from ssl_container.export import load_backbone, read_checkpoint
    from ssl_container.models import create_model

    from eval.features import held_out_split

    args = build_parser().parse_args(argv)
    try:
        args.held_out_split = args.held_out_split or held_out_split(args.data)
        for split in (args.reference_split, args.held_out_split):
            resolve_data(args.data, split)  # a missing set or split is refused before any work
    except (FileNotFoundError, ValueError) as err:
        print(f"python -m eval.protocol: {err}", file=sys.stderr)
        return 2
    ckpt = read_checkpoint(args.weights)
    model = load_backbone(args.weights)
    torch.manual_seed(args.seed)
    random_init = create_model(ckpt.model_name, num_classes=0, **ckpt.model_kwargs)
    ref = load_split(args.data, args.reference_split, args.resolution)
    held = load_split(args.data, args.held_out_split, args.resolution)
    rows = {**floors(ref, held, [random_init]), "backbone": knn_eval(model, ref, held)}
    print(json.dumps({"weights": args.weights, "resolution": args.resolution, **rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
