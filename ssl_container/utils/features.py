"""Backbone features, extracted exactly once: the one forward and the one data-parallel extraction
(of any ``nn.Module``; nothing here knows the models) that the trainer's k-NN monitor, ``eval.knn``,
``eval.linear`` and ``eval.protocol`` all use.

* Feature kinds: ``pooled`` (the final pooled feature: what the backbone's ``forward`` returns with no
  classifier; DINO's k-NN and linear feature) and ``concat`` (global-average-pooled outputs of the
  last four stages before the final one, then the pooled feature: 64+128+320+512 = 1024 for
  Container-Light; its last 512 columns are the ``pooled`` feature).
* Gathering: every rank extracts its part; the parts are gathered and sorted by sample key, so the
  result is the same for any number of ranks and workers; duplicate keys are an error.
* Autocast (bf16) on GPU; float32 on CPU unless asked.

Caching on disk, data sources and the command lines are eval's (``eval/features.py``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ssl_container.utils.progress import Progress
from ssl_container.utils.runtime import retain_freed_memory

__all__ = ["FEATURE_KINDS", "FeatureSet", "amp_autocast", "dist_info", "extract_features", "forward_dim",
           "forward_features"]

FEATURE_KINDS = ("pooled", "concat")


def _gap(t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    if t.ndim == 4:  # NCHW
        return t.mean(dim=(2, 3))
    if t.ndim == 3:  # NLC tokens
        return t.mean(dim=1)
    return t


def forward_features(model: nn.Module, images: torch.Tensor, kinds: Sequence[str] = ("pooled",)) -> dict[str, torch.Tensor]:
    """``{kind: (B, D) float32}`` for the kinds asked, from one forward pass."""
    unknown = set(kinds) - set(FEATURE_KINDS)
    if unknown:
        raise ValueError(f"unknown feature kind(s) {sorted(unknown)}; choose from {FEATURE_KINDS}")
    out: dict[str, torch.Tensor] = {}
    if "concat" in kinds:
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{type(model).__name__} has no forward_intermediates(): only 'pooled' features")
        final, inter = model.forward_intermediates(images, indices=4)
        pooled = model.forward_head(final, pre_logits=True)
        out["concat"] = torch.cat([_gap(t) for t in inter[:-1]] + [pooled.float()], dim=1)
    elif hasattr(model, "forward_head") and hasattr(model, "forward_features"):
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
    else:
        pooled = model(images)
    if "pooled" in kinds:
        out["pooled"] = pooled.float()
    return out


@dataclass
class FeatureSet:
    """Features of one split: (N, D) float32 (possibly memory-mapped), int64 labels, sample keys."""

    features: np.ndarray
    labels: np.ndarray
    keys: list[str]
    meta: dict = field(default_factory=dict)
    store: Any = None  # eval.store.ShardedFeatureStore when the features live in on-disk shards

    def __len__(self) -> int:
        return len(self.labels)


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def amp_autocast(device: torch.device, amp: str):
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "none":
        return torch.autocast(device.type, enabled=False), "none"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype), amp


@torch.inference_mode()
def extract_features(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
                     kinds: str | Sequence[str] = "pooled", amp: str = "auto", gather: str = "all",
                     progress: bool = False, total: int | None = None) -> FeatureSet | dict[str, FeatureSet] | None:
    """Features of every batch ``(images, labels, keys)`` of ``loader`` (this rank's part).

    With a process group, the parts of all ranks are gathered (``gather="all"``: on every rank;
    ``"main"``: on rank 0, other ranks get None; ``"none"``: this rank's part only) and sorted by key.
    ``kinds``: one kind (returns a FeatureSet) or several (returns ``{kind: FeatureSet}``).
    """
    single = isinstance(kinds, str)
    kinds = (kinds,) if single else tuple(kinds)
    device = torch.device(device)
    if device.type == "cpu":
        retain_freed_memory()  # every batch reuses the last one's memory instead of faulting it in anew
    model.eval().to(device)
    ctx, amp_used = amp_autocast(device, amp)
    rank, world = dist_info()
    feats: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    labels: list[np.ndarray] = []
    keys: list[str] = []
    bar = Progress(total, "features", "img", enabled=progress and rank == 0)
    t0 = time.perf_counter()
    for images, lab, kk in loader:
        if not len(kk):  # every image of the batch was unreadable (skipped by the loader)
            continue
        images = images.to(device, non_blocking=True)
        with ctx:
            out = forward_features(model, images, kinds)
        for k in kinds:
            feats[k].append(out[k].float().cpu().numpy())
        labels.append(torch.as_tensor(lab).cpu().numpy().astype(np.int64))
        keys.extend(kk)
        bar.update(len(kk) * world)
    bar.close()
    dims = {k: int(forward_dim(feats[k])) for k in kinds}
    part = {"feats": {k: (np.concatenate(v) if v else np.zeros((0, dims[k]), np.float32)) for k, v in feats.items()},
            "labels": np.concatenate(labels) if labels else np.zeros(0, np.int64), "keys": keys}
    seconds = time.perf_counter() - t0
    if world > 1 and gather != "none":
        if gather == "all":
            parts: list = [None] * world
            dist.all_gather_object(parts, part)
        else:
            parts = [None] * world if rank == 0 else None
            dist.gather_object(part, parts, dst=0)
            if rank != 0:
                return None
    else:
        parts = [part]
    all_keys = [k for p in parts for k in p["keys"]]
    order = np.argsort(np.asarray(all_keys, dtype=object), kind="stable") if all_keys else np.zeros(0, np.int64)
    sorted_keys = [all_keys[i] for i in order]
    dup = [a for a, b in zip(sorted_keys, sorted_keys[1:]) if a == b]
    if dup:
        raise RuntimeError(f"{len(dup)} sample keys were extracted more than once across ranks/workers "
                           f"(e.g. {dup[:3]}): the loader does not split the data exactly once")
    lab_all = np.concatenate([p["labels"] for p in parts])[order]
    result = {}
    for k in kinds:
        f = np.concatenate([p["feats"][k] for p in parts])[order]
        result[k] = FeatureSet(np.ascontiguousarray(f, dtype=np.float32), lab_all, sorted_keys,
                               {"kind": k, "dim": int(f.shape[1]) if f.ndim == 2 else 0, "num_samples": len(sorted_keys),
                                "amp": amp_used, "world_size": world, "seconds": round(seconds, 2)})
    return result[kinds[0]] if single else result


def forward_dim(chunks: list[np.ndarray]) -> int:
    return chunks[0].shape[1] if chunks else 0
