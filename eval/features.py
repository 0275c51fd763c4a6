"""Backbone features over an evaluation split, data-parallel over ranks, cached on disk.

* Backbones: an exported folder/file, a training run's or checkpoint's teacher or student
  (``ssl_container.export.load_backbone``), or a model by name (ours or any timm model; randomly
  initialised from ``seed`` unless timm's ``pretrained`` weights are asked for).
* Data: WebDataset shards (``ssl_container.data.stream.make_eval_loader``: every sample exactly once
  across ranks x workers) or an ImageFolder tree (ranks take every world_size-th file, no padding).
  Protocol: resize the short side (bicubic) -> center crop -> normalise; 256 / 224 by default, set
  smaller sizes for small images.
* Feature kinds: ``pooled`` (the final pooled feature: what the backbone's ``forward`` returns with no
  classifier; DINO's k-NN and linear feature) and ``concat`` (global-average-pooled outputs of the
  last four stages before the final one, then the pooled feature: 64+128+320+512 = 1024 for
  Container-Light; its last 512 columns are the ``pooled`` feature).
* Gathering: every rank extracts its part; the parts are gathered and sorted by sample key, so the
  result is the same for any number of ranks and workers; duplicate keys are an error.
* Autocast (bf16) on GPU; float32 on CPU unless asked.
* Cache: ``<cache_dir>/<key>/{features.npy, labels.npy, keys.txt, meta.json}``, the key a sha256 of
  the weights digest (of the state dict, buffers included), the data (shard names + the sha256 that
  dataset.json lists, else size and mtime), the transform and the feature kind. ``features.npy`` is
  opened memory-mapped.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from eval.store import ShardedFeatureStore
from ssl_container.downstream.backbone import eval_backbone
from ssl_container.signals import stoppable
from ssl_container.data.workers import DataLoader
from ssl_container.utils.progress import Progress
from ssl_container.utils.features import FEATURE_KINDS, FeatureSet, amp_autocast, dist_info, extract_features, forward_features

log = logging.getLogger("eval.features")

__all__ = [
    "FEATURE_KINDS",
    "DataSource",
    "FeatureSet",
    "build_model",
    "cache_key",
    "extract_features",
    "forward_features",
    "get_feature_store",
    "get_features",
    "load_feature_file",
    "save_feature_dir",
    "make_loader",
    "resolve_data",
    "weights_digest",
]

CACHE_FORMAT = "ssl_container.eval.features/1"


# ------------------------------------------------------------------------------------------------
# models


def build_model(model: str | None = None, weights: str | os.PathLike | None = None, which: str | None = None,
                seed: int = 0, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A backbone in eval mode with no classifier.

    ``weights``: anything ``ssl_container.export.load_backbone`` reads (export folder, run folder,
    checkpoint folder, .safetensors, .pth); ``which`` picks the teacher (default) or the student;
    ``model`` then overrides the architecture name. Without weights: ``model`` by name
    (``container_light`` by default, or any timm model), initialised from ``seed``.
    """
    return eval_backbone(weights, model=model, which=which, seed=seed, pretrained=pretrained, **kwargs)


def weights_digest(model: nn.Module) -> str:
    """sha256 of the state dict (names, dtypes, shapes, bytes; buffers such as BN statistics too)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# data


@dataclass
class DataSource:
    """One evaluation split: WebDataset ``urls`` or an ImageFolder ``folder``."""

    name: str
    urls: list[str] | None = None
    folder: str | None = None
    num_samples: int | None = None
    classes: list[str] | None = None
    shard_sha256: dict[str, str] | None = None

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes else None

    def identity(self) -> dict:
        """What the cache key hashes: shard names with their sha256 (from dataset.json) where known,
        else size + mtime; for a folder, the sorted file list with sizes."""
        if self.urls is not None:
            items = []
            for u in self.urls:
                base = os.path.basename(u)
                digest = (self.shard_sha256 or {}).get(base)
                if os.path.isfile(u):  # what is on disk too: a set rewritten under an old dataset.json
                    st = os.stat(u)
                    digest = f"{digest},size={st.st_size},mtime={st.st_mtime_ns}"
                items.append([os.path.abspath(u) if os.path.exists(u) else u, digest])
            return {"kind": "webdataset", "shards": items}
        assert self.folder is not None
        h = hashlib.sha256()
        root = Path(self.folder)
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(root)}|{p.stat().st_size}".encode())
        return {"kind": "imagefolder", "folder": str(root.resolve()), "files": h.hexdigest()}


def resolve_data(spec: str | os.PathLike | Sequence[str], split: str | None = None) -> DataSource:
    """A :class:`DataSource` from a dataset folder with ``dataset.json`` (+ ``split``), shard URLs
    (brace patterns, lists), or an ImageFolder tree (``split`` sub-folder if it exists)."""
    from ssl_container.data.sources import count_samples_from_metadata, expand_urls

    if isinstance(spec, (str, os.PathLike)) and not os.path.exists(spec) and not _looks_like_shards(os.fspath(spec)):
        raise FileNotFoundError(f"{spec}: no such dataset folder (a folder with dataset.json, an ImageFolder tree) "
                                "or shard pattern: check the path (make demo converts a dataset when ../shared is absent)")
    if isinstance(spec, (str, os.PathLike)) and os.path.isdir(spec):
        root = Path(spec)
        meta_path = root / "dataset.json"
        if meta_path.is_file():
            from ssl_container.data.sources import dataset_json_problem, read_dataset_json

            meta = read_dataset_json(meta_path)
            splits = meta.get("splits", {})
            if split is None or split not in splits:
                raise ValueError(f"{root}: it has no split {split!r}; its dataset.json lists {sorted(splits)}")
            urls = [str(root / u) for u in expand_urls(splits[split]["shards"])]
            problem = dataset_json_problem(urls)
            if problem:
                raise ValueError(problem)
            return DataSource(f"{meta.get('name', root.name)}/{split}", urls=urls,
                              num_samples=int(splits[split].get("num_samples", 0)) or None,
                              classes=meta.get("classes"), shard_sha256=meta.get("sha256"))
        folder = root / split if split and (root / split).is_dir() else root
        from torchvision.datasets.folder import find_classes

        classes, _ = find_classes(str(folder))
        return DataSource(f"{root.name}/{folder.name}", folder=str(folder), classes=classes)
    urls = expand_urls(spec)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}: check the "
                                "pattern against the folder (its dataset.json lists the set's own)")
    from ssl_container.data.sources import dataset_json_problem

    problem = dataset_json_problem(urls)
    if problem:
        raise ValueError(problem)
    src = DataSource(os.path.basename(os.path.dirname(os.path.abspath(urls[0]))) + f"/{split or 'split'}", urls=urls,
                     num_samples=count_samples_from_metadata(urls))
    meta_path = Path(urls[0]).parent / "dataset.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        src.classes, src.shard_sha256 = meta.get("classes"), meta.get("sha256")
    return src


def _looks_like_shards(text: str) -> bool:
    return any(t in text for t in (".tar", "::", "pipe:", "://", "{"))


def held_out_split(data: str | os.PathLike) -> str:
    """The held-out split of a dataset folder, one rule for every eval command: ``val`` where the
    set has one, else ``test``, else its only split besides ``train``."""
    meta_path = Path(data) / "dataset.json"
    if not meta_path.is_file():
        return "val"
    from ssl_container.data.sources import read_dataset_json

    splits = sorted(read_dataset_json(meta_path).get("splits", {}))
    for name in ("val", "test"):
        if name in splits:
            return name
    others = [s for s in splits if s != "train"]
    if len(others) == 1:
        return others[0]
    raise ValueError(f"{data}: no held-out split to default to among {splits}: name one (--val-split)")


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[tuple[str, int]], root: str, transform):
        self.samples, self.root, self.transform = samples, root, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from ssl_container.data.augment import eval_transform

        path, label = self.samples[i]
        try:
            with open(path, "rb") as f:
                img = eval_transform(f.read(), self.transform)
        except Exception as err:  # a truncated or empty file: skipped and counted, as training does
            log.warning("skipping %s: not a readable image (%s: %s)", path, type(err).__name__, str(err)[:120])
            return None
        return img, label, os.path.relpath(path, self.root)


def _collate(batch):
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.int64), []
    imgs, labels, keys = zip(*batch)
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.int64), list(keys)


def make_loader(source: DataSource, transform=None, batch_size: int = 128, rank: int = 0, world_size: int = 1,
                num_workers: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Batches ``(images, labels, keys)`` of this rank's part of ``source``; the parts of all ranks
    hold every sample exactly once."""
    from ssl_container.data.augment import EvalTransformConfig

    transform = transform or EvalTransformConfig()
    if source.urls is not None:
        from ssl_container.data.stream import make_eval_loader

        return make_eval_loader(source.urls, batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
                                transform=transform)
    from torchvision.datasets import ImageFolder

    samples = ImageFolder(source.folder).samples  # sorted: the same on every rank
    mine = samples[rank::world_size]
    ds = _FolderDataset(mine, source.folder, transform)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       collate_fn=_collate, drop_last=False)


# ------------------------------------------------------------------------------------------------
# extraction


# ------------------------------------------------------------------------------------------------
# cache


def _transform_dict(transform) -> dict:
    return dataclasses.asdict(transform) if dataclasses.is_dataclass(transform) else dict(transform or {})


def cache_key(digest: str, source: DataSource, transform, kind: str, amp: str = "none") -> str:
    """sha256 over (weights digest, data identity, transform, kind, autocast)."""
    doc = {"format": CACHE_FORMAT, "weights": digest, "data": source.identity(), "transform": _transform_dict(transform),
           "kind": kind, "amp": amp}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


def save_feature_dir(path: str | os.PathLike, fs: FeatureSet) -> None:
    """Write ``features.npy``, ``labels.npy``, ``keys.txt``, ``meta.json`` atomically (temp dir + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        np.save(tmp / "features.npy", np.ascontiguousarray(fs.features, dtype=np.float32))
        np.save(tmp / "labels.npy", np.asarray(fs.labels, dtype=np.int64))
        (tmp / "keys.txt").write_text("\n".join(fs.keys) + ("\n" if fs.keys else ""))
        (tmp / "meta.json").write_text(json.dumps(fs.meta, indent=1, default=str))
    except BaseException:  # a stop signal or a full disk half-way: leave nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def load_feature_file(path: str | os.PathLike, mmap: bool = True) -> FeatureSet:
    """Features from a cache entry / feature folder (``features.npy`` + ``labels.npy``), a
    :class:`~eval.knn.ShardedFeatureStore` folder, or an ``.npz`` with ``features`` and ``labels``."""

    p = Path(path)
    if p.is_dir() and ShardedFeatureStore.is_store(p):
        store = ShardedFeatureStore.open(p)
        return FeatureSet(np.zeros((0, store.dim), np.float32), store.labels(), [], {"store": str(p), **store.meta},
                          store=store)
    if p.is_dir():
        f = np.load(p / "features.npy", mmap_mode="r" if mmap else None)
        lab = np.load(p / "labels.npy")
        keys = (p / "keys.txt").read_text().splitlines() if (p / "keys.txt").exists() else []
        meta = json.loads((p / "meta.json").read_text()) if (p / "meta.json").exists() else {}
        return FeatureSet(f, lab, keys, meta)
    if p.suffix == ".npz":
        z = np.load(p)
        keys = [str(k) for k in z["keys"]] if "keys" in z else []
        return FeatureSet(z["features"].astype(np.float32), z["labels"].astype(np.int64), keys, {"file": str(p)})
    raise ValueError(f"{p}: expected a feature folder (features.npy + labels.npy), a feature store, or an .npz")


def default_cache_dir() -> Path:
    return Path(os.environ.get("SSL_CONTAINER_FEATURE_CACHE", Path.home() / ".cache" / "ssl_container" / "features"))


def get_features(model: nn.Module, source: DataSource, transform=None, kinds: str | Sequence[str] = "pooled",
                 cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 128, num_workers: int = 0, amp: str = "auto", digest: str | None = None,
                 progress: bool = False, gather: str = "all") -> FeatureSet | dict[str, FeatureSet] | None:
    """Cached :func:`extract_features` over ``source``. All ranks must call it (extraction is
    collective); rank 0 writes the cache. ``cache_dir=None`` disables the cache."""
    from ssl_container.data.augment import EvalTransformConfig

    transform = transform or EvalTransformConfig()
    single = isinstance(kinds, str)
    kinds = (kinds,) if single else tuple(kinds)
    device = torch.device(device)
    _, amp_used = amp_autocast(device, amp)
    digest = digest or weights_digest(model)
    rank, world = dist_info()
    found: dict[str, FeatureSet] = {}
    paths: dict[str, Path] = {}
    if cache_dir is not None:
        for k in kinds:
            paths[k] = Path(cache_dir) / cache_key(digest, source, transform, k, amp_used)
            if (paths[k] / "meta.json").is_file():
                found[k] = load_feature_file(paths[k])
                log.info("features %s (%s): cache hit %s", source.name, k, paths[k])
    missing = [k for k in kinds if k not in found]
    if missing:
        loader = make_loader(source, transform, batch_size, rank, world, num_workers)
        t0 = time.perf_counter()
        new = extract_features(model, loader, device, missing, amp=amp, gather=gather, progress=progress,
                               total=source.num_samples)
        secs = time.perf_counter() - t0
        for k, fs in (new or {}).items():
            if len(fs) == 0:  # never cached: a later run would take an empty entry as a hit
                raise ValueError(f"{source.name}: no readable sample in {len(source.urls or [])} shard(s)"
                                 f"{'' if source.urls else ' of ' + str(source.folder)}: nothing to evaluate")
            fs.meta.update({"data": source.name, "weights_digest": digest, "transform": _transform_dict(transform),
                            "expected_samples": source.num_samples, "seconds": round(secs, 2)})
            if source.num_samples is not None and len(fs) != source.num_samples:
                log.warning("features %s: %d samples extracted, dataset.json lists %d (bad samples are skipped by "
                            "the loader)", source.name, len(fs), source.num_samples)
            if cache_dir is not None and rank == 0:
                fs.meta["cache_key"] = paths[k].name
                save_feature_dir(paths[k], fs)
            found[k] = fs
        if new:
            log.info("features %s: %d samples in %.1f s", source.name, len(new[missing[0]]), secs)
    if world > 1 and cache_dir is not None:
        dist.barrier()  # the cache entry is complete before any rank goes on
    if any(k not in found for k in kinds):  # gather="main" on a non-main rank
        return None
    return found[kinds[0]] if single else {k: found[k] for k in kinds}


# ------------------------------------------------------------------------------------------------
# shared command-line plumbing for eval.knn and eval.linear


def add_data_arguments(p: argparse.ArgumentParser, splits: Sequence[str] = ("train", "val")) -> None:
    g = p.add_argument_group("data (per split: a dataset folder + split name, shard URLs, an ImageFolder, or features)")
    g.add_argument("--data", help="dataset folder with dataset.json (e.g. ../shared/data/cifar10)")
    defaults = {"train": "train", "val": None}
    for s in splits:
        g.add_argument(f"--{s}-split", default=defaults.get(s),
                       help=f"{s} split name in dataset.json (default: " + ("val, else test)" if s == "val" else f"{s})"))
        g.add_argument(f"--{s}-shards", help=f"{s} WebDataset shard URLs (brace patterns allowed)")
        g.add_argument(f"--{s}-folder", help=f"{s} ImageFolder root")
        g.add_argument(f"--{s}-features", help=f"precomputed {s} features: feature folder, feature store or .npz")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone (--weights or --model)")
    g.add_argument("--weights", help="exported backbone, run folder, checkpoint folder, .safetensors or .pth")
    g.add_argument("--which", choices=("teacher", "student"), default=None, help="for checkpoints holding both (teacher)")
    g.add_argument("--model", default=None, help="model name (ours or timm); without --weights: random init "
                                                   "(container_light by default)")
    g.add_argument("--pretrained", action="store_true", help="with --model: timm's pretrained weights")
    g.add_argument("--seed", type=int, default=0, help="random-init seed (default: %(default)s)")


def add_extraction_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("feature extraction")
    g.add_argument("--resize", type=int, default=256, help="short side before the center crop (default: %(default)s)")
    g.add_argument("--crop", type=int, default=224, help="center crop; Container: a multiple of 32 (default: %(default)s)")
    g.add_argument("--interpolation", choices=("bicubic", "bilinear"), default="bicubic", help="(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=128, help="extraction batch per rank (default: %(default)s)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="data loader workers per rank (default: 4, or one less than the cores this process may use)")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="autocast (default: auto = bf16 on GPU, none on CPU)")
    g.add_argument("--cache-dir", default=None, help="feature cache (default: $SSL_CONTAINER_FEATURE_CACHE or "
                                                       "~/.cache/ssl_container/features)")
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    g.add_argument("--out", default=None, help="results folder (default: <weights>/eval, else required)")
    g.add_argument("--threads", type=int, default=0, help="torch/faiss CPU threads (default: 0 = library default)")


@dataclass
class EvalContext:
    """What the CLIs share: device, ranks, the backbone (built lazily), data sources, output folder."""

    args: argparse.Namespace
    device: torch.device
    rank: int
    world_size: int
    out_dir: Path
    cache_dir: Path | None
    owns_process_group: bool = False
    _model: nn.Module | None = None
    _digest: str | None = None
    sources: dict[str, DataSource] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            a = self.args
            self._model = build_model(a.model, a.weights, a.which, seed=a.seed, pretrained=a.pretrained)
        return self._model

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = weights_digest(self.model)
        return self._digest

    @property
    def num_classes(self) -> int | None:
        for s in self.sources.values():
            if s.num_classes:
                return s.num_classes
        return None

    def transform(self):
        from ssl_container.data.augment import EvalTransformConfig

        return EvalTransformConfig(resize=self.args.resize, crop=self.args.crop, interpolation=self.args.interpolation)

    def describe(self) -> dict:
        a = self.args
        d = {"weights": str(a.weights) if a.weights else None, "which": a.which, "model": a.model or
             (None if a.weights else "container_light"), "random_init": a.weights is None and not a.pretrained,
             "seed": a.seed if a.weights is None else None, "transform": _transform_dict(self.transform()),
             "data": {k: s.name for k, s in self.sources.items()}, "world_size": self.world_size,
             "device": str(self.device)}
        if self._model is not None:
            d["weights_digest"] = self.digest
        return d

    def title(self) -> str:
        a = self.args
        what = Path(a.weights).name if a.weights else f"{a.model or 'container_light'} (random init)"
        data = ", ".join(sorted({s.name.split('/')[0] for s in self.sources.values()}))
        return f"{what} — {data}" if data else what

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_from_args(args: argparse.Namespace) -> EvalContext:
    """Device, threads, process group (torchrun / Slurm with several tasks), output folder."""
    if hasattr(args, "num_workers"):  # loader workers that fit the machine: the forward needs a core too
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if args.num_workers is None:
            args.num_workers = max(0, min(4, cores - 1))
        elif args.num_workers >= cores:
            log.warning("--num-workers %d on %d cores: the loader workers and the forward pass compete for them; "
                        "--num-workers %d fits this machine", args.num_workers, cores, max(0, cores - 1))
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    owns = False
    rank, world = 0, 1
    from ssl_container.distributed import init_distributed, resolve_env

    env = resolve_env()
    if env.world_size > 1 and not dist.is_initialized():
        init_distributed(device, env)
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", env.local_rank)
    if args.out:
        out = Path(args.out)
        if not _writable(out):  # a refusal: one line, exit 2, like every other
            print(f"--out {out}: cannot write there (read-only or no permission); choose another folder", file=sys.stderr)
            raise SystemExit(2)
    elif args.weights:
        w = Path(args.weights)
        # An export folder is what gets uploaded whole (Hub, local-dir:): results go beside it, not into it.
        out = w.with_name(f"{w.name}_eval") if (w / "backbone.safetensors").is_file() else \
            (w if w.is_dir() else w.parent) / "eval"
        if not _writable(out):  # a colleague's read-only run folder: the results still get written, here
            fallback = Path("eval_outputs") / (w if w.is_dir() else w.parent).name
            log.warning("%s is not writable: results go to %s instead (--out chooses)", out, fallback)
            out = fallback
    else:
        raise SystemExit("--out is required without --weights (results go next to the checkpoint otherwise)")
    cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    return EvalContext(args, device, rank, world, out, cache, owns)


def _writable(folder: Path) -> bool:
    """Whether ``folder`` can be created or written: the nearest existing ancestor decides."""
    p = folder.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return os.access(p, os.W_OK | os.X_OK)


def split_source(args: argparse.Namespace, split: str) -> DataSource | None:
    name = getattr(args, f"{split}_split", None)
    shards = getattr(args, f"{split}_shards", None)
    folder = getattr(args, f"{split}_folder", None)
    if shards:
        return resolve_data(shards, name or split)
    if folder:
        return resolve_data(folder, None)
    if args.data:
        if name is None and split == "val":
            name = held_out_split(args.data)
        if name is None:
            name = split
        return resolve_data(args.data, name)
    return None


def check_sources(args: argparse.Namespace, splits: Sequence[str] = ("train", "val")) -> None:
    """Every split the command will read, resolved before any work: a missing folder or shard, or a
    split the set does not have, is refused (FileNotFoundError / ValueError) before the first feature."""
    for split in splits:
        if getattr(args, f"{split}_features", None) is None:
            split_source(args, split)


def features_from_args(args: argparse.Namespace, ctx: EvalContext, split: str, kinds: str | Sequence[str] = "pooled",
                       gather: str = "main", store_shard_rows: int = 0) -> Any:
    """The features of ``split`` as the command line asks: precomputed, or extracted (cached).

    ``gather="main"``: only rank 0 gets them (others None). With ``store_shard_rows`` (one kind), the
    features go straight from every rank into an on-disk :class:`~eval.knn.ShardedFeatureStore`
    (never all in memory); the FeatureSet then has ``store`` set and empty ``features``."""
    pre = getattr(args, f"{split}_features", None)
    if pre:
        fs = load_feature_file(pre)
        return fs if isinstance(kinds, str) else {fs.meta.get("kind", "precomputed"): fs}
    src = split_source(args, split)
    if src is None:
        raise SystemExit(f"no {split} data: give --data (+ --{split}-split), --{split}-shards, --{split}-folder "
                         f"or --{split}-features")
    ctx.sources[split] = src
    if store_shard_rows:
        if not isinstance(kinds, str):
            raise ValueError("a feature store holds one feature kind")
        base = ctx.cache_dir if ctx.cache_dir is not None else ctx.out_dir / "feature_store"
        _, amp_used = amp_autocast(ctx.device, args.amp)
        path = Path(base) / (cache_key(ctx.digest, src, ctx.transform(), kinds, amp_used) + f"-store{store_shard_rows}")
        store = get_feature_store(ctx.model, src, path, ctx.transform(), kinds, ctx.device, args.batch_size,
                                  args.num_workers, args.amp, store_shard_rows)
        if gather == "main" and not ctx.is_main:
            return None
        return FeatureSet(np.zeros((0, store.dim), np.float32), store.labels(), [],
                          {"kind": kinds, "store": str(path), "num_samples": len(store), "data": src.name}, store=store)
    return get_features(ctx.model, src, ctx.transform(), kinds, ctx.cache_dir, ctx.device, args.batch_size,
                        args.num_workers, args.amp, ctx.digest, progress=True, gather=gather)


@torch.inference_mode()
def get_feature_store(model: nn.Module, source: DataSource, path: str | os.PathLike, transform=None,
                      kind: str = "pooled", device: str | torch.device = "cpu", batch_size: int = 128,
                      num_workers: int = 0, amp: str = "auto", shard_rows: int = 65536, progress: bool = True):
    """Extract ``kind`` features of ``source`` into a sharded on-disk store at ``path`` (reused when
    complete): each rank writes its own part (``rank-XXXXX/``) while extracting, so no process ever
    holds the whole set; rank 0 then writes the combined manifest. Features are L2-normalised (k-NN)."""

    path = Path(path)
    rank, world = dist_info()
    if not ShardedFeatureStore.is_store(path):
        device = torch.device(device)
        model.eval().to(device)
        ctx, _ = amp_autocast(device, amp)
        part_path = path / f"rank-{rank:05d}"
        if part_path.exists():
            shutil.rmtree(part_path)
        store = None
        bar = Progress(source.num_samples, "features", "img", enabled=progress and rank == 0)
        for images, lab, keys in make_loader(source, transform, batch_size, rank, world, num_workers):
            with ctx:
                f = forward_features(model, images.to(device, non_blocking=True), (kind,))[kind].float().cpu()
            if store is None:
                store = ShardedFeatureStore.create(part_path, f.shape[1], shard_rows, normalize=True)
            store.add(f, lab)
            bar.update(len(keys) * world)
        bar.close()
        if store is None:  # this rank got no samples
            dim = [0]
        else:
            store.close()
            dim = [store.dim]
        if world > 1:
            dims: list = [None] * world
            dist.all_gather_object(dims, dim[0])
        else:
            dims = dim
        if rank == 0:
            d = max(dims)
            parts = []
            for r in range(world):
                pp = path / f"rank-{r:05d}"
                if not ShardedFeatureStore.is_store(pp):  # an empty rank: an empty part
                    ShardedFeatureStore.create(pp, d).close()
                parts.append(pp)
            ShardedFeatureStore.combine(path, parts)
        if world > 1:
            dist.barrier()
    return ShardedFeatureStore.open(path)


# ------------------------------------------------------------------------------------------------
# CLI: python -m eval.features


@stoppable("python -m eval.features")
def main(argv: Sequence[str] | None = None) -> int:
    """Extract one split's features into ``OUT/<kind>/`` (features.npy, labels.npy, keys.txt, meta.json),
    which ``--train-features`` / ``--val-features`` of eval.knn and eval.linear accept."""
    p = argparse.ArgumentParser(prog="python -m eval.features", description=main.__doc__)
    g = p.add_argument_group("data (a dataset folder + split name, shard URLs, or an ImageFolder)")
    g.add_argument("--data", help="dataset folder with dataset.json (e.g. ../shared/data/cifar10)")
    g.add_argument("--split", dest="split_split", help="split name in dataset.json (with --data)")
    g.add_argument("--shards", dest="split_shards", help="WebDataset shard URLs (brace patterns allowed)")
    g.add_argument("--folder", dest="split_folder", help="ImageFolder root")
    add_model_arguments(p)
    add_extraction_arguments(p)
    p.add_argument("--kinds", nargs="+", default=["pooled"], choices=FEATURE_KINDS, help="(default: pooled)")
    args = p.parse_args(argv)
    args.split_features = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ctx = setup_from_args(args)
    try:
        if args.data and not args.split_split:
            raise SystemExit("--split NAME is required with --data (a split of dataset.json)")
        res = features_from_args(args, ctx, "split", tuple(args.kinds), gather="main")
        if ctx.is_main:
            for kind, fs in res.items():
                save_feature_dir(ctx.out_dir / kind, fs)
                print(f"{kind}: {fs.features.shape[0]} x {fs.features.shape[1]} -> {ctx.out_dir / kind}")
        return 0
    finally:
        ctx.close()


if __name__ == "__main__":
    # run the imported module's main, so that its classes are the ones the other modules import
    # (``python -m`` would otherwise define a second copy of them in ``__main__``)
    from eval.features import main as _main

    raise SystemExit(_main())
