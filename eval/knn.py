"""k-NN evaluation, DINO's protocol, on faiss: ``python -m eval.knn``.

DINO's weighted k-NN classifier (eval_knn.py of the official code): L2-normalise train and test
features; for every test feature take the k train features with the largest inner product (cosine);
each neighbour votes for its class with weight exp(sim / T), T = 0.07; the classes with the largest
vote sums are the top-1 / top-5 predictions; k in {10, 20, 100, 200}.

Here the search is an exact flat inner-product search on faiss (``knn_inner_product`` on CPU, the
same computation as ``IndexFlatIP``; ``bfKnn`` on GPU when faiss sees one; without faiss, as on an
offline GPU node, the same exact search in torch, on the GPU when there is one): it blocks queries and
train features so that the (queries x train) similarity matrix is never materialised, and keeps a
per-query top-k heap. One search with k = max(ks) serves every k (the top-k of a sorted top-200 list
are its first k entries).

Memory stays bounded in two ways:

* queries are streamed in chunks (``chunk_size``);
* train features can live on disk in a :class:`ShardedFeatureStore` (``.npy`` shards, memory-mapped one
  at a time); each shard is searched for every query chunk and the per-query top-k lists are merged, so
  peak memory is one shard + one chunk's results, whatever the number of train features.

:func:`knn_classify_dense` is the reference: DINO's approach (all train features in one matrix, test
queries in chunks, torch matmul + topk), used by the tests and by ``benchmarks/knn.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from eval.store import ShardedFeatureStore, l2_normalize
from ssl_container.signals import stoppable
from ssl_container.trainer.knn_monitor import DEFAULT_TEMPERATURE, weighted_vote

log = logging.getLogger("eval.knn")

__all__ = [
    "DEFAULT_KS",
    "KnnResult",
    "ShardedFeatureStore",
    "knn_classify",
    "knn_classify_dense",
    "knn_search",
    "l2_normalize",
    "weighted_vote",
    "main",
]

DEFAULT_KS = (10, 20, 100, 200)


# ------------------------------------------------------------------------------------------------
# helpers


def _faiss():
    """faiss, or None when it is not installed: then the search is an exact torch search (one log line)."""
    global _SAID_FALLBACK
    try:
        import faiss
    except ImportError:
        if not _SAID_FALLBACK:
            log.warning("faiss is not installed: k-NN uses an exact torch search (on %s) instead; pip install "
                        "'ssl-container[cpu]' or '[gpu]' for faiss", "cuda" if torch.cuda.is_available() else "cpu")
            _SAID_FALLBACK = True
        return None
    return faiss


_SAID_FALLBACK = False


def gpu_available() -> bool:
    """A GPU the search can use: faiss's when faiss is there, torch's for the fallback."""
    faiss = _faiss()
    if faiss is None:
        return torch.cuda.is_available()
    try:
        return faiss.get_num_gpus() > 0
    except Exception:  # pragma: no cover - broken GPU runtime: fall back to CPU
        return False


def _resolve_gpu(use_gpu: bool | str) -> bool:
    if use_gpu in ("auto", None):
        return gpu_available()
    if isinstance(use_gpu, str):
        use_gpu = use_gpu.lower() in ("1", "yes", "true", "gpu")
    if use_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True but no GPU is usable for the search (with faiss: install faiss-gpu-cu12, "
                           "not faiss-cpu)")
    return bool(use_gpu)


def search_backend(gpu: bool) -> str:
    """What searches: faiss-gpu, faiss-cpu, torch-cuda or torch-cpu."""
    if _faiss() is None:
        return "torch-cuda" if gpu else "torch-cpu"
    return "faiss-gpu" if gpu else "faiss-cpu"


_GPU_RES = None
# Similarity entries per block of the torch search (x4 bytes): bounds its memory whatever the sizes.
_TORCH_BLOCK = 1 << 26


def _torch_ip_search(queries: np.ndarray, base: np.ndarray, k: int, gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product with torch (matmul + topk), train rows in blocks, merged as it goes."""
    device = torch.device("cuda" if gpu else "cpu")
    q = torch.from_numpy(queries).to(device)
    rows = max(k, _TORCH_BLOCK // max(1, len(queries)))
    best_s = best_i = None
    for start in range(0, base.shape[0], rows):
        block = torch.from_numpy(np.ascontiguousarray(base[start:start + rows])).to(device)
        s, i = (q @ block.T).topk(min(k, block.shape[0]), dim=1)
        i = i + start
        if best_s is not None:
            s, order = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
            i = torch.cat([best_i, i], 1).gather(1, order)
        best_s, best_i = s, i
    return best_s.float().cpu().numpy(), best_i.cpu().numpy().astype(np.int64)


def _flat_ip_search(queries: np.ndarray, base: np.ndarray, k: int, gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product; (sims (Q, k) descending, indices (Q, k)); pads with -inf / -1."""
    faiss = _faiss()
    n = base.shape[0]
    kk = min(k, n)
    if faiss is None:
        sims, idx = _torch_ip_search(queries, base, kk, gpu)
    elif gpu:
        global _GPU_RES
        if _GPU_RES is None:
            _GPU_RES = faiss.StandardGpuResources()
        sims, idx = faiss.knn_gpu(_GPU_RES, queries, base, kk, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        sims, idx = faiss.knn(queries, base, kk, metric=faiss.METRIC_INNER_PRODUCT)
    if kk < k:
        pad = k - kk
        sims = np.concatenate([sims, np.full((sims.shape[0], pad), -np.inf, np.float32)], axis=1)
        idx = np.concatenate([idx, np.full((idx.shape[0], pad), -1, np.int64)], axis=1)
    return sims, idx


class _TopK:
    """The k best (sim, index) per query over several shards: faiss's heaps, or a sort without faiss."""

    def __init__(self, nq: int, k: int) -> None:
        faiss = _faiss()
        self.k = k
        self.heap = faiss.ResultHeap(nq, k, keep_max=True) if faiss is not None else None
        self.s = self.i = None

    def add(self, s: np.ndarray, i: np.ndarray) -> None:
        if self.heap is not None:
            self.heap.add_result(s, i)
            return
        if self.s is not None:
            s, i = np.concatenate([self.s, s], 1), np.concatenate([self.i, i], 1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :self.k]
        self.s, self.i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.heap is not None:
            self.heap.finalize()  # sorted, best first
            return self.heap.D, self.heap.I
        return self.s, self.i


# ------------------------------------------------------------------------------------------------
# search and vote


def _as_shards(train: Any, normalize: bool) -> tuple[Iterable[tuple[int, np.ndarray]], int, int]:
    """(iterable of (offset, float32 shard), total rows, number of shards) from an array or a store."""
    if isinstance(train, ShardedFeatureStore):
        if normalize and not train.normalize:
            raise ValueError("this store holds un-normalised features; write it with normalize=True")
        return _Reiterable(train.iter_shards), len(train), len(train.shards)
    if isinstance(train, torch.Tensor):
        train = train.detach().cpu().numpy()
    arr = np.ascontiguousarray(train, dtype=np.float32)
    if normalize:
        arr = l2_normalize(arr)
    return [(0, arr)], arr.shape[0], 1


class _Reiterable:
    def __init__(self, fn):
        self.fn = fn

    def __iter__(self):
        return self.fn()


def knn_search(queries: np.ndarray | torch.Tensor, train: np.ndarray | torch.Tensor | ShardedFeatureStore,
               k: int, *, chunk_size: int = 16384, use_gpu: bool | str = "auto", normalize: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k: (sims (Q, k) float32 descending, train indices (Q, k) int64; -1 where
    the train set has fewer than k rows).

    ``train`` is an in-memory (N, D) array, or a :class:`ShardedFeatureStore` searched one shard at
    a time with the per-query top-k lists merged. Queries are processed ``chunk_size`` at a time.
    """
    gpu = _resolve_gpu(use_gpu)
    if isinstance(queries, torch.Tensor):
        queries = queries.detach().cpu().numpy()
    queries = np.asarray(queries, dtype=np.float32)
    shards, n_train, n_shards = _as_shards(train, normalize)
    if n_train == 0:
        raise ValueError("no train features")
    nq = queries.shape[0]
    out_s = np.empty((nq, k), np.float32)
    out_i = np.empty((nq, k), np.int64)
    for start in range(0, nq, chunk_size):
        q = np.ascontiguousarray(queries[start:start + chunk_size])
        if normalize:
            q = l2_normalize(q)
        heap = None
        for offset, shard in shards:
            s, i = _flat_ip_search(q, shard, k, gpu)
            del shard
            if n_shards == 1:  # nothing to merge
                out_s[start:start + len(q)], out_i[start:start + len(q)] = s, i
                continue
            if heap is None:  # the per-query k best so far
                heap = _TopK(len(q), k)
            heap.add(s, np.where(i >= 0, i + offset, -1))
        if heap is not None:
            out_s[start:start + len(q)], out_i[start:start + len(q)] = heap.result()
    return out_s, out_i


@dataclass
class KnnResult:
    """Per-k accuracy (percent) and predictions."""

    ks: tuple[int, ...]
    top1: dict[int, float]
    top5: dict[int, float]
    predictions: dict[int, np.ndarray]  # k -> (Q, min(5, C)) best classes, best first
    num_train: int
    num_test: int
    num_classes: int
    temperature: float
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def best_k(self) -> int:
        return max(self.ks, key=lambda k: (self.top1[k], -k))

    def to_json(self) -> dict:
        return {
            "protocol": "DINO weighted k-NN: cosine on L2-normalised features, votes exp(sim / T)",
            "temperature": self.temperature,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "num_classes": self.num_classes,
            "results": [{"k": k, "top1": self.top1[k], "top5": self.top5[k]} for k in self.ks],
            "best": {"k": self.best_k, "top1": self.top1[self.best_k], "top5": self.top5[self.best_k]},
            "seconds": round(self.seconds, 3),
            **self.extra,
        }


def _accuracies(preds: torch.Tensor, test_labels: np.ndarray | None) -> tuple[float, float]:
    if test_labels is None:
        return float("nan"), float("nan")
    t = torch.as_tensor(np.asarray(test_labels), dtype=torch.int64).view(-1, 1)
    hit = preds.eq(t)
    n = max(1, hit.shape[0])
    return 100.0 * int(hit[:, :1].any(1).sum()) / n, 100.0 * int(hit[:, :5].any(1).sum()) / n


def _check_inputs(train_labels: np.ndarray, ks: Sequence[int], num_classes: int | None) -> int:
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1 if len(train_labels) else 0
    if len(train_labels) and (train_labels.min() < 0 or train_labels.max() >= num_classes):
        raise ValueError(f"train labels must lie in [0, {num_classes}); got [{train_labels.min()}, {train_labels.max()}]"
                         " (unlabelled samples have label -1: drop them before k-NN)")
    return num_classes


def knn_classify(train_features: np.ndarray | torch.Tensor | ShardedFeatureStore,
                 train_labels: np.ndarray | torch.Tensor | None,
                 test_features: np.ndarray | torch.Tensor,
                 test_labels: np.ndarray | torch.Tensor | None = None, *,
                 ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE,
                 num_classes: int | None = None, chunk_size: int = 16384, use_gpu: bool | str = "auto",
                 normalize: bool = True) -> KnnResult:
    """DINO's weighted k-NN classifier on faiss for every k in ``ks`` (one search with max(ks)).

    ``train_features`` is an (N, D) array or a :class:`ShardedFeatureStore` (then ``train_labels``
    may be None: the store's labels are used). Features are L2-normalised here unless
    ``normalize=False`` (stores are normalised when written).
    """
    t0 = time.perf_counter()
    if train_labels is None:
        if not isinstance(train_features, ShardedFeatureStore):
            raise ValueError("train_labels is required unless train_features is a ShardedFeatureStore")
        train_labels = train_features.labels()
    train_labels = np.asarray(train_labels.cpu() if isinstance(train_labels, torch.Tensor) else train_labels,
                              dtype=np.int64)
    ks = tuple(sorted(set(int(k) for k in ks)))
    num_classes = _check_inputs(train_labels, ks, num_classes)
    kmax = max(ks)
    sims, idx = knn_search(test_features, train_features, kmax, chunk_size=chunk_size, use_gpu=use_gpu,
                           normalize=normalize)
    neighbor_labels = np.where(idx >= 0, train_labels[np.clip(idx, 0, None)], -1)
    if isinstance(test_labels, torch.Tensor):
        test_labels = test_labels.cpu().numpy()
    top1, top5, preds = {}, {}, {}
    for k in ks:
        p = weighted_vote(sims, neighbor_labels, k, num_classes, temperature)
        preds[k] = p.numpy()
        top1[k], top5[k] = _accuracies(p, test_labels)
    return KnnResult(ks, top1, top5, preds, len(train_labels), len(sims), num_classes, temperature,
                     time.perf_counter() - t0, {"search": search_backend(_resolve_gpu(use_gpu))})


def _torch_float(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.float()
    a = np.asarray(x, dtype=np.float32)
    if not a.flags.writeable:  # read-only memory map: torch wants a writable buffer
        a = np.array(a, copy=True)
    return torch.from_numpy(a)


def knn_classify_dense(train_features: np.ndarray | torch.Tensor, train_labels: np.ndarray | torch.Tensor,
                       test_features: np.ndarray | torch.Tensor, test_labels: np.ndarray | torch.Tensor | None = None,
                       *, ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE,
                       num_classes: int | None = None, num_chunks: int = 100, per_k: bool = False,
                       normalize: bool = True, device: str | torch.device = "cpu") -> KnnResult:
    """The reference: DINO's dense classifier (all train features in one (D, N) matrix, the test set
    in ``num_chunks`` chunks, ``torch.mm`` + ``topk``, one-hot votes weighted by exp(sim / T)).

    ``per_k=True`` repeats the whole search for every k as DINO's eval_knn.py does; the default
    searches once with max(ks) and votes for every k from it (same predictions, less work)."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    train = _torch_float(train_features).to(dev)
    test = _torch_float(test_features).to(dev)
    train_labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.int64).to(dev)
    ks = tuple(sorted(set(int(k) for k in ks)))
    num_classes = _check_inputs(train_labels.cpu().numpy(), ks, num_classes)
    if normalize:
        train = torch.nn.functional.normalize(train, dim=1)
        test = torch.nn.functional.normalize(test, dim=1)
    train_t = train.t()
    n_test = test.shape[0]
    per_chunk = max(1, n_test // num_chunks)
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    searches = [(k, (k,)) for k in ks] if per_k else [(max(ks), ks)]
    for kk, vote_ks in searches:
        kk_eff = min(kk, train.shape[0])
        for start in range(0, n_test, per_chunk):
            feats = test[start:start + per_chunk]
            similarity = torch.mm(feats, train_t)
            distances, indices = similarity.topk(kk_eff, largest=True, sorted=True)
            candidates = train_labels.view(1, -1).expand(feats.shape[0], -1)
            retrieved = torch.gather(candidates, 1, indices)
            for k in vote_ks:
                kq = min(k, kk_eff)
                one_hot = torch.zeros(feats.shape[0] * kq, num_classes, device=dev)
                one_hot.scatter_(1, retrieved[:, :kq].reshape(-1, 1), 1)
                weights = distances[:, :kq].clone().div_(temperature).exp_()
                probs = torch.sum(one_hot.view(feats.shape[0], -1, num_classes) * weights.view(feats.shape[0], -1, 1), 1)
                order = torch.sort(probs, dim=1, descending=True, stable=True).indices
                preds[k].append(order[:, : min(5, num_classes)].cpu())
    if isinstance(test_labels, torch.Tensor):
        test_labels = test_labels.cpu().numpy()
    top1, top5, out = {}, {}, {}
    for k in ks:
        p = torch.cat(preds[k])
        out[k] = p.numpy()
        top1[k], top5[k] = _accuracies(p, test_labels)
    return KnnResult(ks, top1, top5, out, train.shape[0], n_test, num_classes, temperature,
                     time.perf_counter() - t0, {"search": "dense-torch"})


# ------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    from eval import features as eval_features

    p = argparse.ArgumentParser(
        prog="python -m eval.knn",
        description="DINO weighted k-NN (faiss) on backbone features: writes knn.json and knn.png.",
    )
    eval_features.add_data_arguments(p, splits=("train", "val"))
    eval_features.add_model_arguments(p)
    eval_features.add_extraction_arguments(p)
    g = p.add_argument_group("k-NN")
    g.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="(default: %(default)s)")
    g.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="vote weight exp(sim / T) "
                   "(default: %(default)s)")
    g.add_argument("--chunk-size", type=int, default=16384, help="test queries per search chunk (default: %(default)s)")
    g.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto",
                   help="faiss GPU search (default: auto = when faiss sees a GPU)")
    g.add_argument("--store-shard-rows", type=int, default=0,
                   help="write the train features to an on-disk sharded store with this many rows a shard and "
                        "search it shard by shard (for train sets larger than memory); 0: in memory")
    g.add_argument("--save-predictions", action="store_true", help="also write knn_predictions.npz")
    return p


@stoppable("python -m eval.knn")
def main(argv: Sequence[str] | None = None) -> int:
    from eval import features as eval_features
    from eval import plots

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        eval_features.check_sources(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"python -m eval.knn: {err}", file=sys.stderr)
        return 2
    ctx = eval_features.setup_from_args(args)
    try:
        if args.store_shard_rows:
            train = eval_features.features_from_args(args, ctx, "train", store_shard_rows=args.store_shard_rows)
        else:
            train = eval_features.features_from_args(args, ctx, "train")
        val = eval_features.features_from_args(args, ctx, "val")
        if not ctx.is_main:
            return 0
        num_classes = ctx.num_classes or int(max(train.labels.max(), val.labels.max())) + 1
        train_feats = train.store if train.store is not None else train.features
        res = knn_classify(train_feats, train.labels, val.features, val.labels, ks=args.ks,
                           temperature=args.temperature, num_classes=num_classes, chunk_size=args.chunk_size,
                           use_gpu=args.gpu)
        out = Path(ctx.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"eval": "knn", **res.to_json(), "features": {"train": train.meta, "val": val.meta},
               "source": ctx.describe()}
        (out / "knn.json").write_text(json.dumps(doc, indent=1))
        if args.save_predictions:
            np.savez_compressed(out / "knn_predictions.npz", keys=np.asarray(val.keys), labels=val.labels,
                                **{f"k{k}": v for k, v in res.predictions.items()})
        plots.plot_knn(res.to_json(), out / "knn.png", title=ctx.title())
        for k in res.ks:
            print(f"k={k:<4d} top1 {res.top1[k]:6.2f}  top5 {res.top5[k]:6.2f}")
        print(f"wrote {out / 'knn.json'} and {out / 'knn.png'}")
        return 0
    finally:
        ctx.close()


if __name__ == "__main__":
    # run the imported module's main, so that its classes are the ones the other modules import
    # (``python -m`` would otherwise define a second copy of them in ``__main__``)
    from eval.knn import main as _main

    raise SystemExit(_main())
