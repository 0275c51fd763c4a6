"""DINO's weighted k-NN vote, and the k-NN monitor the trainer runs on a labelled split (its
features come from ``ssl_container.utils.features.extract_features``, as eval's do).

``weighted_vote`` is the one implementation of the vote: ``eval.knn`` (faiss search, sharded stores,
every k) and the trainer's online monitor (brute force on a labelled subset) both call it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_container.data.augment import EvalTransformConfig
from ssl_container.data.stream import make_eval_loader
from ssl_container.utils.features import extract_features

__all__ = ["DEFAULT_TEMPERATURE", "OnlineKNN", "knn_accuracy", "weighted_vote"]

DEFAULT_TEMPERATURE = 0.07


def weighted_vote(sims: np.ndarray | torch.Tensor, neighbor_labels: np.ndarray | torch.Tensor, k: int,
                  num_classes: int, temperature: float = DEFAULT_TEMPERATURE, topn: int = 5) -> torch.Tensor:
    """DINO's vote over the first ``k`` neighbours: class scores sum exp(sim / T); returns the
    ``min(topn, num_classes)`` best classes per query (ties go to the lower class index).
    Neighbours with label < 0 (missing) do not vote."""
    s = torch.as_tensor(sims)[:, :k].to(torch.float32)
    lab = torch.as_tensor(neighbor_labels)[:, :k].to(torch.int64)
    w = torch.exp(s / temperature)
    valid = lab >= 0
    w = torch.where(valid, w, torch.zeros_like(w))
    scores = torch.zeros(s.shape[0], num_classes, dtype=torch.float32)
    scores.scatter_add_(1, lab.clamp(min=0), w)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, : min(topn, num_classes)]


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, k: int = 20,
                 temperature: float = DEFAULT_TEMPERATURE, chunk: int = 1024) -> tuple[float, float]:
    """Top-1 / top-5 (fractions) of the weighted vote, brute-force cosine search in chunks: enough for
    a monitor on a labelled subset (the full, faiss-backed evaluation is ``python -m eval.knn``)."""
    train_x = torch.nn.functional.normalize(train_x.float(), dim=1)
    val_x = torch.nn.functional.normalize(val_x.float(), dim=1)
    classes = int(max(train_y.max(), val_y.max())) + 1
    correct1 = correct5 = 0
    for start in range(0, len(val_x), chunk):
        sims, idx = (val_x[start:start + chunk] @ train_x.T).topk(min(k, len(train_x)), dim=1)
        top = weighted_vote(sims, train_y[idx], k, classes, temperature)
        truth = val_y[start:start + chunk, None]
        correct1 += int((top[:, :1] == truth).sum())
        correct5 += int((top == truth).any(dim=1).sum())
    return correct1 / len(val_x), correct5 / len(val_x)


def _first(loader, limit: int):
    """The batches of ``loader`` until ``limit`` samples have been yielded (this rank's subset)."""
    seen = 0
    for images, labels, keys in loader:
        yield images, labels, keys
        seen += len(labels)
        if seen >= limit:
            return


class OnlineKNN:
    """k-NN top-1 of the teacher backbone on a labelled split, every ``monitor.every_epochs``; each
    rank embeds its share of the images once, the features are gathered, every rank votes."""

    def __init__(self, monitor: Any, rank: int, world_size: int, device: torch.device) -> None:
        if not monitor.train_urls or not monitor.val_urls:
            raise ValueError("monitor.every_epochs > 0 needs monitor.train_urls and monitor.val_urls")
        self.m, self.rank, self.world_size, self.device = monitor, rank, world_size, device

    @torch.no_grad()
    def run(self, backbone: nn.Module) -> dict[str, float]:
        m = self.m
        transform = EvalTransformConfig(resize=m.resize, crop=m.crop)
        was_training = backbone.training
        backbone.eval()
        try:
            feats = {}
            for split, urls in (("train", m.train_urls), ("val", m.val_urls)):
                loader = make_eval_loader(urls if len(urls) > 1 else urls[0], batch_size=64, rank=self.rank,
                                          world_size=self.world_size, num_workers=2, transform=transform)
                if split == "train" and m.max_train_samples:
                    loader = _first(loader, m.max_train_samples)
                # fp32 (amp none): the monitor's curve must not move with the device's autocast
                fs = extract_features(backbone, loader, self.device, amp="none", gather="all")
                feats[split] = (torch.from_numpy(np.asarray(fs.features)), torch.from_numpy(fs.labels))
            top1, top5 = knn_accuracy(*feats["train"], *feats["val"], k=m.k)
            return {f"top1_k{m.k}": top1, f"top5_k{m.k}": top5}
        finally:
            backbone.train(was_training)
