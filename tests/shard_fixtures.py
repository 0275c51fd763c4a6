"""Small synthetic and broken shards, real JPEGs from ../shared/data when present: the tests' fixtures."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_container.data.shards import sha256_file


def shared_data_dir() -> Path | None:
    """../shared/data relative to the repository root (or $SSL_CONTAINER_DATA), if present."""
    env = os.environ.get("SSL_CONTAINER_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return path if path.is_dir() else None


def synthetic_jpeg(rng: np.random.Generator, height: int = 40, width: int = 48, quality: int = 90) -> bytes:
    """A smooth random colour image (gradients + blobs + a little noise), JPEG-encoded."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        a, b, ph = rng.uniform(-3, 3, size=3)
        img[..., c] = 128 + 90 * np.sin(a * x / width * np.pi + b * y / height * np.pi + ph)
    cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(3, max(4, width / 3))
    img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, size=3)
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_tar(path: str | Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A plain tar of ``key.ext`` members (no checks: tests use it to build broken shards too)."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def write_synthetic_shards(out_dir: str | Path, n_shards: int = 4, per_shard: int = 12, *, split: str = "train",
                           name: str = "synth", size: tuple[int, int] = (40, 48), num_classes: int = 3,
                           seed: int = 0, dataset_json: bool = True) -> str:
    """``n_shards`` shards of ``per_shard`` samples with keys ``<name>_<split>_<index>``; returns the pattern."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names, counts = [], []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            idx = s * per_shard + i
            samples.append((f"{name}_{split}_{idx:06d}", {"jpg": synthetic_jpeg(rng, *size),
                                                         "cls": str(idx % num_classes).encode()}))
        fname = f"{split}-{s:06d}.tar"
        write_tar(out_dir / fname, samples)
        names.append(fname)
        counts.append(per_shard)
    pattern = str(out_dir / f"{split}-{{000000..{n_shards - 1:06d}}}.tar")
    if dataset_json:
        meta_path = out_dir / "dataset.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"name": name}
        meta["classes"] = [f"class{c}" for c in range(num_classes)]
        meta.setdefault("splits", {})[split] = {"shards": f"{split}-{{000000..{n_shards - 1:06d}}}.tar",
                                                "num_shards": n_shards, "num_samples": n_shards * per_shard,
                                                "shard_samples": counts}
        meta.setdefault("sha256", {}).update({n: sha256_file(str(out_dir / n)) for n in names})
        meta_path.write_text(json.dumps(meta, indent=1))
    return pattern


def real_jpegs(n: int) -> list[tuple[str, bytes, int]] | None:
    """The first ``n`` (key, JPEG bytes, label) of the shared Imagenette train split, or None if absent."""
    root = shared_data_dir()
    shard = root / "imagenette" / "train-000000.tar" if root else None
    if shard is None or not shard.exists():
        return None
    out: dict[str, dict] = {}
    with tarfile.open(shard) as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
            if len(out) > n:
                break
    return [(k, v["jpg"], int(v["cls"])) for k, v in list(out.items())[:n] if "jpg" in v and "cls" in v]
