"""Training and evaluation streams over WebDataset shards.

Training (:func:`make_train_loader`): an infinite, resampled, deterministic, resumable multi-crop stream.

* Streams. Each rank runs ``W = max(1, num_workers)`` streams (one per DataLoader worker), ``G =
  world_size * W`` in all; stream ``g = rank * W + v``. Ranks and workers are passed explicitly, never read
  from the environment inside a worker.
* Shard order (per source): the infinite concatenation of permutations of the shard list, one
  permutation per round seeded by (seed, epoch, source, round), dealt round-robin to the G streams. So the
  split is explicit (within a round every shard goes to exactly one stream) and the stream never ends.
* Samples: tar members grouped by key, mixed across sources by weight, shuffled in a buffer of raw bytes
  (before decoding, so filling it is cheap), all with generators seeded by (seed, epoch, rank, v).
* Batches are made inside the stream. Batch ``j`` of stream v is made of the raw samples at positions
  ``[j*B, (j+1)*B)``, and the crops of position p come from a generator seeded by (seed, epoch, rank, v, p).
  So a batch is a pure function of (seed, epoch, step, rank, worker), and resuming at step k only has to
  read (not decode) the raw samples before it. A sample whose image fails to decode is replaced by the
  next good sample of its block (with the bad position's own crop parameters), which keeps the batch size
  and the positions fixed.
* Order. DataLoader collects batches from its workers round-robin starting at worker 0. Step i is
  assigned to stream ``v = i % W``, and DataLoader worker j plays stream ``(j + start_step) % W``, so the
  first batch after a resume is step ``start_step`` and the sequence is the uninterrupted one. A resume
  that changed the batch size passes ``base``: each stream goes on from the raw position it had reached
  (:func:`stream_positions`), so no position of the epoch is skipped or read twice.
* Epoch. A fixed number of samples per rank (``samples_per_epoch`` or dataset.json's count / world_size),
  hence the same number of steps on every rank; each epoch restarts the streams with new seeds.

Evaluation (:func:`make_eval_loader`): every sample exactly once over ranks x workers (shards dealt to
streams when there are enough, otherwise every stream reads all shards and keeps every G-th sample).
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ssl_container.data.workers import DataLoader, batches_of, shutdown as shutdown_workers
from ssl_container.data.config import TrainDataConfig
from ssl_container.data.augment import (
    BadImageError,
    EvalTransformConfig,
    MultiCropAugment,
    decode_for_crops,
    eval_transform,
)
from ssl_container.data.sources import (
    BAD_KINDS,
    BadDataCounter,
    BadDataError,
    bad_fraction_message,
    count_samples_from_metadata,
    expand_urls,
    image_ext,
    iter_tar_samples,
    parse_label,
)

# domain tags keep the generators of the different random decisions independent
_TAG_SHARDS, _TAG_MIX, _TAG_SHUFFLE, _TAG_CROPS = 0x5348, 0x4D49, 0x5355, 0x4352


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


def parse_sources(urls: str | Sequence, weights: Sequence[float] | None) -> tuple[list[list[str]], list[float]]:
    """-> (shard URLs per source, normalised weights). Without weights everything is one source."""
    if weights is None:
        shards = expand_urls(urls)
        if not shards:
            raise ValueError("data.urls is empty: give a brace pattern such as /data/train-{000000..000009}.tar")
        return [shards], [1.0]
    if isinstance(urls, str):
        urls = [urls]
    if len(urls) != len(weights):
        raise ValueError(f"data.weights has {len(weights)} entries for {len(urls)} sources in data.urls")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.weights must be non-negative with a positive sum, got {list(weights)}")
    sources = [expand_urls(u) for u in urls]
    for u, s in zip(urls, sources):
        if not s:
            raise ValueError(f"data.urls source {u!r} expands to no shards")
    total = float(sum(weights))
    return sources, [w / total for w in weights]


def samples_per_rank(cfg: TrainDataConfig, world_size: int) -> int:
    if cfg.samples_per_epoch is not None:
        return int(cfg.samples_per_epoch)
    sources, _ = parse_sources(cfg.urls, cfg.weights)
    counts = [count_samples_from_metadata(s) for s in sources]
    if any(c is None for c in counts):
        raise ValueError("cannot derive data.samples_per_epoch: no dataset.json beside the shards describes "
                         f"them ({sources[counts.index(None)][0]}); set data.samples_per_epoch (per rank)")
    return sum(counts) // world_size


def stream_positions(start_step: int, n_streams: int, batch_size: int,
                     base: tuple[int, Sequence[int]] | None = None) -> list[int]:
    """How many raw samples each of a rank's ``n_streams`` streams has consumed before step
    ``start_step`` of an epoch. ``base = (step, positions)``: the epoch went on at ``step`` with the
    streams at ``positions`` (a resume that changed the batch size); by default it began at step 0."""
    b0, offsets = base if base is not None else (0, [0] * n_streams)
    if len(offsets) != n_streams or start_step < b0:
        raise ValueError(f"stream base {base} does not fit step {start_step} of {n_streams} streams")
    out = []
    for v in range(n_streams):
        first = b0 + (v - b0) % n_streams  # stream v serves the steps m >= b0 with m % W == v
        out.append(offsets[v] + batch_size * max(0, -(-(start_step - first) // n_streams)))
    return out


def steps_per_epoch(cfg: TrainDataConfig, world_size: int) -> int:
    n = samples_per_rank(cfg, world_size) // cfg.batch_size
    if n < 1:
        raise ValueError(f"an epoch of {samples_per_rank(cfg, world_size)} samples per rank holds no batch of "
                         f"{cfg.batch_size}: lower data.batch_size or raise data.samples_per_epoch")
    return n


# ------------------------------------------------------------------------------------------------
# the raw (undecoded) sample stream of one (rank, worker)


def shard_order(n_shards: int, seed: int, epoch: int, source: int, g: int, G: int) -> Iterator[int]:
    """Indices of the shards stream g of G reads, forever (see the module docstring)."""
    for r in itertools.count():
        perm = _rng(seed, _TAG_SHARDS, epoch, source, r).permutation(n_shards)
        for i in range((g - r * n_shards) % G, n_shards, G):
            yield int(perm[i])


def _source_samples(urls: list[str], order: Iterator[int], counter: BadDataCounter) -> Iterator[dict]:
    empty_run = 0
    for idx in order:
        got = False
        for sample in iter_tar_samples(urls[idx], counter):
            got = True
            yield sample
        empty_run = 0 if got else empty_run + 1
        if empty_run >= max(8, 2 * len(urls)):
            raise BadDataError(f"no readable sample in {empty_run} consecutive shards of the source starting "
                               f"with {urls[0]}; see the warnings above (counts {counter.summary()})")


def _mixed(iters: list[Iterator[dict]], weights: list[float], rng: np.random.Generator) -> Iterator[dict]:
    if len(iters) == 1:
        yield from iters[0]
        return
    while True:
        for k in rng.choice(len(iters), size=1024, p=weights):
            yield next(iters[k])


def _shuffled(it: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    if size <= 1:
        yield from it
        return
    buf: list[dict] = []
    for sample in it:
        if len(buf) < size:
            buf.append(sample)
            continue
        j = int(rng.integers(size))
        out, buf[j] = buf[j], sample
        yield out


class _TrainStream(IterableDataset):
    """Stream ``v`` of this rank over ``epochs`` epochs (None: without end) from ``(epoch, start_step)``."""

    def __init__(self, cfg: TrainDataConfig, rank: int, world_size: int, epoch: int, start_step: int,
                 steps: int, base: tuple[int, Sequence[int]] | None = None, epochs: int | None = 1):
        super().__init__()
        self.cfg, self.rank, self.world_size, self.epoch = cfg, rank, world_size, epoch
        self.start_step, self.steps, self.base, self.epochs = start_step, steps, base, epochs
        self.sources, self.weights = parse_sources(cfg.urls, cfg.weights)
        self.augment = MultiCropAugment(cfg.crops)

    def _crops(self, raw: dict, rng: np.random.Generator) -> Any:
        data = raw[image_ext(raw)]
        if self.cfg.augment_on == "device":
            img, params = decode_for_crops(data, rng, self.cfg.crops)
            return np.asarray(img), params
        return self.augment(data, rng)

    def __iter__(self) -> Iterator[dict]:
        W = max(1, self.cfg.num_workers)
        info = get_worker_info()
        if info is not None and info.num_workers != W:
            raise RuntimeError(f"stream built for {W} workers runs in a DataLoader with {info.num_workers}")
        worker = info.id if info is not None else 0
        # The DataLoader deals batch i to worker i % W, and step s belongs to stream s % W; counting the
        # batches this loader has already dealt keeps that true over epochs of any length.
        dealt = 0
        epochs = itertools.count(self.epoch) if self.epochs is None else range(self.epoch, self.epoch + self.epochs)
        for epoch in epochs:
            start, base = (self.start_step, self.base) if epoch == self.epoch else (0, None)
            yield from self._epoch(epoch, start, base, (worker - dealt + start) % W)
            dealt += self.steps - start

    def _epoch(self, epoch: int, start_step: int, base: tuple[int, Sequence[int]] | None, v: int) -> Iterator[dict]:
        cfg, B, W = self.cfg, self.cfg.batch_size, max(1, self.cfg.num_workers)
        g, G = self.rank * W + v, self.world_size * W
        counter = BadDataCounter(cfg.max_bad_fraction, cfg.bad_check_min_samples,
                                 where=f" (rank {self.rank}, worker {v})")
        iters = [_source_samples(urls, shard_order(len(urls), cfg.seed or 0, epoch, s, g, G), counter)
                 for s, urls in enumerate(self.sources)]
        mix_rng = _rng(cfg.seed or 0, _TAG_MIX, epoch, self.rank, v)
        raw_iter = _shuffled(_mixed(iters, self.weights, mix_rng), cfg.shuffle_buffer,
                             _rng(cfg.seed or 0, _TAG_SHUFFLE, epoch, self.rank, v))
        lookahead: deque = deque()

        def next_raw() -> dict:
            return lookahead.popleft() if lookahead else next(raw_iter)

        first = start_step + (v - start_step) % W  # first step >= start_step owned by stream v
        pos = stream_positions(start_step, W, B, base)[v]
        counter.enabled = False  # an earlier run already counted what we skip
        for _ in range(pos):
            next_raw()
        counter.enabled = True
        for step in range(first, self.steps, W):
            block = [next_raw() for _ in range(B)]
            counter.add_seen(B)
            results: list[Any] = [None] * B
            keys = [s["__key__"] for s in block]
            for i, raw in enumerate(block):
                try:
                    results[i] = self._crops(raw, self._sample_rng(epoch, pos + i, v))
                except BadImageError as exn:
                    counter.record(exn.kind, raw["__url__"], raw["__key__"], str(exn))
            if any(r is None for r in results):
                self._replace_bad(block, results, keys, epoch, pos, v, lookahead, raw_iter)
            counter.check()
            pos += B
            yield {"crops": self._collate(results), "keys": keys, "epoch": epoch, "step": step,
                   "stats": {"worker": v, **counter.as_dict()}}

    def _sample_rng(self, epoch: int, pos: int, v: int) -> np.random.Generator:
        return _rng(self.cfg.seed or 0, _TAG_CROPS, epoch, self.rank, v, pos)

    def _replace_bad(self, block, results, keys, epoch, pos, v, lookahead, raw_iter) -> None:
        """Fill each failed position from the next good sample of the block (cyclically), or, when the
        whole block failed, from the first decodable sample after it (peeked, not consumed)."""
        B = len(block)
        good = [i for i, r in enumerate(results) if r is not None]
        for i in range(B):
            if results[i] is not None:
                continue
            rng = self._sample_rng(epoch, pos + i, v)
            if good:
                src = block[min(good, key=lambda k: (k - i) % B)]
                results[i], keys[i] = self._crops(src, rng), src["__key__"]
                continue
            for n in itertools.count():
                if n >= len(lookahead):
                    if n >= 16 * B:
                        raise BadDataError(f"no decodable image in {B + n} consecutive samples around "
                                           f"{block[0]['__url__']}; see the warnings above")
                    lookahead.append(next(raw_iter))
                try:
                    results[i], keys[i] = self._crops(lookahead[n], rng), lookahead[n]["__key__"]
                    break
                except BadImageError:
                    continue

    def _collate(self, results: list) -> Any:
        if self.cfg.augment_on == "device":
            arrays = [a for a, _ in results]
            flat = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]))
            shapes = torch.tensor([a.shape[:2] for a in arrays], dtype=torch.int64)
            from ssl_container.data.gpu_augment import pack_params

            return {"image_data": flat, "image_shapes": shapes, "params": pack_params([p for _, p in results])}
        return [self.augment.normalize([r[c] for r in results]) for c in range(len(results[0]))]


class TrainLoader:
    """Iterable of batches ``{"crops", "keys", "epoch", "step"}`` for one rank: from ``start_step`` of
    ``epoch`` to the end of that epoch, or through ``epochs`` epochs (None: without end).

    ``crops``: ``n_global + n_local`` float32 tensors (B, 3, S, S), normalised; ``keys``: the sample keys;
    ``step``: the step within its epoch. :attr:`counters` sums the bad-data counts of all workers in the
    current epoch. Over several epochs the same workers go on (a trainer does not pay a worker start-up
    and an empty prefetch queue at every epoch), and every batch is the one a loader made for its own
    epoch would give."""

    def __init__(self, cfg: TrainDataConfig, rank: int, world_size: int, epoch: int, start_step: int = 0,
                 device: str | torch.device | None = None, base: tuple[int, Sequence[int]] | None = None,
                 epochs: int | None = 1, steps: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cfg, self.rank, self.world_size, self.epoch = cfg, rank, world_size, epoch
        parse_sources(cfg.urls, cfg.weights)  # fail here, with the config key named, not in a worker
        # ``steps``: the epoch's first steps only (a trainer that accumulates k micro-steps per
        # optimizer step takes a multiple of k; the batches themselves do not depend on it).
        self.steps_per_epoch = steps_per_epoch(cfg, world_size)
        if steps is not None:
            if not 1 <= steps <= self.steps_per_epoch:
                raise ValueError(f"steps {steps} outside the epoch of {self.steps_per_epoch} steps")
            self.steps_per_epoch = steps
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside the epoch of {self.steps_per_epoch} steps")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be at least 1 (or None, without end), not {epochs}")
        self.start_step, self.base, self.epochs = start_step, base, epochs
        # a base that does not fit fails here, not in a worker
        stream_positions(start_step, max(1, cfg.num_workers), cfg.batch_size, base)
        self.device = device
        self._stats: dict[int, dict[str, int]] = {}
        self._gpu = None

    @property
    def pin_memory(self) -> bool:
        """Page-locked batches when they go to a GPU: only then is the host-to-device copy truly
        non-blocking (from pageable memory CUDA stages it through a bounce buffer and the host waits)."""
        if self.cfg.pin_memory is not None:
            return self.cfg.pin_memory
        return self.device is not None and torch.device(self.device).type == "cuda"

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("a TrainLoader without an end (epochs=None) has no length")
        return self.epochs * self.steps_per_epoch - self.start_step

    @property
    def counters(self) -> dict[str, int]:
        """``seen``, ``bad`` and one count per kind of bad data (see ``sources.BAD_KINDS``), all workers."""
        total = dict.fromkeys(("seen", "bad", *BAD_KINDS), 0)
        for stats in self._stats.values():
            for k in total:
                total[k] += stats.get(k, 0)
        return total

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        self._stats = {}
        ds = _TrainStream(cfg, self.rank, self.world_size, self.epoch, self.start_step, self.steps_per_epoch, self.base,
                          self.epochs)
        if cfg.num_workers == 0:
            batches = iter(ds)
        else:
            batches = iter(DataLoader(ds, batch_size=None, num_workers=cfg.num_workers,
                                      prefetch_factor=cfg.prefetch_factor, pin_memory=self.pin_memory,
                                      persistent_workers=False, multiprocessing_context=cfg.mp_context))
        expected = (self.epoch, self.start_step) if self.start_step < self.steps_per_epoch else (self.epoch + 1, 0)
        try:
            for batch in batches_of(batches) if cfg.num_workers else batches:
                stats, where = batch.pop("stats"), (batch["epoch"], batch["step"])
                if where != expected:
                    raise RuntimeError(f"data order broken: got (epoch, step) {where}, expected {expected}")
                if where[1] == 0:
                    self._stats = {}  # the counters are per epoch, as each worker's are
                self._stats[stats.pop("worker")] = stats
                totals = self.counters
                if totals["seen"] >= cfg.bad_check_min_samples and \
                        totals["bad"] > cfg.max_bad_fraction * totals["seen"]:
                    raise BadDataError(bad_fraction_message(totals, cfg.max_bad_fraction, f" (rank {self.rank})"))
                if cfg.augment_on == "device":
                    batch["crops"] = self._device_crops(batch["crops"])
                expected = (where[0] + 1, 0) if where[1] + 1 == self.steps_per_epoch else (where[0], where[1] + 1)
                yield batch
        finally:
            shutdown_workers(batches)  # deliberately: a resampled stream never ends by itself

    def _device_crops(self, packed: dict) -> list[torch.Tensor]:
        from ssl_container.data.gpu_augment import GpuMultiCrop

        if self._gpu is None:
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._gpu = GpuMultiCrop(self.cfg.crops, device)
        return self._gpu.from_packed(packed)


def make_train_loader(cfg: TrainDataConfig, rank: int, world_size: int, epoch: int, start_step: int = 0,
                      *, device: str | torch.device | None = None,
                      base: tuple[int, Sequence[int]] | None = None, epochs: int | None = 1,
                      steps: int | None = None) -> TrainLoader:
    """The training batches of ``rank`` for ``epoch``, from ``start_step`` (resume = rebuild with k;
    ``base``: see :func:`stream_positions`), through ``epochs`` epochs (None: until closed), ``steps``
    of each epoch (default all)."""
    return TrainLoader(cfg, rank, world_size, epoch, start_step, device=device, base=base, epochs=epochs,
                       steps=steps)


# ------------------------------------------------------------------------------------------------
# evaluation


class _EvalStream(IterableDataset):
    def __init__(self, urls: list[str], batch_size: int, rank: int, world_size: int, num_workers: int,
                 transform: EvalTransformConfig, max_bad_fraction: float, bad_check_min_samples: int):
        super().__init__()
        self.urls, self.batch_size = urls, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.transform, self.max_bad_fraction = transform, max_bad_fraction
        self.bad_check_min_samples = bad_check_min_samples

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        W = max(1, self.num_workers)
        g, G = self.rank * W + (info.id if info is not None else 0), self.world_size * W
        counter = BadDataCounter(self.max_bad_fraction, self.bad_check_min_samples,
                                 where=f" (eval, rank {self.rank}, worker {g % W})")
        if len(self.urls) >= G:  # deal shards
            mine, stride, tar_counter = self.urls[g::G], 1, counter
        else:  # too few shards: all streams read everything and keep every G-th sample
            mine, stride = self.urls, G
            # shard-level problems are seen by every stream; stream 0 alone counts them
            tar_counter = counter if g == 0 else BadDataCounter(1.0)
        images, labels, keys = [], [], []
        index = 0
        for url in mine:
            for sample in iter_tar_samples(url, tar_counter):
                index += 1
                if stride > 1 and (index - 1) % stride != g:
                    continue
                counter.add_seen()
                try:
                    images.append(eval_transform(sample[image_ext(sample)], self.transform))
                except BadImageError as exn:
                    counter.record(exn.kind, url, sample["__key__"], str(exn))
                    continue
                labels.append(parse_label(sample))
                keys.append(sample["__key__"])
                if len(images) == self.batch_size:
                    counter.check()
                    yield torch.stack(images), torch.tensor(labels), keys, {"worker": g, **counter.as_dict()}
                    images, labels, keys = [], [], []
        counter.check()
        if images:
            yield torch.stack(images), torch.tensor(labels), keys, {"worker": g, **counter.as_dict()}


class EvalLoader:
    """Iterable of ``(images, labels, keys)``; labels from ``.cls`` (-1 when absent)."""

    def __init__(self, urls, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 transform: EvalTransformConfig | None = None, max_bad_fraction: float = 0.01,
                 bad_check_min_samples: int = 500):
        self.urls = expand_urls(urls)
        self.batch_size, self.rank, self.world_size, self.num_workers = batch_size, rank, world_size, num_workers
        self.transform = transform or EvalTransformConfig()
        self.max_bad_fraction, self.bad_check_min_samples = max_bad_fraction, bad_check_min_samples
        self.counters: dict[str, int] = {}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        ds = _EvalStream(self.urls, self.batch_size, self.rank, self.world_size, self.num_workers, self.transform,
                         self.max_bad_fraction, self.bad_check_min_samples)
        batches = iter(ds) if self.num_workers == 0 else iter(
            DataLoader(ds, batch_size=None, num_workers=self.num_workers, persistent_workers=False))
        per_worker: dict[int, dict[str, int]] = {}
        for images, labels, keys, stats in batches:
            per_worker[stats.pop("worker")] = stats
            self.counters = {k: sum(s.get(k, 0) for s in per_worker.values()) for k in stats}
            yield images, labels, keys


def make_eval_loader(urls, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                     transform: EvalTransformConfig | None = None, **kw) -> EvalLoader:
    """Every sample of ``urls`` exactly once across ranks x workers, resize + center-crop, in batches."""
    return EvalLoader(urls, batch_size, rank, world_size, num_workers, transform, **kw)
