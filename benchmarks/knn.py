"""k-NN classification: eval.knn (faiss, train features in on-disk shards) against DINO's dense approach.

    python benchmarks/knn.py [--scales 50000 1000000] [--queries 10000] [--dim 512] [--threads 1]

For each scale: synthetic L2-normalised features with class structure (class centres + noise; 10
classes at <= 100k train features, 1000 above, like CIFAR-10 and ImageNet) are written once to a
:class:`eval.knn.ShardedFeatureStore` in a temporary folder, then two fresh processes classify the same
test queries with DINO's protocol (k = 10, 20, 100, 200, T = 0.07):

* ``dense`` - DINO's approach: all train features in one in-memory matrix, test queries in 100 chunks,
  ``torch.mm`` + ``topk`` (one search with max k serves every k: already less work than DINO's
  eval_knn.py, which repeats the search per k); features arrive L2-normalised, as DINO normalises them at
  extraction, so the classifier makes no copy of the matrix;
* ``sharded`` - ``eval.knn.knn_classify`` on the store: faiss flat inner-product search shard by shard
  (memory-mapped, one at a time), per-query top-k merged; reading the shards is inside the timing.

Each process reports its wall time for the classification (the dense process's load of the matrix is
not timed) and its peak resident memory (``ru_maxrss``: everything the process ever held, imports
included, memory-mapped pages included). Prints one JSON line per scale: scale, seconds, dense_seconds,
speedup, peak_mib, dense_peak_mib, memory_ratio, same_predictions (for every k and query: the same top-1
class and the same set of top-5 classes, i.e. identical per-query top-1 / top-5 hits), plus details: the
mismatch counts per k, including the order inside the top-5, which may flip where two class scores are
equal to float precision (faiss's and torch's sgemm round differently).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KS = (10, 20, 100, 200)


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    import faiss

    faiss.omp_set_num_threads(n)


def generate(folder: Path, n_train: int, n_test: int, dim: int, num_classes: int, seed: int, shard_rows: int,
             noise: float) -> None:
    """Class centres + Gaussian noise, L2-normalised, written in pieces (bounded memory)."""
    from eval.knn import ShardedFeatureStore

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)

    def draw(n: int):
        y = rng.integers(0, num_classes, n)
        x = centres[y] + noise * rng.standard_normal((n, dim), dtype=np.float32)
        return x, y

    store = ShardedFeatureStore.create(folder / "train", dim, shard_rows=shard_rows, normalize=True)
    for start in range(0, n_train, shard_rows):
        x, y = draw(min(shard_rows, n_train - start))
        store.add(x, y)
    store.close()
    xq, yq = draw(n_test)
    np.save(folder / "test_features.npy", xq)
    np.save(folder / "test_labels.npy", yq)


def exact_check(folder: Path, q: int, k: int, num_classes: int, pred_sharded, pred_dense,
                tie_cos: float = 1e-6, tie_rel: float = 1e-5) -> dict:
    """Query ``q`` in float64, shard by shard: the exact top-(k+1) and class scores, whether the
    k-th / (k+1)-th cosines or two of the six best class scores are closer than float32 can tell
    apart (``tie_cos`` absolute, ``tie_rel`` relative), and which method matches the exact top-5."""
    from eval.knn import ShardedFeatureStore, l2_normalize

    store = ShardedFeatureStore.open(folder / "train")
    xq = l2_normalize(np.load(folder / "test_features.npy", mmap_mode="r")[q:q + 1])[0].astype(np.float64)
    sims, idx = np.empty(0), np.empty(0, np.int64)
    for off, shard in store.iter_shards():
        s = np.asarray(shard, dtype=np.float64) @ xq
        top = np.argpartition(-s, min(k + 1, len(s) - 1))[: k + 1]
        sims, idx = np.concatenate([sims, s[top]]), np.concatenate([idx, top + off])
        del shard
    order = np.argsort(-sims)[: k + 1]
    sims, idx = sims[order], idx[order]
    labels = store.labels()[idx]
    scores = np.zeros(num_classes)
    np.add.at(scores, labels[:k], np.exp(sims[:k] / 0.07))
    best = np.argsort(-scores, kind="stable")[:6]
    top = scores[best]
    rel_gaps = np.abs(np.diff(top)) / np.maximum(top[:-1], 1e-30)
    boundary_gap = float(sims[k - 1] - sims[k]) if len(sims) > k else float("inf")
    exact5 = sorted(best[:5].tolist())
    return {"float_tie": bool(boundary_gap < tie_cos or (rel_gaps < tie_rel).any()),
            "boundary_cosine_gap": boundary_gap, "min_relative_score_gap": float(rel_gaps.min()),
            "exact_top5": best[:5].tolist(), "sharded_top5": [int(v) for v in pred_sharded],
            "dense_top5": [int(v) for v in pred_dense],
            "exact_matches": [m for m, p in (("sharded", pred_sharded), ("dense", pred_dense))
                              if sorted(int(v) for v in p) == exact5 and int(p[0]) == int(best[0])]}


def run_method(folder: Path, method: str, num_classes: int, threads: int, chunk_size: int) -> dict:
    _threads(threads)
    from eval.knn import ShardedFeatureStore, knn_classify, knn_classify_dense, l2_normalize

    store = ShardedFeatureStore.open(folder / "train")
    xq = np.load(folder / "test_features.npy")
    yq = np.load(folder / "test_labels.npy")
    if method == "dense":
        train = np.empty((len(store), store.dim), np.float32)  # one matrix, as DINO keeps it
        for off, shard in store.iter_shards():
            train[off:off + len(shard)] = shard
            del shard
        labels = store.labels()
        xq = l2_normalize(xq)  # DINO normalises at extraction; its classifier takes normalised features
        t0 = time.perf_counter()
        res = knn_classify_dense(train, labels, xq, yq, ks=KS, num_classes=num_classes, normalize=False)
        seconds = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        res = knn_classify(store, None, xq, yq, ks=KS, num_classes=num_classes, chunk_size=chunk_size, use_gpu=False)
        seconds = time.perf_counter() - t0
    np.savez(folder / f"pred_{method}.npz", **{f"k{k}": v for k, v in res.predictions.items()})
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_mib": peak_kib / 1024, "top1": res.top1, "top5": res.top5}


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_scale(n_train: int, args: argparse.Namespace, workdir: Path) -> dict:
    num_classes = 10 if n_train <= 100_000 else 1000
    folder = workdir / f"scale_{n_train}"
    folder.mkdir(parents=True, exist_ok=True)
    common = ["--folder", str(folder), "--num-classes", str(num_classes), "--threads", str(args.threads)]
    t0 = time.perf_counter()
    _child(["--_generate", *common, "--n-train", str(n_train), "--queries", str(args.queries), "--dim", str(args.dim),
            "--seed", str(args.seed), "--shard-rows", str(args.shard_rows), "--noise", str(args.noise)])
    gen_s = time.perf_counter() - t0
    sharded = _child(["--_run", "sharded", *common, "--chunk-size", str(args.chunk_size)])
    dense = _child(["--_run", "dense", *common])
    a, b = np.load(folder / "pred_sharded.npz"), np.load(folder / "pred_dense.npz")
    # predictions: the top-1 class, and the top-5 set (what top-1 / top-5 accuracy count), per query and k
    top1_diff = {k: int((a[f"k{k}"][:, 0] != b[f"k{k}"][:, 0]).sum()) for k in KS}
    top5_set_diff = {k: int((np.sort(a[f"k{k}"], 1) != np.sort(b[f"k{k}"], 1)).any(1).sum()) for k in KS}
    # order inside the top-5 can flip where two class scores are equal to float precision (the two
    # methods' sgemm kernels round differently): reported, not counted as a different prediction
    order_diff = {k: int((a[f"k{k}"] != b[f"k{k}"]).any(1).sum()) for k in KS}
    # every query where top-1 or the top-5 set differs is recomputed exactly (float64): a float tie is a
    # k-th / (k+1)-th neighbour or a pair of class scores that float32 cannot separate
    arbitration = []
    for k in KS:
        bad = np.flatnonzero((a[f"k{k}"][:, 0] != b[f"k{k}"][:, 0]) |
                             (np.sort(a[f"k{k}"], 1) != np.sort(b[f"k{k}"], 1)).any(1))
        for q in bad[:20]:
            arbitration.append({"k": k, "query": int(q), **exact_check(folder, int(q), k, num_classes,
                                                                      a[f"k{k}"][q], b[f"k{k}"][q])})
    return {
        "scale": n_train,
        "seconds": round(sharded["seconds"], 2),
        "dense_seconds": round(dense["seconds"], 2),
        "speedup": round(dense["seconds"] / sharded["seconds"], 2),
        "peak_mib": round(sharded["peak_mib"], 1),
        "dense_peak_mib": round(dense["peak_mib"], 1),
        "memory_ratio": round(sharded["peak_mib"] / dense["peak_mib"], 3),
        "same_predictions": all(r["float_tie"] for r in arbitration) and
                            sum(top1_diff.values()) + sum(top5_set_diff.values()) <= len(arbitration),
        "float_ties": arbitration,
        "top1_mismatches": top1_diff,
        "top5_set_mismatches": top5_set_diff,
        "top5_order_mismatches": order_diff,
        "top1": {int(k): round(v, 2) for k, v in sharded["top1"].items()},
        "dense_top1": {int(k): round(v, 2) for k, v in dense["top1"].items()},
        "queries": args.queries, "dim": args.dim, "num_classes": num_classes, "ks": list(KS),
        "threads": args.threads, "shard_rows": args.shard_rows, "generate_seconds": round(gen_s, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", type=int, nargs="+", default=[50_000, 1_000_000])
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch and faiss threads in both methods")
    p.add_argument("--shard-rows", type=int, default=65536)
    p.add_argument("--chunk-size", type=int, default=16384)
    p.add_argument("--noise", type=float, default=4.0, help="noise std around the class centres (per dim)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the synthetic stores go (default: a temp folder, removed)")
    # internal: one method in a fresh process
    p.add_argument("--_generate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_run", choices=("dense", "sharded"), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--num-classes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-train", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._generate:
        generate(Path(args.folder), args.n_train, args.queries, args.dim, args.num_classes, args.seed, args.shard_rows,
                 args.noise)
        print(json.dumps({"ok": True}))
        return
    if args._run:
        print(json.dumps(run_method(Path(args.folder), args._run, args.num_classes, args.threads, args.chunk_size)))
        return
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        for n in args.scales:
            print(json.dumps(bench_scale(n, args, work)), flush=True)
    else:
        with tempfile.TemporaryDirectory(prefix="knn_bench_") as d:
            for n in args.scales:
                print(json.dumps(bench_scale(n, args, Path(d))), flush=True)


if __name__ == "__main__":
    main()
