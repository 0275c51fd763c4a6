"""Features on disk: L2-normalised float32 rows and int64 labels in ``.npy`` shards (``ShardedFeatureStore``).

Written by ``eval.features`` (one pass over a split, exactly once per rank), read by ``eval.knn``
(one shard in memory at a time) and ``eval.linear``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ssl_container.utils.files import atomic_write_json

__all__ = ["ShardedFeatureStore", "l2_normalize"]


def l2_normalize(x: np.ndarray, eps: float = 1e-12, out: np.ndarray | None = None) -> np.ndarray:
    """Row-wise L2 normalisation in float32 (``out=x`` normalises in place)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))
    np.maximum(norms, eps, out=norms)
    return np.divide(x, norms[:, None], out=out if out is not None else None)


class ShardedFeatureStore:
    """L2-normalised float32 features (and int64 labels) in ``.npy`` shards under one directory.

    Layout: ``manifest.json`` (dim, shard list with row counts, relative file names) and per shard
    ``features-XXXXX.npy`` (rows x dim float32) + ``labels-XXXXX.npy``. Write with
    :meth:`create` + :meth:`add` + :meth:`close` (or as a context manager); read with :meth:`open`.
    :meth:`iter_shards` memory-maps one shard at a time and releases it before the next, so a search
    over the store holds at most one shard in memory. Stores written by several ranks combine with
    :meth:`combine` (a manifest that lists the parts' shards).
    """

    MANIFEST = "manifest.json"

    def __init__(self, path: str | os.PathLike, dim: int, shards: list[dict] | None = None,
                 shard_rows: int = 65536, normalize: bool = True, writable: bool = False,
                 meta: dict | None = None):
        self.path = Path(path)
        self.dim = int(dim)
        self.shards: list[dict] = list(shards or [])
        self.shard_rows = int(shard_rows)
        self.normalize = normalize
        self.meta = dict(meta or {})
        self._writable = writable
        self._buf_f: list[np.ndarray] = []
        self._buf_l: list[np.ndarray] = []
        self._buffered = 0

    # -- writing -----------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, dim: int, shard_rows: int = 65536, normalize: bool = True,
               meta: dict | None = None) -> "ShardedFeatureStore":
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        if (p / cls.MANIFEST).exists():
            raise FileExistsError(f"{p} already holds a feature store; remove it or choose another folder")
        return cls(p, dim, [], shard_rows, normalize, writable=True, meta=meta)

    def add(self, features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | Sequence[int]) -> None:
        if not self._writable:
            raise RuntimeError("this store was opened read-only")
        f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (n, {self.dim}), got {f.shape}")
        if lab.shape != (f.shape[0],):
            raise ValueError(f"expected {f.shape[0]} labels, got shape {lab.shape}")
        f = np.ascontiguousarray(f, dtype=np.float32)
        if self.normalize:
            f = l2_normalize(f)
        self._buf_f.append(f)
        self._buf_l.append(lab.astype(np.int64))
        self._buffered += f.shape[0]
        while self._buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        f = np.concatenate(self._buf_f) if len(self._buf_f) > 1 else self._buf_f[0]
        lab = np.concatenate(self._buf_l) if len(self._buf_l) > 1 else self._buf_l[0]
        i = len(self.shards)
        name_f, name_l = f"features-{i:05d}.npy", f"labels-{i:05d}.npy"
        np.save(self.path / name_f, f[:rows])
        np.save(self.path / name_l, lab[:rows])
        self.shards.append({"features": name_f, "labels": name_l, "rows": int(rows)})
        rest_f, rest_l = f[rows:], lab[rows:]
        self._buf_f, self._buf_l = ([rest_f], [rest_l]) if len(rest_f) else ([], [])
        self._buffered = len(rest_f)

    def close(self) -> "ShardedFeatureStore":
        if self._writable:
            if self._buffered:
                self._flush(self._buffered)
            self._write_manifest()
            self._writable = False
        return self

    def _write_manifest(self) -> None:
        manifest = {"format": "ssl_container.eval.ShardedFeatureStore/1", "dim": self.dim, "dtype": "float32",
                    "normalized": self.normalize, "rows": len(self), "shards": self.shards, "meta": self.meta}
        atomic_write_json(self.path / self.MANIFEST, manifest)

    def __enter__(self) -> "ShardedFeatureStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()

    @classmethod
    def from_arrays(cls, path: str | os.PathLike, features: np.ndarray, labels: np.ndarray,
                    shard_rows: int = 65536, normalize: bool = True) -> "ShardedFeatureStore":
        store = cls.create(path, features.shape[1], shard_rows, normalize)
        for s in range(0, len(features), shard_rows):
            store.add(features[s:s + shard_rows], labels[s:s + shard_rows])
        return store.close()

    @classmethod
    def combine(cls, path: str | os.PathLike, parts: Sequence[str | os.PathLike]) -> "ShardedFeatureStore":
        """A store at ``path`` whose manifest lists the shards of ``parts`` (sub-folders of ``path``)."""
        p = Path(path)
        stores = [cls.open(q) for q in parts]
        if len({s.dim for s in stores}) > 1:
            raise ValueError(f"parts have different feature dims: {[s.dim for s in stores]}")
        shards = []
        for s in stores:
            rel = os.path.relpath(s.path, p)
            shards += [{"features": f"{rel}/{d['features']}", "labels": f"{rel}/{d['labels']}", "rows": d["rows"]}
                       for d in s.shards]
        out = cls(p, stores[0].dim, shards, stores[0].shard_rows, all(s.normalize for s in stores), writable=False)
        out._write_manifest()
        return out

    # -- reading -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "ShardedFeatureStore":
        p = Path(path)
        mf = p / cls.MANIFEST
        if not mf.is_file():
            raise FileNotFoundError(f"{p} is not a feature store (no {cls.MANIFEST})")
        m = json.loads(mf.read_text())
        return cls(p, m["dim"], m["shards"], normalize=m.get("normalized", True), meta=m.get("meta"))

    @staticmethod
    def is_store(path: str | os.PathLike) -> bool:
        return (Path(path) / ShardedFeatureStore.MANIFEST).is_file()

    def __len__(self) -> int:
        return sum(int(s["rows"]) for s in self.shards) + self._buffered

    def labels(self) -> np.ndarray:
        """All labels in store order (int64; 8 bytes a row, small next to the features)."""
        if not self.shards:
            return np.zeros(0, np.int64)
        return np.concatenate([np.load(self.path / s["labels"]) for s in self.shards])

    def iter_shards(self) -> Iterator[tuple[int, np.ndarray]]:
        """(offset of the shard's first row, memory-mapped (rows, dim) float32 array), one at a time.

        Drop the array before asking for the next one (the caller's loop variable is rebound), and
        the mapping is released: resident memory never holds more than about one shard."""
        offset = 0
        for s in self.shards:
            arr = np.load(self.path / s["features"], mmap_mode="r")
            if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[1] != self.dim:
                raise ValueError(f"shard {s['features']}: expected float32 (n, {self.dim}), got {arr.dtype} {arr.shape}")
            yield offset, arr
            offset += arr.shape[0]
            del arr

    def read_all(self) -> np.ndarray:
        """Every feature in one in-memory array (for small stores and tests)."""
        return np.concatenate([np.asarray(a) for _, a in self.iter_shards()]) if self.shards else \
            np.zeros((0, self.dim), np.float32)
