"""The README's first command: DINO pretraining -> k-NN -> export, on CPU, in a few minutes.

    make demo                      (sets up the venv first)
    ssl-container demo [--data DIR] [--steps N] [--seed S] [--eval-subset] [--out runs/demo]
    python -m ssl_container.cli.demo

Real DINO on real images with this project's quarter-width Container-Light (container_light_narrow:
the same blocks and stages; the full network is ~16x the compute): Imagenette from ../shared/data when present; on a
machine without it, Debian's Open Clip Art drawings (``apt-get install openclipart-png``: 6,978 drawings of its 8
largest categories) converted to WebDataset shards with the project's shard writer. Debian's Fashion-MNIST
(``--data fashion-mnist``) is there too, but there raw pixels are a floor this budget does not clear
(docs/performance.md: 80.75 % against 80.70 %). The k-NN top-1 of the pretrained
teacher is printed next to its two floors under the same protocol (eval/protocol.py): the same
backbone at random initialisation and raw pixels; the teacher is exported as safetensors.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import struct
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from eval.features import make_loader, resolve_data
from eval.protocol import KNN_K, EvalSplit, RawPixels, embed, floors, knn_eval, load_split
from ssl_container.cli import DEMO_OUTPUTS, add_demo_arguments, demo_outputs_refusal, demo_recipe
from ssl_container.config import load_config
from ssl_container.data.augment import EvalTransformConfig
from ssl_container.data.shards import write_shards
from ssl_container.export import export, load_backbone
from ssl_container.models import create_model
from ssl_container.train import train
from ssl_container.downstream.visualize import nearest, retrieval_grid, visualize

IMAGE_SIZE = 64  # evaluation resolution, the global-crop size of the recipe
PICTURE_SIZE, PICTURE_IMAGES = 224, 4  # any side divisible by 32: 224 gives 14 x 14 at stage 3, 7 x 7 at stage 4
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
OPENCLIPART = Path("/usr/share/openclipart/png")
# Open Clip Art's categories with 300 drawings or more (the folder is the label); 80 / 20 per category.
CLIPART_CLASSES = ("animals", "computer", "food", "people", "recreation", "shapes", "signs_and_symbols",
                   "transportation")
CLIPART_SIDE = 96  # drawings are scaled to fit and centred on white: the demo trains and evaluates at 64 px


def _candidates(explicit: str | None) -> list[Path]:
    here = Path(__file__).resolve().parents[1]
    paths = [Path(explicit)] if explicit else []
    if os.environ.get("SSL_CONTAINER_DATA"):
        paths.append(Path(os.environ["SSL_CONTAINER_DATA"]))
    paths += [Path.cwd().parent / "shared" / "data", here.parent / "shared" / "data"]
    return paths


def find_data(explicit: str | None, work: Path) -> dict[str, Any]:
    """Train / held-out shards for the demo: Imagenette, else Open Clip Art (else Fashion-MNIST) converted
    to shards. ``explicit="openclipart"`` / ``"fashion-mnist"`` skips the search and uses that fallback
    (``openclipart`` is what a fresh machine gets)."""
    if explicit == "openclipart":
        if not OPENCLIPART.is_dir():
            raise SystemExit("ssl-container demo --data openclipart: install it first: apt-get install openclipart-png")
        return _openclipart_shards(work / "openclipart")
    if explicit == "fashion-mnist":
        if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
            raise SystemExit("ssl-container demo --data fashion-mnist: install it first: apt-get install dataset-fashion-mnist")
        return _fashion_mnist_shards(work / "fashion_mnist")
    for root in _candidates(explicit):
        for folder in (root, root / "imagenette"):
            meta = folder / "dataset.json"
            if meta.is_file():
                splits = json.loads(meta.read_text())["splits"]
                held_out = "val" if "val" in splits else "test"
                return {"name": folder.name, "folder": folder, "train": "train", "held_out": held_out}
    if OPENCLIPART.is_dir():
        return _openclipart_shards(work / "openclipart")
    if (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        return _fashion_mnist_shards(work / "fashion_mnist")
    raise SystemExit(
        "ssl-container demo: no data found. Pass --data DIR (a folder with dataset.json and WebDataset shards, "
        "e.g. ../shared/data/imagenette), set SSL_CONTAINER_DATA, or install Debian's Open Clip Art drawings: "
        "apt-get install openclipart-png"
    )


def _read_idx(path: Path) -> tuple[list[int], bytes]:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = list(struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim]))
    return dims, data[4 + 4 * ndim:]


def _fashion_mnist_shards(out: Path, train_count: int = 6000, test_count: int = 2000) -> dict[str, Any]:
    """Fashion-MNIST (IDX files) -> PNG files + a file list -> shards with dataset.json."""
    # Absolute: the file list's entries are resolved against the list's own folder.
    out = out.resolve()
    if _converted(out):
        return {"name": "fashion_mnist", "folder": out, "train": "train", "held_out": "test"}
    classes = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
    staging = out.parent / "fashion_mnist_png"
    lines: dict[str, list[str]] = {}
    for split, prefix, count in (("train", "train", train_count), ("test", "t10k", test_count)):
        (dims, pixels), (_, labels) = (_read_idx(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz"),
                                       _read_idx(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz"))
        h, w = dims[1], dims[2]
        lines[split] = []
        for i in range(min(count, dims[0])):
            img = Image.frombytes("L", (w, h), pixels[i * h * w:(i + 1) * h * w]).convert("RGB")
            path = staging / split / f"{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
            lines[split].append(f"{path},{labels[i]}")
    _pack(lines, staging, out, name="fashion_mnist", classes=classes)
    return {"name": "fashion_mnist", "folder": out, "train": "train", "held_out": "test"}


def _converted(out: Path) -> bool:
    """True when ``out`` holds a finished conversion; a folder there without dataset.json is not the demo's
    (its own unfinished ones stay in ``<out>.partial``) and is refused rather than overwritten."""
    if (out / "dataset.json").is_file():
        return True
    if out.exists():
        raise SystemExit(f"ssl-container demo: {out} exists but holds no dataset.json, so it is not a shard set the "
                         "demo converted; move it away (or pass another --out) and run again; nothing was changed")
    return False


def _pack(lines: dict[str, list[str]], staging: Path, out: Path, *, name: str, classes: list[str]) -> None:
    """Staged PNGs (``path,label`` per split) -> shards in ``out``. The shards are written beside it and
    renamed into place once every split is in: a conversion stopped half-way leaves no dataset.json that
    the next demo would take for a finished one (it starts over instead)."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for split, entries in lines.items():
        listing = staging / f"{split}.txt"
        listing.write_text("\n".join(entries) + "\n")
        write_shards(str(listing), str(partial), split=split, name=name, classes=classes, max_count=2000)
    os.replace(partial, out)
    shutil.rmtree(staging, ignore_errors=True)


def _on_white(path: Path, side: int = CLIPART_SIDE) -> Image.Image:
    """A drawing (often transparent, of any size) scaled to fit ``side`` and centred on white."""
    with Image.open(path) as img:
        img = img.convert("RGBA")
        img.thumbnail((side, side))
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2), img)
    return canvas


def _stage(job: tuple[Path, Path]) -> str | None:
    """One drawing -> a PNG on white at ``target`` (run in a worker process); the error's name if Pillow
    refuses it."""
    import warnings

    path, target = job
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            _on_white(path).save(target)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return type(err).__name__
    return None


def _openclipart_shards(out: Path, seed: int = 0) -> dict[str, Any]:
    """Open Clip Art's drawings of CLIPART_CLASSES -> PNG files on white + file lists -> shards with
    dataset.json: a fixed 80 / 20 split of every category (shuffled with ``seed``)."""
    out = out.resolve()
    found = {"name": "openclipart", "folder": out, "train": "train", "held_out": "test"}
    if _converted(out):
        return found
    import random

    rng = random.Random(seed)
    staging = out.parent / "openclipart_png"
    lines: dict[str, list[str]] = {"train": [], "test": []}
    jobs = []  # (source, staged PNG, split, label), in the seeded order
    for label, name in enumerate(CLIPART_CLASSES):
        files = sorted((OPENCLIPART / name).rglob("*.png"))
        rng.shuffle(files)
        for i, path in enumerate(files):
            split = "test" if i < len(files) // 5 else "train"
            jobs.append((path, staging / split / f"{name}_{i:05d}.png", split, label))
    for split in lines:
        (staging / split).mkdir(parents=True, exist_ok=True)
    print(f"[demo] converting Debian's Open Clip Art ({OPENCLIPART}, {len(CLIPART_CLASSES)} categories, "
          f"{len(jobs):,} drawings) to shards in {out}: about a minute, once", flush=True)
    # A few drawings are posters of 100 megapixels that take seconds each to decode: one process per core.
    skipped = []
    workers = max(1, min(os.cpu_count() or 1, 8))
    with ProcessPoolExecutor(workers) as pool:
        for (path, target, split, label), error in zip(jobs, pool.map(_stage, [(j[0], j[1]) for j in jobs],
                                                                       chunksize=16)):
            if error:
                skipped.append(f"{path} ({error})")
            else:
                lines[split].append(f"{target},{label}")
    if skipped:
        print(f"[demo] {len(skipped)} drawing(s) skipped (unreadable or too large to decode): {'; '.join(skipped)}",
              flush=True)
    for entries in lines.values():
        rng.shuffle(entries)  # shards mix the categories
    _pack(lines, staging, out, name="openclipart", classes=list(CLIPART_CLASSES))
    return found


def draw_pictures(found: dict[str, Any], teacher: torch.nn.Module, random_backbone: torch.nn.Module, path: Path) -> Path:
    """The first held-out images at 224 px (stage 3 has 14 x 14 positions, stage 4 7 x 7), drawn for the
    pretrained and the random backbone side by side in one titled figure with its legend."""
    source = resolve_data(str(found["folder"]), found["held_out"])
    transform = EvalTransformConfig(resize=PICTURE_SIZE, crop=PICTURE_SIZE)
    images = next(iter(make_loader(source, transform, batch_size=PICTURE_IMAGES)))[0]
    return visualize([teacher, random_backbone], images, path, titles=["DINO teacher", "random init"],
                     title=f"What the DINO teacher sees, beside the same network at random initialisation ({found['name']})",
                     caption=f"Trained at {IMAGE_SIZE} px, where its last stage is a 2 x 2 map; drawn at {PICTURE_SIZE} px so "
                             "that the maps have positions to show. The horizontal stripes the teacher's PCA shows in "
                             "every image (at 128 px too) follow where a position sits vertically (most likely because "
                             "training flips images horizontally only): read these maps for position, not objects. "
                             "retrieval.png shows what the pretraining bought.")




def draw_retrieval(found: dict[str, Any], meta: dict[str, Any], reference, held_out, teacher: torch.nn.Module,
                   random_backbone: torch.nn.Module, path: Path, queries: int = 8, k: int = 5) -> Path:
    """What the k-NN rows measure, as a picture: one held-out image of each of the first classes, with its
    nearest training images (at the k-NN's resolution) under the teacher, random init and raw pixels."""
    labels = held_out.labels
    picks = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)[:queries]]
    sub = EvalSplit(held_out.name, held_out.images[picks], labels[picks], held_out.resolution)
    neighbours = {name: nearest(embed(model, sub), embed(model, reference), k)
                  for name, model in (("DINO teacher", teacher), ("random init", random_backbone),
                                      ("raw pixels", RawPixels()))}
    return retrieval_grid(sub.images, sub.labels, reference.images, reference.labels, neighbours, path,
                          title=f"Nearest training images of held-out {found['name']} images ({IMAGE_SIZE} px, "
                                f"cosine, as the k-NN rows)", class_names=meta.get("classes"))


class DemoOutputExists(RuntimeError):
    pass


def _clear_earlier_outputs(out_dir: Path, overwrite: bool) -> None:
    """Each demo trains from scratch, so an earlier demo's outputs are in the way. They are replaced only
    with ``--overwrite`` (and only those names: anything else in ``out_dir`` stays); otherwise refused
    before anything is written."""
    found = [out_dir / name for name in DEMO_OUTPUTS if (out_dir / name).exists()]
    if not found:
        return
    if not overwrite:
        raise DemoOutputExists(demo_outputs_refusal(out_dir, overwrite))
    for path in found:
        print(f"[demo] --overwrite: replacing {path}", flush=True)
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def run_demo(data: str | None = None, out: str = "runs/demo", steps: int | None = None,
             max_train_shards: int | None = None, max_val_shards: int | None = None, seed: int = 0,
             overwrite: bool = False) -> int:
    t_start = time.perf_counter()
    out_dir = Path(out)
    _clear_earlier_outputs(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    found = find_data(data, out_dir)
    print(f"[demo] data: {found['name']} ({found['folder']})", flush=True)
    meta = json.loads((found["folder"] / "dataset.json").read_text())
    train_urls = [str(found["folder"] / meta["splits"][found["train"]]["shards"])]

    recipe = demo_recipe()
    recipe["data"].pop("urls", None)
    pretrain_dir = out_dir / "pretrain"
    overrides = [f"run_dir={pretrain_dir}", f"data.urls=[{train_urls[0]}]", f"seed={seed}"]
    if steps:
        overrides.append(f"max_steps={steps}")
    cfg = load_config(recipe, overrides)
    c = cfg.data.crops
    crops = f"{c.n_global}x{c.global_size}px" + (f" + {c.n_local}x{c.local_size}px" if c.n_local else "")
    print(f"[demo] 1/3 DINO pretraining of {cfg.model.name}: {cfg.max_steps} steps of {cfg.data.batch_size} images "
          f"({crops} crops), fp32 on CPU", flush=True)
    summary = train(cfg)
    t_train = time.perf_counter() - t_start

    print(f"[demo] 2/3 k-NN (k={KNN_K}, DINO's weighted vote) on held-out images at {IMAGE_SIZE}px: "
          "the teacher against its two floors, random init and raw pixels", flush=True)
    reference = load_split(str(found["folder"]), found["train"], IMAGE_SIZE, max_train_shards)
    held_out = load_split(str(found["folder"]), found["held_out"], IMAGE_SIZE, max_val_shards)
    torch.manual_seed(cfg.seed)
    random_backbone = create_model(cfg.model.name, num_classes=0, **cfg.model.kwargs)
    teacher = load_backbone(pretrain_dir, "teacher")
    rows = {**floors(reference, held_out, [random_backbone]), "dino_teacher": knn_eval(teacher, reference, held_out)}

    pictures = draw_pictures(found, teacher, random_backbone, out_dir / "pictures.png")
    print(f"[demo] pictures: PCA of the feature maps and the stage-4 attention of {PICTURE_IMAGES} held-out images, "
          f"pretrained beside random init: {pictures}", flush=True)
    retrieval = draw_retrieval(found, meta, reference, held_out, teacher, random_backbone, out_dir / "retrieval.png")
    print(f"[demo] retrieval: held-out images and their nearest training images under the teacher, random init and "
          f"raw pixels: {retrieval}", flush=True)

    print("[demo] 3/3 export of the teacher backbone", flush=True)
    export_dir = export(pretrain_dir, out_dir / "export", "teacher", overwrite=True,
                        eval_results={"knn_top1_k20": rows["dino_teacher"]["top1"],
                                      "knn_top1_k20_floor_random_init": rows["random_init"]["top1"],
                                      "knn_top1_k20_floor_raw_pixels": rows["raw_pixels"]["top1"],
                                      "knn_data": found["name"], "knn_resolution": IMAGE_SIZE, "knn_crop_pct": 1.0})
    names = {"random_init": f"randomly initialised {cfg.model.name}", "raw_pixels": f"raw pixels ({IMAGE_SIZE}x{IMAGE_SIZE}x3)",
             "dino_teacher": f"after {summary['steps']} DINO steps (teacher)"}
    report = {
        "data": found["name"], "model": cfg.model.name, "steps": summary["steps"], "train_seconds": round(t_train, 1),
        "knn_k20_top1": {k: r["top1"] for k, r in rows.items()},
        "knn_k20_top5": {k: r["top5"] for k, r in rows.items()},
        "knn_train_images": len(reference), "knn_test_images": len(held_out), "knn_resolution": IMAGE_SIZE,
        # absolute, so the report is usable from any working directory
        "export": str(Path(export_dir).resolve()), "curves": summary.get("curves") and str(Path(summary["curves"]).resolve()),
        "pictures": str(Path(pictures).resolve()), "retrieval": str(Path(retrieval).resolve()),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    (out_dir / "demo.json").write_text(json.dumps(report, indent=1))
    print()
    print(f"  k-NN top-1 / top-5 (k={KNN_K}) on {len(held_out)} held-out {found['name']} images "
          f"({len(reference)} reference images, {IMAGE_SIZE} px):")
    for key in ("random_init", "raw_pixels", "dino_teacher"):
        print(f"    {names[key]:<44} {rows[key]['top1']:6.2f} %  {rows[key]['top5']:6.2f} %")
    best_floor = max(rows["random_init"]["top1"], rows["raw_pixels"]["top1"])
    print(f"  the pretrained teacher is {rows['dino_teacher']['top1'] - best_floor:+.2f} points from the better floor")
    print(f"  exported backbone: {export_dir}/backbone.safetensors")
    print(f"  training curves:   {summary.get('curves')}")
    print(f"  load it:  ssl_container.export.load_backbone('{export_dir}')  or, after import ssl_container,  "
          f"timm.create_model('local-dir:{export_dir}', pretrained=True, num_classes=0)")
    print(f"  total {report['total_seconds']:.0f} s; report in {out_dir / 'demo.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssl-container demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    limits = (3, 1) if args.eval_subset else (None, None)
    try:
        return run_demo(args.data, args.out, args.steps, *limits, seed=args.seed, overwrite=args.overwrite)
    except DemoOutputExists as err:
        print(f"ssl-container demo: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
