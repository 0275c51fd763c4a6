"""The README's first command: DINO pretraining -> k-NN -> export, on CPU, in a few minutes.

    make demo                      (sets up the venv first)
    ssl-container demo [--data DIR] [--steps N] [--out runs/demo]
    python -m launch.demo

Real Container-Light, real DINO, real images: Imagenette from ../shared/data when present; on a
machine without it, Debian's Fashion-MNIST package (``apt-get install dataset-fashion-mnist``),
converted to WebDataset shards with the project's shard writer. The k-NN top-1 of the pretrained
teacher is printed next to that of the same backbone at random initialisation, and the teacher is
exported as safetensors for fine-tuning.
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
from pathlib import Path
from typing import Any

# The demo recipe, embedded so the demo runs from any folder; configs/demo.yaml is the same recipe
# as a file (a test keeps the two equal).
DEMO_RECIPE: dict[str, Any] = {
    "run_dir": "runs/demo/pretrain",
    "epochs": 1,
    "max_steps": 100,
    "model": {"name": "container_light", "drop_path_rate": 0.0},
    "head": {"out_dim": 4096, "hidden_dim": 1024, "bottleneck_dim": 128},
    "optim": {"lr": 2.0e-3, "warmup_epochs": 0, "weight_decay": 0.04, "weight_decay_end": 0.04},
    "dino": {"momentum_teacher": 0.99, "freeze_last_layer": 0},
    "data": {"batch_size": 32, "num_workers": 1, "shuffle_buffer": 500, "samples_per_epoch": 3200,
             "crops": {"global_size": 64, "n_local": 4, "local_size": 32}},
    "engine": {"precision": "fp32"},
    "checkpoint": {"every_steps": 50},
    "logging": {"every_steps": 10, "tensorboard": False},
}
IMAGE_SIZE = 64  # evaluation resolution, the global-crop size of the recipe
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _candidates(explicit: str | None) -> list[Path]:
    here = Path(__file__).resolve().parents[1]
    paths = [Path(explicit)] if explicit else []
    if os.environ.get("SSL_CONTAINER_DATA"):
        paths.append(Path(os.environ["SSL_CONTAINER_DATA"]))
    paths += [Path.cwd().parent / "shared" / "data", here.parent / "shared" / "data"]
    return paths


def find_data(explicit: str | None, work: Path) -> dict[str, Any]:
    """Train / held-out shards for the demo: Imagenette, else Fashion-MNIST converted to shards."""
    for root in _candidates(explicit):
        for folder in (root, root / "imagenette"):
            meta = folder / "dataset.json"
            if meta.is_file():
                splits = json.loads(meta.read_text())["splits"]
                held_out = "val" if "val" in splits else "test"
                return {"name": folder.name, "folder": folder, "train": "train", "held_out": held_out}
    if (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        return _fashion_mnist_shards(work / "fashion_mnist")
    raise SystemExit(
        "ssl-container demo: no data found. Pass --data DIR (a folder with dataset.json and WebDataset shards, "
        "e.g. ../shared/data/imagenette), set SSL_CONTAINER_DATA, or install Debian's Fashion-MNIST: "
        "apt-get install dataset-fashion-mnist"
    )


def _read_idx(path: Path) -> tuple[list[int], bytes]:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = list(struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim]))
    return dims, data[4 + 4 * ndim:]


def _fashion_mnist_shards(out: Path, train_count: int = 6000, test_count: int = 2000) -> dict[str, Any]:
    """Fashion-MNIST (IDX files) -> PNG files + a file list -> shards with dataset.json."""
    if (out / "dataset.json").is_file():
        return {"name": "fashion_mnist", "folder": out, "train": "train", "held_out": "test"}
    from PIL import Image

    from ssl_container.data.shards import write_shards

    classes = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
    staging = out.parent / "fashion_mnist_png"
    for split, prefix, count in (("train", "train", train_count), ("test", "t10k", test_count)):
        (dims, pixels), (_, labels) = (_read_idx(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz"),
                                       _read_idx(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz"))
        h, w = dims[1], dims[2]
        lines = []
        for i in range(min(count, dims[0])):
            img = Image.frombytes("L", (w, h), pixels[i * h * w:(i + 1) * h * w]).convert("RGB")
            path = staging / split / f"{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
            lines.append(f"{path},{labels[i]}")
        listing = staging / f"{split}.txt"
        listing.write_text("\n".join(lines) + "\n")
        write_shards(str(listing), str(out), split=split, name="fashion_mnist", classes=classes, max_count=2000)
    shutil.rmtree(staging, ignore_errors=True)
    return {"name": "fashion_mnist", "folder": out, "train": "train", "held_out": "test"}


def _knn(backbone, data: dict[str, Any], max_train_shards: int, max_val_shards: int) -> dict[str, float]:
    from eval.features import DataSource, get_features, resolve_data
    from eval.knn import knn_classify

    from ssl_container.data.augment import EvalTransformConfig

    transform = EvalTransformConfig(resize=IMAGE_SIZE, crop=IMAGE_SIZE)
    feats = {}
    for split, limit in ((data["train"], max_train_shards), (data["held_out"], max_val_shards)):
        src = resolve_data(str(data["folder"]), split)
        src = DataSource(src.name, urls=src.urls[:limit], classes=src.classes)
        feats[split] = get_features(backbone, src, transform, cache_dir=None, batch_size=128, num_workers=1)
    train, test = feats[data["train"]], feats[data["held_out"]]
    result = knn_classify(train.features, train.labels, test.features, test.labels, ks=(10, 20))
    return {"top1": result.top1[20], "top5": result.top5[20], "num_train": result.num_train, "num_test": result.num_test}


def run_demo(data: str | None = None, out: str = "runs/demo", steps: int | None = None,
             max_train_shards: int = 3, max_val_shards: int = 1) -> int:
    import torch

    from ssl_container.config import load_config
    from ssl_container.export import export, load_backbone
    from ssl_container.models import create_model
    from ssl_container.train import train

    t_start = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    found = find_data(data, out_dir)
    print(f"[demo] data: {found['name']} ({found['folder']})", flush=True)
    meta = json.loads((found["folder"] / "dataset.json").read_text())
    train_urls = [str(found["folder"] / meta["splits"][found["train"]]["shards"])]

    recipe = json.loads(json.dumps(DEMO_RECIPE))
    pretrain_dir = out_dir / "pretrain"
    if pretrain_dir.exists():  # each demo starts from scratch rather than resuming the last one
        shutil.rmtree(pretrain_dir)
    overrides = [f"run_dir={pretrain_dir}", f"data.urls=[{train_urls[0]}]"]
    if steps:
        overrides.append(f"max_steps={steps}")
    cfg = _config_from_recipe(recipe, overrides)
    print(f"[demo] 1/3 DINO pretraining of container_light: {cfg.max_steps} steps of {cfg.data.batch_size} images "
          f"({cfg.data.crops.n_global}x{cfg.data.crops.global_size}px + {cfg.data.crops.n_local}x"
          f"{cfg.data.crops.local_size}px crops), fp32 on CPU", flush=True)
    summary = train(cfg)
    t_train = time.perf_counter() - t_start

    print(f"[demo] 2/3 k-NN (k=20, DINO's weighted vote) on held-out images at {IMAGE_SIZE}px", flush=True)
    torch.manual_seed(cfg.seed)
    random_backbone = create_model(cfg.model.name, num_classes=0).eval()
    teacher = load_backbone(pretrain_dir, "teacher").eval()
    knn_random = _knn(random_backbone, found, max_train_shards, max_val_shards)
    knn_dino = _knn(teacher, found, max_train_shards, max_val_shards)

    print("[demo] 3/3 export of the teacher backbone", flush=True)
    export_dir = export(pretrain_dir, out_dir / "export", "teacher", overwrite=True,
                        eval_results={"knn_top1_k20": knn_dino["top1"], "knn_data": found["name"],
                                      "knn_resolution": IMAGE_SIZE})
    report = {
        "data": found["name"], "steps": summary["steps"], "train_seconds": round(t_train, 1),
        "knn_k20_top1": {"random_init": knn_random["top1"], "dino_teacher": knn_dino["top1"]},
        "knn_k20_top5": {"random_init": knn_random["top5"], "dino_teacher": knn_dino["top5"]},
        "knn_train_images": knn_dino["num_train"], "knn_test_images": knn_dino["num_test"],
        "export": str(export_dir), "curves": summary.get("curves"),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    (out_dir / "demo.json").write_text(json.dumps(report, indent=1))
    print()
    print(f"  k-NN top-1 (k=20) on {knn_dino['num_test']} held-out {found['name']} images "
          f"({knn_dino['num_train']} reference images):")
    print(f"    randomly initialised Container-Light   {knn_random['top1']:6.2f} %")
    print(f"    after {summary['steps']:>4} DINO steps (teacher)      {knn_dino['top1']:6.2f} %")
    print(f"  exported backbone: {export_dir}/backbone.safetensors")
    print(f"  training curves:   {summary.get('curves')}")
    print(f"  load it:  ssl_container.export.load_backbone('{export_dir}')  or  timm.create_model("
          f"'container_light', pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file="
          f"'{export_dir}/backbone.safetensors'))")
    print(f"  total {report['total_seconds']:.0f} s; report in {out_dir / 'demo.json'}")
    return 0


def _config_from_recipe(recipe: dict[str, Any], overrides: list[str]):
    import tempfile

    import yaml

    from ssl_container.config import load_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(recipe, f)
    try:
        return load_config(f.name, overrides)
    finally:
        os.unlink(f.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssl-container demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="dataset folder with dataset.json (default: ../shared/data/imagenette)")
    parser.add_argument("--out", default="runs/demo", help="output folder (pretraining run, export, report)")
    parser.add_argument("--steps", type=int, default=None, help=f"DINO steps (default {DEMO_RECIPE['max_steps']})")


def run_from_args(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_demo(args.data, args.out, args.steps)


if __name__ == "__main__":
    sys.exit(main())
