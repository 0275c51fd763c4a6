"""Transfer to detection: fine-tune Faster R-CNN / RetinaNet with a Container-Light backbone on a
COCO-format dataset and report COCO box AP with pycocotools, for several initialisations in one go.

    python -m eval.detection --data ../shared/data/coco128 --weights EXPORT_DIR \\
        --init dino random --arch fasterrcnn --epochs 4 --min-size 320 --out outputs/det

``--init`` entries: ``random`` (random backbone), ``dino`` (the backbone at ``--weights``: an
export, a run or step folder, anything ``ssl_container.export.load_backbone`` reads) or
``NAME=PATH`` for any other weights. Every initialisation gets the same seed, data order, schedule
and detection heads; only the backbone differs.

``--arch``: ``fasterrcnn`` (FPN on the four stages, the Container paper's detector), ``fasterrcnn_c4``
(the backbone's last stage as the box head: the detector for small detection sets, where it is the one whose
pretrained init pays, docs/study.md) or ``retinanet``.

Dataset layout (COCO's): ``DATA/annotations/instances_{split}.json`` and ``DATA/{split}/*.jpg``.
Categories are mapped to contiguous labels 1..K (0 is background), boxes from COCO's xywh to xyxy;
crowd and degenerate boxes are left out of training, training images without boxes are skipped.

Recipe (the Container paper's COCO setting, shortened): AdamW lr 1e-4, weight decay 0.05 (none on
norms, biases and the mixing gates), linear warm-up, lr x0.1 at 8/12 and 11/12 of the schedule
(the 1x schedule's steps), BatchNorm frozen, horizontal flips. The detector resizes images to
``--min-size`` (short side) / ``--max-size`` and pads batches to a multiple of 32.

Writes ``OUT/results.json`` (AP, AP50, AP75, APs, APm, APl in percent per initialisation, with the
training losses and timings; an AP that COCOeval cannot define, e.g. no small objects among the
images evaluated, is null), ``OUT/detections_<init>.json`` (COCO results format) and
``OUT/predictions_<init>.png`` (a few val images: predicted boxes in colour, ground truth dashed).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from eval.detection_train import (ARCHS, build_detector, collate, is_backbone_param, lr_factor, param_groups,
                                  recalibrated_body, train)
from ssl_container.signals import stoppable
from ssl_container.utils.files import atomic_write_json

__all__ = [
    "ARCHS",
    "build_detector",
    "CocoDetection",
    "collate",
    "command_line",
    "evaluate",
    "is_backbone_param",
    "lr_factor",
    "main",
    "METRICS",
    "param_groups",
    "parse_inits",
    "recalibrated_body",
    "run",
    "save_predictions_png",
    "train",
]

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


# ------------------------------------------------------------------------------------------------
# data


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection data: ``(image float CHW in [0, 1], target)`` with xyxy boxes.

    ``target``: ``boxes`` (N, 4) float xyxy in pixels, ``labels`` (N,) int64 in 1..K, ``image_id``.
    ``train=True`` drops crowd and degenerate boxes, skips images left without boxes (unless
    ``negatives``: they stay, as background only) and flips horizontally with probability ``hflip``.
    """

    def __init__(
        self,
        images: str | os.PathLike,
        annotations: str | os.PathLike,
        train: bool = False,
        image_ids: Sequence[int] | None = None,
        max_images: int | None = None,
        hflip: float = 0.5,
        categories: Sequence[str] | None = None,
        negatives: bool = False,
    ) -> None:
        from pycocotools.coco import COCO

        self.images = Path(images)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while indexing
            self.coco = COCO(str(annotations))
        self.train = train
        self.hflip = hflip if train else 0.0
        self.cat_ids = sorted(self.coco.getCatIds())
        if categories:  # a subset of the classes, by name: the others' boxes are not objects here
            by_name = {self.coco.cats[c]["name"]: c for c in self.cat_ids}
            unknown = [n for n in categories if n not in by_name]
            if unknown:
                raise ValueError(f"--categories {','.join(unknown)}: not a category of {annotations}; it has "
                                 f"{', '.join(sorted(by_name))}")
            self.cat_ids = sorted(by_name[n] for n in categories)
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.class_names = {i + 1: self.coco.cats[c]["name"] for i, c in enumerate(self.cat_ids)}
        ids = sorted(self.coco.getImgIds()) if image_ids is None else list(image_ids)
        if train and not negatives:
            ids = [i for i in ids if len(self._boxes(i)[0])]
        self.ids = ids[:max_images] if max_images else ids

    @property
    def num_classes(self) -> int:
        """Classes including the background (torchvision's convention)."""
        return len(self.cat_ids) + 1

    def _boxes(self, image_id: int) -> tuple[list[list[float]], list[int]]:
        info = self.coco.imgs[image_id]
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if (self.train and ann.get("iscrowd", 0)) or ann["category_id"] not in self.cat_to_label:
                continue
            x, y, w, h = ann["bbox"]
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(info["width"]), x + w), min(float(info["height"]), y + h)
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            boxes.append([x0, y0, x1, y1])
            labels.append(self.cat_to_label[ann["category_id"]])
        return boxes, labels

    def load_image(self, image_id: int) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        with Image.open(self.images / self.coco.imgs[image_id]["file_name"]) as im:
            return pil_to_tensor(im.convert("RGB")).float().div_(255)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        image = self.load_image(image_id)
        boxes, labels = self._boxes(image_id)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": torch.tensor(image_id),
        }
        if self.hflip and random.random() < self.hflip:
            image = image.flip(-1)
            w = image.shape[-1]
            b = target["boxes"]
            target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        return image, target


def coco_split(data: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """``(images folder, annotation file)`` of a split in COCO's layout, with a clear error if absent."""
    root = Path(data)
    images, ann = root / split, root / "annotations" / f"instances_{split}.json"
    if not images.is_dir() or not ann.is_file():
        raise FileNotFoundError(
            f"{root}: expected COCO layout {split}/ and annotations/instances_{split}.json "
            f"(e.g. ../shared/data/coco128)"
        )
    return images, ann


# ------------------------------------------------------------------------------------------------
# evaluation


@torch.inference_mode()
def predict(model: nn.Module, dataset: CocoDetection, batch_size: int = 2) -> list[dict[str, Any]]:
    """Detections on every image of ``dataset`` in COCO results format (xywh, category ids)."""
    model.eval()
    out: list[dict[str, Any]] = []
    for i in range(0, len(dataset), batch_size):
        ids = dataset.ids[i: i + batch_size]
        images = [dataset.load_image(image_id) for image_id in ids]
        for image_id, det in zip(ids, model(images)):
            for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
                if label not in dataset.label_to_cat:  # RetinaNet may score the unused background slot
                    continue
                x0, y0, x1, y1 = box
                out.append({"image_id": int(image_id), "category_id": dataset.label_to_cat[label],
                            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                            "score": round(float(score), 5)})
    return out


def coco_metrics(coco_gt: Any, detections: list[dict[str, Any]], image_ids: Sequence[int],
                 cat_ids: Sequence[int] | None = None) -> tuple[dict[str, float | None], str]:
    """COCO box AP, AP50, AP75, APs, APm, APl (percent; None where undefined) and COCOeval's summary text,
    averaged over ``cat_ids`` (default: every category of ``coco_gt``)."""
    from pycocotools.cocoeval import COCOeval

    if not detections:  # loadRes cannot take an empty list; no detection means AP 0 where GT exists
        return {m: 0.0 for m in METRICS}, "no detections"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = list(image_ids)
        if cat_ids is not None:
            evaluator.params.catIds = list(cat_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats[: len(METRICS)]
    return {m: (round(100 * float(s), 3) if s >= 0 else None) for m, s in zip(METRICS, stats)}, text.getvalue()


def evaluate(model: nn.Module, dataset: CocoDetection, batch_size: int = 2) -> tuple[dict[str, float | None], list[dict[str, Any]], str]:
    """Predict on ``dataset`` and score with COCOeval: ``(metrics, detections, summary text)``."""
    detections = predict(model, dataset, batch_size)
    metrics, text = coco_metrics(dataset.coco, detections, dataset.ids, dataset.cat_ids)
    return metrics, detections, text


def save_predictions_png(
    dataset: CocoDetection,
    detections: list[dict[str, Any]],
    path: str | os.PathLike,
    num_images: int = 4,
    score_thresh: float = 0.3,
    title: str = "",
) -> Path:
    """A grid of the first ``num_images`` images: predictions above ``score_thresh`` (at least the top
    3 per image) in colour with class and score, ground truth dashed white."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    ids = dataset.ids[:num_images]
    cols = min(len(ids), 2) or 1
    rows = max(math.ceil(len(ids) / cols), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    colors = plt.get_cmap("tab20")
    for ax in axes.flat:
        ax.axis("off")
    for ax, image_id in zip(axes.flat, ids):
        ax.imshow(dataset.load_image(image_id).permute(1, 2, 0).numpy())
        for ann in dataset.coco.imgToAnns.get(image_id, []):
            if ann["category_id"] not in dataset.cat_to_label:  # a category left out by --categories
                continue
            x, y, w, h = ann["bbox"]
            ax.add_patch(Rectangle((x, y), w, h, fill=False, ls="--", lw=1, ec="white"))
        dets = sorted((d for d in detections if d["image_id"] == image_id), key=lambda d: -d["score"])
        shown = [d for d in dets if d["score"] >= score_thresh] or dets[:3]
        for d in shown:
            x, y, w, h = d["bbox"]
            c = colors(d["category_id"] % 20)
            ax.add_patch(Rectangle((x, y), w, h, fill=False, lw=2, ec=c))
            name = dataset.coco.cats[d["category_id"]]["name"]
            ax.text(x, y, f"{name} {d['score']:.2f}", fontsize=7, color="black", va="bottom",
                    bbox=dict(facecolor=c, alpha=0.8, pad=1, lw=0))
        ax.set_title(f"image {image_id}: {len(shown)} shown of {len(dets)} detections", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# the command


def parse_inits(inits: Sequence[str], weights: str | None) -> dict[str, str | None]:
    """``random`` -> None, ``dino`` -> ``--weights``, ``NAME=PATH`` -> PATH."""
    out: dict[str, str | None] = {}
    for entry in inits:
        if entry == "random":
            out[entry] = None
        elif "=" in entry:
            name, path = entry.split("=", 1)
            out[name] = path
        elif weights:
            out[entry] = weights
        else:
            raise ValueError(f"--init {entry} needs --weights PATH (or write it as {entry}=PATH)")
    return out


def _weights_info(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    p = Path(path)
    meta = p / "meta.json" if p.is_dir() else p.with_name("meta.json")
    info: dict[str, Any] = {"path": str(p.resolve())}
    if meta.is_file():
        try:
            m = json.loads(meta.read_text())
            info.update({k: m.get(k) for k in ("which", "step", "config_sha256", "eval") if k in m})
            if "weights" in m:
                info["sha256"] = m["weights"].get("sha256")
        except (OSError, json.JSONDecodeError):
            pass
    if "sha256" not in info and p.is_file():
        info["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return info


def random_architecture(model: str | None, pretrained: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """``random`` init is the architecture of the pretrained weights it is compared with (the first
    given), so that only the initialisation differs; ``--model`` names it when no weights are given."""
    if model is not None:
        return model, {}
    if pretrained:
        return pretrained[0].model_name, dict(pretrained[0].model_kwargs)
    return "container_light", {}


def _backbone_info(model: nn.Module) -> dict[str, Any]:
    body = model.backbone.body
    from ssl_container.downstream.detection_backbone import ContainerC4BoxHead

    head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    in_head = sum(p.numel() for p in head.parameters()) if isinstance(head, ContainerC4BoxHead) else 0  # the last stage
    return {"class": type(body).__name__, "params": sum(p.numel() for p in body.parameters()) + in_head,
            "widths": [i["num_chs"] for i in body.feature_info]}


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    inits = parse_inits(args.init, args.weights)
    from ssl_container.export import read_checkpoint

    checked = {path: read_checkpoint(path, args.which)  # verified before the first (maybe long) fine-tuning
               for path in dict.fromkeys(p for p in inits.values() if p is not None)}
    random_arch = random_architecture(args.model, list(checked.values()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_images, train_ann = coco_split(args.data, args.train_split)
    val_images, val_ann = coco_split(args.data, args.val_split)
    cats = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    train_set = CocoDetection(train_images, train_ann, train=True, max_images=args.max_train_images, categories=cats,
                              negatives=args.negatives)
    val_set = CocoDetection(val_images, val_ann, train=False, max_images=args.max_val_images, categories=cats)
    results: dict[str, Any] = {
        "command": command_line(sys.argv[1:] if args.argv is None else args.argv),
        "settings": {k: v for k, v in vars(args).items() if k != "argv"},
        "data": {"root": str(Path(args.data).resolve()), "train_images": len(train_set), "val_images": len(val_set),
                 "classes": train_set.num_classes - 1},
        "metrics_unit": "percent (COCO box AP); null: undefined on these images",
        "runs": {},
    }
    for name, weights in inits.items():
        log(f"== {name}: {args.arch}, backbone {f'{random_arch[0]} at random init' if weights is None else weights}")
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        body = weights
        if weights is None:  # the same architecture as the pretrained weights it is compared with
            from ssl_container.models import create_model

            body = create_model(random_arch[0], num_classes=0, **random_arch[1])
        if args.bn_recalibration:
            body = recalibrated_body(body, args.which, train_set, args.bn_recalibration, args.min_size[0],
                                     args.max_size, args.batch_size, log)
        model = build_detector(
            args.arch, train_set.num_classes, body, which=args.which,
            min_size=args.min_size[0] if len(args.min_size) == 1 else tuple(args.min_size),
            max_size=args.max_size, freeze_at=args.freeze_at, norm=args.norm, drop_path_rate=args.drop_path,
            **_detector_kwargs(args),
        )
        history = train(
            model, train_set, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, warmup_iters=args.warmup_iters, clip_grad=args.clip_grad,
            backbone_lr_mult=args.backbone_lr_mult, backbone_frozen_iters=args.backbone_frozen_iters,
            max_iters=args.max_iters, seed=args.seed, log_every=args.log_every, log=log,
        )
        t0 = time.perf_counter()
        metrics, detections, summary = evaluate(model, val_set, batch_size=args.batch_size)
        eval_s = round(time.perf_counter() - t0, 1)
        log(f"  {name}: " + "  ".join(f"{m} {'-' if v is None else f'{v:.2f}'}" for m, v in metrics.items()))
        atomic_write_json(out / f"detections_{name}.json", detections)
        png = save_predictions_png(val_set, detections, out / f"predictions_{name}.png", num_images=args.vis_images,
                                   score_thresh=args.score_thresh, title=f"{args.arch}, {name} init: AP {metrics['AP']}")
        results["runs"][name] = {
            "weights": _weights_info(weights), "backbone": _backbone_info(model), "metrics": metrics, "train": history, "eval_seconds": eval_s,
            "detections": len(detections), "coco_summary": summary,
            "files": {"detections": f"detections_{name}.json", "png": png.name},
        }
        atomic_write_json(out / "results.json", results)  # after every run, so a long comparison keeps its parts
        del model
    log(_table(results))
    log(f"results: {out / 'results.json'}")
    return results


def command_line(argv: Sequence[str]) -> str:
    """How ``results.json`` records the command (what a study compares to keep a finished fine-tuning)."""
    return "python -m eval.detection " + " ".join(argv)


def _detector_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Sampling sizes of the Faster R-CNN heads (their cost dominates small-image CPU runs)."""
    if args.arch == "retinanet":
        return {}
    out = {}
    if args.roi_batch_size:
        out["box_batch_size_per_image"] = args.roi_batch_size
    if args.proposals_train:
        out["rpn_post_nms_top_n_train"] = args.proposals_train
    if args.box_head_dim and args.arch == "fasterrcnn":
        out["box_head_dim"] = args.box_head_dim
    if args.arch == "fasterrcnn_c4":
        out["roi_size"] = args.roi_size
    return out


def _table(results: dict[str, Any]) -> str:
    rows = [f"{'init':<12}" + "".join(f"{m:>8}" for m in METRICS)]
    for name, r in results["runs"].items():
        rows.append(f"{name:<12}" + "".join(f"{'-' if v is None else f'{v:.2f}':>8}" for v in r["metrics"].values()))
    return "\n".join(rows)


def _default_data() -> str:
    root = os.environ.get("SSL_CONTAINER_DATA") or str(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    return str(Path(root) / "coco128")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.detection",
        description="Fine-tune a Container-Light detector on COCO-format data and report COCO box AP "
                    "for one or more backbone initialisations.",
    )
    p.add_argument("--data", default=_default_data(), help="COCO-format root (default: ../shared/data/coco128)")
    p.add_argument("--train-split", default="train2017")
    p.add_argument("--val-split", default="val2017")
    p.add_argument("--weights", default=None, help="backbone for --init dino: export folder, run/step folder, file")
    p.add_argument("--which", choices=("teacher", "student"), default=None, help="for run/step folders (default teacher)")
    p.add_argument("--init", nargs="+", default=["random"], help="random | dino | NAME=PATH, several to compare")
    p.add_argument("--arch", choices=ARCHS, default="fasterrcnn")
    p.add_argument("--model", default=None,
                   help="architecture of the random init (default: that of the pretrained weights compared with it, "
                        "else container_light)")
    p.add_argument("--categories", default=None,
                   help="comma-separated category names to detect, e.g. person (default: every category)")
    p.add_argument("--negatives", action="store_true",
                   help="train on the images without a box (of --categories) too, as background: a one-class "
                        "detector that never saw an image without its class fires on everything")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-iters", type=int, default=None, help="stop after this many iterations (tests)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--backbone-lr-mult", type=float, default=1.0,
                   help="the backbone's learning rate as a multiple of --lr (0.1: the pretrained layers move ten times slower "
                        "than the heads that start from scratch)")
    p.add_argument("--backbone-frozen-iters", type=int, default=0,
                   help="train only the new heads for this many iterations, then the pretrained layers too "
                        "(with a warm-up of their own): linear probing, then fine-tuning")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-iters", type=int, default=50)
    p.add_argument("--clip-grad", type=float, default=None)
    p.add_argument("--min-size", type=int, nargs="+", default=[320],
                   help="short side the detector resizes to; several: one at random per training image (multi-scale "
                        "training), the last for evaluation")
    p.add_argument("--max-size", type=int, default=533, help="long side limit")
    p.add_argument("--roi-batch-size", type=int, default=None,
                   help="Faster R-CNN RoIs sampled per image for the box head (torchvision default 512)")
    p.add_argument("--box-head-dim", type=int, default=None,
                   help="Faster R-CNN box head width (torchvision default 1024; 256 fits small datasets)")
    p.add_argument("--roi-size", type=int, default=14,
                   help="fasterrcnn_c4: RoIAlign output side on the stride-16 map, fed to the last stage (14: detectron2's; "
                        "pretraining resolution / 16 shows objects at the scale the backbone was pretrained at)")
    p.add_argument("--proposals-train", type=int, default=None,
                   help="Faster R-CNN RPN proposals kept per image in training (torchvision default 2000)")
    p.add_argument("--freeze-at", type=int, default=0, help="0 none, 1 stem, k stem + stages 1..k-1 (BN always frozen)")
    p.add_argument("--norm", choices=("frozen_bn", "bn"), default="frozen_bn")
    p.add_argument("--bn-recalibration", type=int, default=0, metavar="N",
                   help="re-estimate the backbone's BatchNorm statistics on N training images at the detection "
                        "resolution before freezing them (precise BN; 0: keep the pretraining's)")
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--max-train-images", type=int, default=None)
    p.add_argument("--max-val-images", type=int, default=None)
    p.add_argument("--vis-images", type=int, default=4, help="val images in the PNG")
    p.add_argument("--score-thresh", type=float, default=0.3, help="score threshold for the PNG")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--out", default="outputs/detection")
    return p


@stoppable("python -m eval.detection")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)
    try:
        parse_inits(args.init, args.weights)
    except ValueError as e:
        build_parser().error(str(e))
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
