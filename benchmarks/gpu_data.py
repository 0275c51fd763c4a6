"""A small shard subset of a labelled dataset folder, to carry to a GPU machine that has no copy of it.

    python benchmarks/gpu_data.py --src ../shared/data/imagenette --out .gpu_data/imagenette \
        [--train-shards 5] [--val-shards 1]

Copies the first N shards of each split unchanged and writes a ``dataset.json`` that describes the
subset (shard pattern, sample counts, sha256 per shard), so every reader of the folder (the trainer,
``eval``, ``benchmarks/learning.py``) takes it as it takes the full one. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tarfile
from pathlib import Path



from braceexpand import braceexpand  # noqa: E402


def _samples(tar: Path) -> int:
    with tarfile.open(tar) as t:
        return len({m.name.rsplit(".", 1)[0] for m in t.getmembers() if m.isfile()})


def subset(src: Path, out: Path, counts: dict[str, int]) -> dict:
    meta = json.loads((src / "dataset.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    splits, sums = {}, {}
    for split, n in counts.items():
        if split not in meta["splits"]:
            raise SystemExit(f"{src} has no split {split!r} (it has {', '.join(meta['splits'])})")
        shards = [Path(u) for u in braceexpand(str(src / meta["splits"][split]["shards"]))][:n]
        if not shards:
            raise SystemExit(f"{src}: split {split!r} has no shards")
        samples = 0
        for shard in shards:
            shutil.copyfile(shard, out / shard.name)
            sums[shard.name] = hashlib.sha256((out / shard.name).read_bytes()).hexdigest()
            samples += _samples(out / shard.name)
        stem = shards[0].name.split("-")[0]
        pattern = f"{stem}-{{000000..{len(shards) - 1:06d}}}.tar" if len(shards) > 1 else shards[0].name
        splits[split] = {"shards": pattern, "num_shards": len(shards), "num_samples": samples}
    new = {**meta, "splits": splits, "sha256": sums, "subset_of": str(src.resolve())}
    (out / "dataset.json").write_text(json.dumps(new, indent=1))
    size = sum((out / name).stat().st_size for name in sums)
    return {"out": str(out), **{f"{k}_samples": v["num_samples"] for k, v in splits.items()}, "mib": round(size / 2**20, 1)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="../shared/data/imagenette")
    p.add_argument("--out", default=".gpu_data/imagenette")
    p.add_argument("--train-shards", type=int, default=5)
    p.add_argument("--val-shards", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(json.dumps(subset(Path(args.src), Path(args.out), {"train": args.train_shards, "val": args.val_shards})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
