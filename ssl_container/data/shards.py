"""Write and verify WebDataset shards with a ``dataset.json`` like ../shared/data's.

``write_shards`` turns an ImageFolder tree (``root/<class>/<image>``), a file list (lines ``path[,label]``)
or existing shards into shuffled shards ``<split>-NNNNNN.tar`` of ``<key>.<ext>`` image bytes (copied, never
re-encoded) plus ``<key>.cls``. The output is a pure function of the inputs and the seed (fixed tar
headers), every file is written to a temporary name and renamed, and ``dataset.json`` is written last:
re-running after a crash, or to rewrite one split, is safe.

``verify_shards`` checks every shard's sha256 against ``dataset.json``, decodes every image, checks labels
and counts, and returns a report listing each problem by shard and key.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from ssl_container.data.augment import BadImageError, decode_rgb
from ssl_container.utils.files import atomic_path, atomic_write_json, sha256_file
from ssl_container.utils.progress import Progress
from ssl_container.data.sources import (
    INCOMPLETE,
    dataset_json_problem,
    read_dataset_json,
    BadDataCounter,
    expand_urls,
    find_dataset_json,
    image_ext,
    iter_tar_samples,
    local_path,
)

log = logging.getLogger("ssl_container.data.shards")

FOLDER_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".ppm": "ppm", ".bmp": "bmp",
               ".tif": "tiff", ".tiff": "tiff"}
FORMAT = "webdataset: <key>.<image ext> (image bytes) + <key>.cls (class index, ASCII)"


@dataclass
class _Item:
    """One sample to write: its members are produced lazily so that only one shard is in memory."""

    key: str | None  # None: assign <name>_<split>_<index> after shuffling
    read: Callable[[], dict[str, bytes]]
    size: int  # bytes it takes in a tar (headers and padding included), for the shard byte limit


# ------------------------------------------------------------------------------------------------
# sources


def items_from_folder(root: str) -> tuple[list[_Item], list[str], list[str]]:
    """ImageFolder: one sub-directory per class (sorted names = class indices), images anywhere below.
    Returns the items, the classes and the files left out for their extension (listed as skipped)."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root}: no class sub-directories (expected root/<class>/<image>)")
    items, others = [], []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls)):
            dirnames.sort()
            for fn in sorted(filenames):
                path = os.path.join(dirpath, fn)
                ext = FOLDER_EXTS.get(os.path.splitext(fn)[1].lower())
                if ext is not None:
                    items.append(_file_item(path, ext, label))
                else:
                    others.append(path)
    if others:
        log.warning("%s: %d files are not images by their extension and are left out (e.g. %s); images are %s",
                    root, len(others), others[0], " ".join(sorted(set(FOLDER_EXTS))))
    if not items:
        raise ValueError(f"{root}: no images with extensions {sorted(FOLDER_EXTS)}")
    return items, classes, others


def items_from_list(list_path: str, classes: Sequence[str] | None = None) -> tuple[list[_Item], list[str] | None]:
    """Lines ``path[,label]`` (label: an index or a class name; relative paths from the list's folder)."""
    base = os.path.dirname(os.path.abspath(list_path))
    rows: list[tuple[str, str | None]] = []
    with open(list_path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path, _, label = line.partition(",")
            rows.append((os.path.join(base, path.strip()), label.strip() or None))
    labels = [lab for _, lab in rows if lab is not None]
    if labels and not all(re.fullmatch(r"\d+", lab) for lab in labels):
        classes = list(classes) if classes else sorted(set(labels))
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise ValueError(f"{list_path}: labels {unknown[:5]} are not among the classes")
        to_int = index.__getitem__
    else:
        to_int = int
    items = []
    for path, label in rows:
        ext = FOLDER_EXTS.get(os.path.splitext(path)[1].lower())
        if ext is None:
            raise ValueError(f"{list_path}: {path} is not an image file ({sorted(FOLDER_EXTS)})")
        items.append(_file_item(path, ext, None if label is None else to_int(label)))
    return items, (list(classes) if classes else None)


def _file_item(path: str, ext: str, label: int | None) -> _Item:
    def read() -> dict[str, bytes]:
        with open(path, "rb") as f:
            sample = {ext: f.read(), "src": os.path.abspath(path).encode()}
        if label is not None:
            sample["cls"] = str(label).encode()
        return sample

    return _Item(None, read, _tar_bytes(os.path.getsize(path)) + 1024 + (1024 if label is not None else 0))


def items_from_shards(urls: str | Sequence[str]) -> tuple[list[_Item], list[str] | None]:
    """Existing shards (any URL gopen opens): local uncompressed tars are indexed and read by offset, the
    rest is held in memory. Keys are kept when unique. Classes come from a dataset.json beside them."""
    shard_urls = expand_urls(urls)
    problem = dataset_json_problem(shard_urls)
    if problem:  # a half-swapped set read as a source would pass its mix of old and new shards on
        raise ValueError(problem)
    items: list[_Item] = []
    for url in shard_urls:
        path = local_path(url)
        if path is not None and not path.endswith((".gz", ".tgz")):
            items.extend(_index_tar(path))
        else:
            counter = BadDataCounter(1.0)
            for sample in iter_tar_samples(url, counter, need_image=False):
                members = {k: v for k, v in sample.items() if not k.startswith("__")}
                items.append(_Item(sample["__key__"], (lambda m=members: m),
                                   sum(_tar_bytes(len(v)) for v in members.values())))
            if counter.bad:
                raise ValueError(f"{url}: cannot read every sample ({counter.summary()}); see the log")
    classes = None
    meta = find_dataset_json(shard_urls)
    if meta is not None:
        classes = read_dataset_json(meta).get("classes")
    return items, classes


def _index_tar(path: str) -> list[_Item]:
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isreg():
                continue
            key, dot, ext = os.path.basename(m.name).partition(".")
            if dot and not key.startswith("__"):
                groups.setdefault(os.path.join(os.path.dirname(m.name), key), {})[ext.lower()] = (m.offset_data, m.size)

    def reader(members: dict[str, tuple[int, int]]) -> Callable[[], dict[str, bytes]]:
        def read() -> dict[str, bytes]:
            out = {}
            with open(path, "rb") as f:
                for ext, (off, size) in members.items():
                    f.seek(off)
                    out[ext] = f.read(size)
            return out
        return read

    return [_Item(k, reader(m), sum(_tar_bytes(s) for _, s in m.values())) for k, m in groups.items()]


def detect_source_kind(source: str | Sequence[str]) -> str:
    if not isinstance(source, str):
        return "shards"
    if os.path.isdir(source):
        return "folder"
    if os.path.isfile(source) and source.endswith((".txt", ".csv", ".lst", ".list")):
        return "list"
    return "shards"


# ------------------------------------------------------------------------------------------------
# writing


def _tar_bytes(size: int) -> int:
    return 512 + (size + 511) // 512 * 512  # header + data padded to blocks


def _tar_file_size(content: int) -> int:
    return (content + 1024 + 10239) // 10240 * 10240  # end-of-archive blocks, padded to tarfile's record


def _write_tar(path: str, samples: Iterator[tuple[str, dict[str, bytes]]]) -> tuple[int, str]:
    """Write atomically with fixed headers (reproducible bytes); returns (samples, sha256)."""
    n = 0
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tf:
            for key, members in samples:
                for ext in sorted(members):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(members[ext]), 0, 0o444
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tf.addfile(info, io.BytesIO(members[ext]))
                n += 1
        digest = sha256_file(str(tmp))
    return n, digest


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _image_problem(sample: dict[str, bytes]) -> str | None:
    """Why the sample's image cannot be read (None when PIL decodes it whole). A full decode: a truncated
    JPEG passes PIL's header check and would only fail in the loader, one sample at a time."""
    from PIL import Image, UnidentifiedImageError

    ext = image_ext(sample)
    if ext is None:
        return "no image member"
    data = sample[ext]
    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (64, 64))  # JPEG: decode at a reduced scale; every byte of the stream is still read
            im.load()
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except Exception as err:  # PIL raises a variety of errors for damaged files
        return f"damaged image ({type(err).__name__}: {str(err)[:120]})"
    return None


def _safe_key(key: str) -> bool:
    """A member name stays inside the tar: not absolute, no '..' component (folders are fine)."""
    return bool(key) and not key.startswith(("/", "\\")) and ".." not in re.split(r"[/\\]", key)


def write_shards(source: str | Sequence[str], out_dir: str, *, split: str = "train", name: str | None = None,
                 max_count: int = 1000, max_bytes: int | None = 1 << 30, seed: int = 0,
                 source_kind: str = "auto", classes: Sequence[str] | None = None, strict: bool = False) -> dict:
    """Shuffle ``source`` with ``seed`` into ``out_dir/<split>-NNNNNN.tar`` and record it in dataset.json.

    A shard closes at ``max_count`` samples or before it would exceed ``max_bytes``. Returns the split's
    dataset.json entry (shard pattern, counts per shard).

    Each source must be an image PIL can identify: an empty file, a text file named ``.jpg`` and the
    like are skipped, counted and listed with their path in the entry's ``skipped`` (``strict``:
    refused instead). Each sample records its source path as its ``src`` member."""
    kind = detect_source_kind(source) if source_kind == "auto" else source_kind
    if os.path.exists(os.path.join(out_dir, "dataset.json")):
        read_dataset_json(os.path.join(out_dir, "dataset.json"))  # a broken one is refused before any work
        if _finish_interrupted_swap(out_dir, split) and kind == "shards":
            source = _same_split_now(source, out_dir, split)
    left_out: list[str] = []
    if kind == "folder":
        items, found_classes, left_out = items_from_folder(str(source))
    elif kind == "list":
        items, found_classes = items_from_list(str(source), classes)
    elif kind == "shards":
        items, found_classes = items_from_shards(source)
    else:
        raise ValueError(f"unknown source kind {kind!r} (folder, list, shards)")
    classes = list(classes) if classes else found_classes
    if max_count < 1:
        raise ValueError("max_count must be >= 1")
    if not _SAFE_NAME.fullmatch(split):
        raise ValueError(f"split {split!r} is not a plain name (letters, digits, '_', '-', '.'; no '/' or '..'): "
                         "it names the shard files inside out_dir, e.g. --split train")
    if strict:  # refuse before a shard is (over)written: every source is read twice, once here
        for it in items:
            sample = it.read()
            problem = _image_problem(sample)
            if problem is not None:
                where = sample.get("src", b"").decode(errors="replace") or it.key or "a sample"
                raise ValueError(f"{where}: {problem}. Fix or remove it, or leave out --strict to skip such files "
                                 "(they are counted and listed in dataset.json); nothing was written")

    os.makedirs(out_dir, exist_ok=True)
    for leftover in os.listdir(out_dir):  # temporary files of an interrupted earlier run (only ours match)
        if re.fullmatch(rf"\.(?:{re.escape(split)}-\d{{6}}\.tar|dataset\.json)\..+\.tmp", leftover):
            os.unlink(os.path.join(out_dir, leftover))
    # The new shards are written beside, in a staging folder, and swapped in only once all are complete:
    # the old set (possibly the very shards being re-shuffled) stays untouched and readable until then.
    staging = os.path.join(out_dir, f".{split}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    name = name or os.path.basename(os.path.abspath(out_dir))
    order = np.random.default_rng(seed).permutation(len(items))
    width = max(6, len(str(len(items) - 1)))
    keep_keys = all(it.key is not None for it in items) and len({it.key for it in items}) == len(items)
    if keep_keys and not all(_safe_key(it.key) for it in items):
        keep_keys = False  # a source key with '/' or '..' would become a path inside the tar: renumber instead

    # plan the shards (counts and byte limits) before writing anything
    plan: list[list[int]] = [[]]
    size = 0
    for idx in order:
        b = items[idx].size
        if plan[-1] and (len(plan[-1]) >= max_count or
                         (max_bytes is not None and _tar_file_size(size + b) > max_bytes)):
            plan.append([])
            size = 0
        plan[-1].append(int(idx))
        size += b

    skipped: list[dict[str, str]] = [{"source": p, "problem": "not an image by its extension"} for p in left_out]

    def samples(indices: list[int], first: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        j = 0
        for idx in indices:
            sample = items[idx].read()
            problem = _image_problem(sample)
            if problem is not None:
                where = sample.get("src", b"").decode(errors="replace") or items[idx].key or f"item {idx}"
                skipped.append({"source": where, "problem": problem})
                log.warning("skipping %s: %s", where, problem)
                continue
            key = items[idx].key if keep_keys else f"{name}_{split}_{first + j:0{width}d}"
            j += 1
            yield key, sample

    shard_names, shard_samples, digests = [], [], {}
    first = 0
    try:
        with Progress(len(plan), f"shards {split}", "shard") as bar:
            for i, indices in enumerate(plan):
                fname = f"{split}-{i:06d}.tar"
                n, digest = _write_tar(os.path.join(staging, fname), samples(indices, first))
                shard_names.append(fname)
                shard_samples.append(n)
                digests[fname] = digest
                first += n
                bar.update()
    except BaseException:  # a full disk, a stop signal: the old set stays as it was, nothing half-written is left
        shutil.rmtree(staging, ignore_errors=True)
        raise

    meta_path = os.path.join(out_dir, "dataset.json")
    meta: dict = {}
    if os.path.exists(meta_path):
        meta = read_dataset_json(meta_path)
    old = meta.get("splits", {}).get(split)
    stale = set(os.path.basename(u) for u in expand_urls(old["shards"])) - set(shard_names) if old else set()
    entry = {"shards": f"{split}-{{000000..{len(plan) - 1:06d}}}.tar", "num_shards": len(plan),
             "num_samples": first, "shard_samples": shard_samples, "seed": seed}
    if skipped:
        entry["skipped"] = skipped  # unreadable sources, by path, so they can be fixed and the split rewritten
        log.warning("%d of %d sources were not readable images and were skipped (listed in %s under splits.%s.skipped)",
                    len(skipped), len(items) + len(left_out), os.path.join(out_dir, "dataset.json"), split)
    meta.setdefault("name", name)
    meta["format"] = FORMAT
    if classes is not None:
        meta["classes"] = list(classes)
    meta.setdefault("splits", {})[split] = entry
    sha = {k: v for k, v in meta.get("sha256", {}).items() if k not in stale}
    sha.update(digests)
    meta["sha256"] = dict(sorted(sha.items()))
    # The staging folder is complete from here on: what a rerun needs to finish an interrupted swap.
    atomic_write_json(os.path.join(staging, _STAGED), {"names": shard_names, "stale": sorted(stale), "meta": meta})
    _swap_in(out_dir, staging, split, shard_names, stale, meta)
    return entry


_STAGED = "staged.json"  # in the staging folder: written once every new shard is there


def _same_split_now(source: str | Sequence[str], out_dir: str, split: str) -> str | Sequence[str]:
    """An in-place source (this very split's shards) after a finished swap: the split as it now is (the
    rerun's pattern names the old set's shard count)."""
    urls = expand_urls(source)
    if all(os.path.dirname(os.path.abspath(local_path(u) or u)) == os.path.abspath(out_dir) and
           re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", os.path.basename(u)) for u in urls):
        entry = read_dataset_json(os.path.join(out_dir, "dataset.json"))["splits"][split]
        return os.path.join(out_dir, entry["shards"])
    return source


def _finish_interrupted_swap(out_dir: str, split: str) -> bool:
    """A split that dataset.json marks incomplete was stopped while its new shards moved in: finish that
    swap from the staging folder (complete by then) before anything else reads or rewrites the split."""
    entry = read_dataset_json(os.path.join(out_dir, "dataset.json")).get("splits", {}).get(split)
    if not (isinstance(entry, dict) and entry.get("incomplete")):
        return False
    staging = os.path.join(out_dir, f".{split}.staging")
    staged = os.path.join(staging, _STAGED)
    if not os.path.isfile(staged):
        raise ValueError(f"{out_dir}: split '{split}' is marked incomplete and {staging} does not hold the complete new "
                         "set to finish it with: write the split again from its original source")
    with open(staged) as f:
        plan = json.load(f)
    log.warning("%s: finishing the interrupted swap of split %s from %s", out_dir, split, staging)
    names = [n for n in plan["names"] if os.path.exists(os.path.join(staging, n))]
    _swap_in(out_dir, staging, split, names, set(plan["stale"]), plan["meta"])
    return True


def _swap_in(out_dir: str, staging: str, split: str, names: list[str], stale: set[str], meta: dict) -> None:
    """Replace a split's shards with the complete new set in ``staging``, all or nothing for readers:
    while files move, dataset.json marks the split incomplete (readers refuse it, naming the fix, and
    the next ``shards write`` finishes it from the staging folder); the new dataset.json, written last,
    clears the mark."""
    meta_path = os.path.join(out_dir, "dataset.json")
    if os.path.exists(meta_path):
        current = read_dataset_json(meta_path)
        if split in current.get("splits", {}):
            current["splits"][split]["incomplete"] = INCOMPLETE
            atomic_write_json(meta_path, current)
    for fname in names:
        os.replace(os.path.join(staging, fname), os.path.join(out_dir, fname))
    for fname in stale:  # shards of an earlier, larger run of this split
        path = os.path.join(out_dir, fname)
        if os.path.exists(path):
            os.unlink(path)
    atomic_write_json(meta_path, meta)
    shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# verification


@dataclass
class VerifyReport:
    shards: list[dict] = field(default_factory=list)  # url, samples, sha256_ok (None: no digest known)
    problems: list[dict] = field(default_factory=list)  # shard, key, kind, detail

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "num_shards": len(self.shards),
                "num_samples": sum(s["samples"] for s in self.shards), **asdict(self)}


def _verify_shard(url: str, expected_sha: str | None, decode: bool, num_classes: int | None) -> dict:
    problems: list[dict] = []
    path = local_path(url)
    sha_ok = None
    if path is not None and not os.path.exists(path):
        return {"url": url, "samples": 0, "sha256_ok": False,
                "problems": [{"shard": url, "key": None, "kind": "missing_shard", "detail": "no such file"}]}
    if expected_sha is not None and path is not None:
        sha_ok = sha256_file(path) == expected_sha
        if not sha_ok:
            problems.append({"shard": url, "key": None, "kind": "sha256_mismatch",
                             "detail": f"expected {expected_sha}"})
    counter = BadDataCounter(1.0, log_first=0, log_interval_s=float("inf"), keep_events=True)
    n = 0
    for sample in iter_tar_samples(url, counter, need_image=True):
        n += 1
        key = sample["__key__"]
        if decode:
            try:
                decode_rgb(sample[image_ext(sample)])
            except BadImageError as exn:
                src = sample.get("src", b"").decode(errors="replace")
                problems.append({"shard": url, "key": key, "kind": exn.kind, "detail": str(exn)[:300],
                                 **({"source": src} if src else {})})
        if "cls" in sample:
            try:
                label = int(sample["cls"].decode("ascii").strip())
                if num_classes is not None and not 0 <= label < num_classes:
                    raise ValueError(f"label {label} outside [0, {num_classes})")
            except (ValueError, UnicodeDecodeError) as exn:
                problems.append({"shard": url, "key": key, "kind": "bad_label", "detail": str(exn)[:300]})
    problems.extend({"shard": e[1], "key": e[2], "kind": e[0], "detail": e[3]} for e in counter.events)
    return {"url": url, "samples": n, "sha256_ok": sha_ok, "problems": problems}


def verify_shards(path: str, *, splits: Sequence[str] | None = None, decode: bool = True,
                  workers: int = 1) -> VerifyReport:
    """``path``: a dataset folder or its dataset.json (digests, counts and labels are checked), or a shard
    pattern (decode only, plus digests when a dataset.json beside the shards lists them)."""
    meta, base = None, None
    if os.path.isdir(path) or path.endswith("dataset.json"):
        meta_path = path if path.endswith("dataset.json") else os.path.join(path, "dataset.json")
        with open(meta_path) as f:
            meta = json.load(f)
        base = os.path.dirname(os.path.abspath(meta_path))
        names = list(splits) if splits else list(meta["splits"])
        jobs = [(s, [os.path.join(base, os.path.basename(u)) for u in expand_urls(meta["splits"][s]["shards"])])
                for s in names]
    else:
        urls = expand_urls(path)
        meta_path = find_dataset_json(urls)
        if meta_path is not None:
            with open(meta_path) as f:
                meta = json.load(f)
        jobs = [(None, urls)]
    digests = (meta or {}).get("sha256", {})
    num_classes = len(meta["classes"]) if meta and meta.get("classes") else None
    report = VerifyReport()
    args = [(u, digests.get(os.path.basename(u)), decode, num_classes) for _, urls in jobs for u in urls]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_verify_shard, *zip(*args)))
    else:
        results = [_verify_shard(*a) for a in args]
    by_url = {r["url"]: r for r in results}
    for split, urls in jobs:
        total = 0
        for u in urls:
            r = by_url[u]
            report.problems.extend(r.pop("problems"))
            report.shards.append(r)
            total += r["samples"]
        if split is not None:
            entry = meta["splits"][split]
            expected = [int(x) for x in entry.get("shard_samples", [])]
            for u, n in zip(urls, expected):
                if by_url[u]["samples"] != n:
                    report.problems.append({"shard": u, "key": None, "kind": "count_mismatch",
                                            "detail": f"{by_url[u]['samples']} samples, dataset.json says {n}"})
            if total != int(entry["num_samples"]):
                report.problems.append({"shard": split, "key": None, "kind": "count_mismatch",
                                        "detail": f"split {split}: {total} samples, dataset.json says "
                                                  f"{entry['num_samples']}"})
    return report
