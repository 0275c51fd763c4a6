"""Reading WebDataset shards: URL expansion, fault-tolerant tar iteration, bad-data accounting.

Shards are opened with webdataset's ``gopen`` (local paths, ``file:``, ``pipe:``, http(s) and whatever
else it knows) and read with :mod:`tarfile` in streaming mode (``.tar`` and ``.tar.gz``). A shard that
cannot be opened, or breaks off in the middle, is counted and logged, never fatal by itself: the
ceiling on the bad fraction (:class:`BadDataCounter`) decides when a run must stop.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import time
from dataclasses import dataclass
from typing import Iterator, Sequence
from urllib.parse import urlparse

log = logging.getLogger("ssl_container.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
BAD_KINDS = ("corrupt_image", "image_too_large", "missing_image", "truncated_shard", "unreadable_shard")
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key = up to the first dot


class BadDataError(RuntimeError):
    """Too much of the data is unreadable: the run stops rather than train on a silently skewed stream."""


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace patterns (``train-{000000..000009}.tar``), ``::``-joined strings, or lists of either, as
    webdataset expands them. Without ``$`` (webdataset's ``${WDS_...}`` substitution) braceexpand alone
    does it, so the command line can check the shards without loading webdataset and torch."""
    if isinstance(urls, (str, os.PathLike)):
        text = os.fspath(urls)
        if "$" in text:
            from webdataset.shardlists import expand_urls as _wds_expand

            return list(_wds_expand(text))
        from braceexpand import braceexpand

        return [url for part in text.split("::") for url in braceexpand(part)]
    out: list[str] = []
    for u in urls:
        out.extend(expand_urls(u))
    return out


def local_path(url: str) -> str | None:
    """The file system path of a local URL (plain path or ``file:``), else None."""
    pr = urlparse(url)
    if pr.scheme == "":
        return url
    if pr.scheme == "file":
        return pr.path
    return None


# ------------------------------------------------------------------------------------------------
# accounting


class BadDataCounter:
    """Per-kind counts of bad data, a rate-limited log naming shard and key, and the ceiling check.

    ``seen`` counts samples read from tars plus shard-level events (a shard that breaks off or cannot be
    opened counts once), so the fraction is meaningful even when whole shards are unreadable."""

    def __init__(self, max_bad_fraction: float = 0.01, min_samples: int = 500, log_first: int = 10,
                 log_interval_s: float = 60.0, where: str = "", keep_events: bool = False):
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.log_first, self.log_interval_s = log_first, log_interval_s
        self.where = where
        self.seen = 0
        self.counts = dict.fromkeys(BAD_KINDS, 0)
        self.events: list[tuple[str, str, str | None, str]] | None = [] if keep_events else None
        self.enabled = True  # off while a resumed loader skips samples that an earlier run counted
        self._logged = 0
        self._suppressed = 0
        self._last_log = 0.0

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    def add_seen(self, n: int = 1) -> None:
        if self.enabled:
            self.seen += n

    def record(self, kind: str, url: str, key: str | None, detail: str, counts_as_sample: bool = False) -> None:
        """One bad sample (or shard event). ``counts_as_sample``: also count it as seen (shard events)."""
        if not self.enabled:
            return
        self.counts[kind] += 1
        if counts_as_sample:
            self.seen += 1
        if self.events is not None:
            self.events.append((kind, url, key, detail))
        now = time.monotonic()
        if self._logged < self.log_first or now - self._last_log >= self.log_interval_s:
            more = f" ({self._suppressed} more since the last message)" if self._suppressed else ""
            log.warning("bad data%s: %s in shard %s key %s: %s%s; totals %s of %d seen",
                        self.where, kind, url, key if key is not None else "-", detail[:300], more,
                        self.summary(), self.seen)
            self._logged += 1
            self._last_log = now
            self._suppressed = 0
        else:
            self._suppressed += 1

    def summary(self) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if v}

    def as_dict(self) -> dict[str, int]:
        return {"seen": self.seen, "bad": self.bad, **self.counts}

    def check(self) -> None:
        if self.seen >= max(1, self.min_samples) and self.bad > self.max_bad_fraction * self.seen:
            raise BadDataError(bad_fraction_message(self.as_dict(), self.max_bad_fraction, self.where))


def bad_fraction_message(stats: dict[str, int], ceiling: float, where: str = "") -> str:
    kinds = {k: stats[k] for k in BAD_KINDS if stats.get(k)}
    return (f"data{where}: {stats['bad']} of {stats['seen']} samples were bad "
            f"({stats['bad'] / max(1, stats['seen']):.2%}), above the ceiling data.max_bad_fraction={ceiling}; "
            f"by kind: {kinds}. The warnings above name the shards and keys; repair or drop those shards "
            f"(`ssl-container shards verify` lists them all) or raise data.max_bad_fraction.")


# ------------------------------------------------------------------------------------------------
# tar iteration


class _EndAwareTarInfo(tarfile.TarInfo):
    """Records why the member iteration ended. tarfile stops *silently* on a missing end-of-archive marker
    (a shard cut at a block boundary) and on a garbled header after the first member; only a zero block
    (``EOFHeaderError``) is a proper end."""

    @classmethod
    def fromtarfile(cls, tf):  # noqa: D102 - tarfile's hook
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as exn:
            tf.ssl_end_reason = type(exn).__name__
            raise


def iter_tar_samples(url: str, counter: BadDataCounter | None = None, *, need_image: bool = True
                     ) -> Iterator[dict]:
    """Samples of one shard as dicts ``{"__key__", "__url__", "<ext>": bytes, ...}``.

    Consecutive tar members with the same key form a sample. Errors become counted, logged events:
    a shard that cannot be opened (``unreadable_shard``), one that breaks off (``truncated_shard``:
    the samples read before the break are kept, the partial one is dropped), and, with
    ``need_image``, samples without an image member (``missing_image``)."""
    from webdataset.gopen import gopen

    counter = counter if counter is not None else BadDataCounter(max_bad_fraction=1.0)
    stream = None
    current: dict | None = None
    started = failed = False
    try:
        try:
            stream = gopen(url, "rb")
            tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo)
        except Exception as exn:
            failed = True
            counter.record("unreadable_shard", url, None, f"{type(exn).__name__}: {exn}", counts_as_sample=True)
            return
        try:
            for member in tf:
                started = True
                if not member.isreg():
                    continue
                m = _KEY_RE.match(member.name)
                if m is None or os.path.basename(member.name).startswith("__"):
                    continue  # no extension, or webdataset metadata
                key, ext = m.group(1), m.group(2).lower()
                data = tf.extractfile(member).read()
                tf.members = []  # streaming: do not keep every TarInfo
                if current is not None and current["__key__"] != key:
                    yield from _finish(current, counter, need_image)
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
            end = getattr(tf, "ssl_end_reason", None)
            if end != "EOFHeaderError":
                raise tarfile.ReadError(f"no end-of-archive marker ({end or 'end of data'})")
        except Exception as exn:
            failed = True
            kind = "truncated_shard" if started else "unreadable_shard"
            lost = current["__key__"] if current is not None else None
            counter.record(kind, url, lost, f"{type(exn).__name__}: {exn}", counts_as_sample=True)
            current = None
            return
        if current is not None:
            yield from _finish(current, counter, need_image)
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception as exn:  # a pipe: whose command failed reports it on close
                if not failed:  # counted once per shard
                    counter.record("truncated_shard", url, None, f"on close: {type(exn).__name__}: {exn}",
                                   counts_as_sample=True)


def _finish(sample: dict, counter: BadDataCounter, need_image: bool) -> Iterator[dict]:
    if need_image and image_ext(sample) is None:
        counter.add_seen()
        others = sorted(k for k in sample if not k.startswith("__"))
        counter.record("missing_image", sample["__url__"], sample["__key__"], f"members {others}, no image")
        return
    yield sample


def image_ext(sample: dict) -> str | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


def parse_label(sample: dict) -> int:
    raw = sample.get("cls")
    if raw is None:
        return -1
    try:
        return int(raw.decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        return -1


# ------------------------------------------------------------------------------------------------
# dataset.json


# What dataset.json says of a split while ``shards write`` swaps a new set in (see shards._swap_in).
INCOMPLETE = ("a `shards write` replacing this split was stopped while it swapped the new shards in; run that "
              "`shards write` again: it first finishes the swap from the staging folder it left")


def read_dataset_json(path: str | os.PathLike) -> dict:
    """A dataset.json, or ValueError naming it and the fix (a truncated or hand-edited file)."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid dataset.json ({type(err).__name__}: {str(err)[:80]}); it may be "
                         "truncated: write it again with `ssl-container shards write`, or restore it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("splits", {}), dict):
        raise ValueError(f"{path}: not a valid dataset.json (expected a mapping with 'splits'); write it again with "
                         "`ssl-container shards write`, or restore it")
    return meta


# A sample is at least two tar members (the image and its label), each a 512-byte header and a block.
_MIN_SAMPLE_BYTES = 2048


def dataset_json_problem(urls: Sequence[str]) -> str | None:
    """Why the shards' dataset.json must not be trusted, else None: unreadable, a split of these shards
    marked incomplete (an interrupted rewrite), or more samples claimed than the shard files can hold
    (checked from file sizes only: cheap at every start)."""
    meta_path = find_dataset_json(urls)
    if meta_path is None:
        return None
    try:
        splits = read_dataset_json(meta_path).get("splits", {})
    except ValueError as err:
        return str(err)
    wanted = {os.path.basename(local_path(u) or u): local_path(u) for u in urls}
    for name, entry in splits.items():
        if not isinstance(entry, dict):
            continue
        names = [os.path.basename(u) for u in expand_urls(entry.get("shards", ""))]
        if not set(wanted) & set(names):
            continue
        if entry.get("incomplete"):
            return f"{meta_path}: split '{name}' is incomplete: {entry['incomplete']}"
        for shard, n in zip(names, entry.get("shard_samples", [])):
            path = wanted.get(shard)
            if path and os.path.isfile(path) and int(n) * _MIN_SAMPLE_BYTES > os.path.getsize(path) + 10240:
                return (f"{meta_path}: split '{name}' claims {int(n):,} samples in {shard}, which at "
                        f"{os.path.getsize(path):,} bytes holds at most {os.path.getsize(path) // _MIN_SAMPLE_BYTES:,}: "
                        "it does not describe these shards. Write it again with `ssl-container shards write`")
    return None


def find_dataset_json(urls: Sequence[str]) -> str | None:
    """The dataset.json beside the (local) shards, if any."""
    path = local_path(urls[0]) if urls else None
    if path is None:
        return None
    candidate = os.path.join(os.path.dirname(os.path.abspath(path)), "dataset.json")
    return candidate if os.path.isfile(candidate) else None


def count_samples_from_metadata(urls: Sequence[str]) -> int | None:
    """Sum of samples of ``urls`` from the dataset.json beside them, or None when it cannot be known.

    Exact when the URLs are whole splits or when dataset.json has per-shard counts (ours does)."""
    meta_path = find_dataset_json(urls)
    if meta_path is None:
        return None
    meta = read_dataset_json(meta_path)
    wanted = [os.path.basename(local_path(u) or u) for u in urls]
    per_shard: dict[str, int] = {}
    whole_splits: dict[frozenset, int] = {}
    for split in meta.get("splits", {}).values():
        names = [os.path.basename(u) for u in expand_urls(split["shards"])]
        whole_splits[frozenset(names)] = int(split["num_samples"])
        for name, n in zip(names, split.get("shard_samples", [])):
            per_shard[name] = int(n)
    if frozenset(wanted) in whole_splits and len(set(wanted)) == len(wanted):
        return whole_splits[frozenset(wanted)]
    if all(w in per_shard for w in wanted):
        return sum(per_shard[w] for w in wanted)
    return None


@dataclass
class DatasetInfo:
    """What a shard set's dataset.json says, in the terms a training script needs (``dataset_info``)."""

    root: str
    classes: list[str]
    splits: dict[str, dict]  # name -> its dataset.json entry
    held_out: str | None  # 'val' where the set has one, else 'test', else its only split besides 'train'
    image_key: str  # webdataset's key for the image member: "jpg", "png" or "jpg;png"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def urls(self, split: str) -> list[str]:
        if split not in self.splits:
            raise ValueError(f"{self.root}: no split {split!r}; its dataset.json lists {sorted(self.splits)}")
        return [os.path.join(self.root, u) for u in expand_urls(self.splits[split]["shards"])]

    def num_shards(self, split: str) -> int:
        return len(self.urls(split))


def dataset_info(root: str | os.PathLike) -> DatasetInfo:
    """A shard set written by ``ssl-container shards write`` (or ../shared/data), read from its dataset.json:
    shard URLs per split, class names, the held-out split and the image extensions its samples use (from
    the first members of the first shard), so one script runs on any such set."""
    root = os.fspath(root)
    meta_path = os.path.join(root, "dataset.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{root}: no dataset.json (a folder written by `ssl-container shards write`)")
    meta = read_dataset_json(meta_path)
    splits = meta.get("splits", {})
    held = next((s for s in ("val", "test") if s in splits), None)
    if held is None and len([s for s in splits if s != "train"]) == 1:
        held = next(s for s in splits if s != "train")
    exts: list[str] = []
    first = next((u for s in splits.values() for u in expand_urls(s["shards"])), None)
    if first is not None:
        with tarfile.open(os.path.join(root, first)) as tf:
            for i, member in enumerate(tf):
                ext = member.name.rsplit(".", 1)[-1]
                if ext.lower() in IMAGE_EXTS and ext not in exts:
                    exts.append(ext)
                if i >= 200:
                    break
    return DatasetInfo(root=root, classes=list(meta.get("classes") or []), splits=splits, held_out=held,
                       image_key=";".join(exts) or "jpg")
