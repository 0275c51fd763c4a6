"""Multi-crop training-stream throughput: ours vs the recipe as usually written. JSON lines on stdout.

    python benchmarks/data_throughput.py --shards '../shared/data/imagenette/train-{000000..000009}.tar' \\
        --seconds 30 --workers 1 --impl both

``ours``: ``make_train_loader`` (DataLoader workers, shuffle buffer, decode, multi-crop, batching in the
workers, normalised float32 crops). ``naive``: the same shards, read the same way, batched the same way,
but each image decoded with PIL and each crop made by torchvision transforms on PIL images, one crop at a
time, with the official recipe's transform objects (flip, RandomApply(ColorJitter), RandomGrayscale,
PIL GaussianBlur, solarise, ToTensor, Normalize). Both run the same crop geometry and augmentation
distribution. ``device``: the workers only decode; crops are made batched on ``--device`` (the GPU path).
The clock starts at the first batch (worker start-up and the shuffle buffer excluded). Besides wall-clock
rates, images per CPU-second of the whole process tree are reported: the per-core rate, robust to other
processes on a shared machine. See docs/performance.md.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import time

import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ssl_container.data import MultiCropConfig, TrainDataConfig, make_train_loader  # noqa: E402
from ssl_container.data.sources import expand_urls, image_ext, iter_tar_samples  # noqa: E402


# ------------------------------------------------------------------------------------------------
# the naive reference: DINO's DataAugmentationDINO as usually written


class _RandomBlur:
    def __init__(self, p: float, sigma=(0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, img):
        if random.random() <= self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))
        return img


class _RandomSolarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


def naive_dino_transform(cfg: MultiCropConfig):
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    flip_and_color_jitter = T.Compose([
        T.RandomHorizontalFlip(p=cfg.flip_p),
        T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
        T.RandomGrayscale(p=cfg.grayscale_p),
    ])
    normalize = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    globals_ = [T.Compose([T.RandomResizedCrop(cfg.global_size, scale=cfg.global_scale, interpolation=bicubic),
                           flip_and_color_jitter,
                           _RandomBlur(cfg.global_blur_p[i % len(cfg.global_blur_p)], cfg.blur_sigma),
                           _RandomSolarize(cfg.global_solarize_p[i % len(cfg.global_solarize_p)]), normalize])
                for i in range(cfg.n_global)]
    local = T.Compose([T.RandomResizedCrop(cfg.local_size, scale=cfg.local_scale, interpolation=bicubic),
                       flip_and_color_jitter, _RandomBlur(cfg.local_blur_p, cfg.blur_sigma), normalize])

    def __call__(img):
        return [t(img) for t in globals_] + [local(img) for _ in range(cfg.n_local)]

    return __call__


class NaiveStream(IterableDataset):
    """Shards dealt to workers, samples in order, PIL decode + torchvision per crop, batches in the worker."""

    def __init__(self, urls, batch_size: int, cfg: MultiCropConfig):
        self.urls, self.batch_size, self.cfg = urls, batch_size, cfg

    def __iter__(self):
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        transform = naive_dino_transform(self.cfg)
        batch = []
        while True:
            for url in self.urls[wid::n] or self.urls:
                for sample in iter_tar_samples(url):
                    img = Image.open(io.BytesIO(sample[image_ext(sample)])).convert("RGB")
                    batch.append(transform(img))
                    if len(batch) == self.batch_size:
                        yield [torch.stack([b[c] for b in batch]) for c in range(self.cfg.n_crops)]
                        batch = []


# ------------------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live children (the DataLoader workers).

    On a shared machine wall-clock rates depend on everyone else's load; images per CPU-second is the
    per-core throughput the target is stated in."""
    t = os.times()
    total = t.user + t.system
    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def measure(batches, seconds: float, batch_size: int, n_crops: int) -> dict:
    it = iter(batches)
    t0 = time.perf_counter()
    next(it)  # start-up: workers, shuffle buffer
    startup = time.perf_counter() - t0
    images, t0, c0 = 0, time.perf_counter(), cpu_seconds()
    while time.perf_counter() - t0 < seconds:
        next(it)
        images += batch_size
    dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"images": images, "seconds": round(dt, 2), "startup_s": round(startup, 2),
            "images_per_s": round(images / dt, 1), "crops_per_s": round(images * n_crops / dt, 1),
            "cpu_seconds": round(cpu, 2), "images_per_cpu_s": round(images / cpu, 1),
            "crops_per_cpu_s": round(images * n_crops / cpu, 1)}


def _synchronized(batches, device: str):
    """Batches whose crops are finished on the device (so the clock measures the augmentation)."""
    for b in batches:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        yield b


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", required=True, help="brace pattern or list (comma-free) of shards")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers (each ~one core)")
    ap.add_argument("--impl", choices=["ours", "naive", "both", "device", "all"], default="both",
                    help="both: ours + naive; device: workers decode, crops made on --device; all: the three")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="for --impl device (default: cuda when available)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shuffle-buffer", type=int, default=256)
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--exact-order", action="store_true",
                    help="ours: colour after resizing for every crop (colour_at_lower_resolution=False)")
    ap.add_argument("--no-draft", action="store_true", help="ours: no reduced-scale JPEG decoding")
    ap.add_argument("--repeat", type=int, default=1,
                    help="alternate the implementations this many times (fair under a fluctuating load); "
                         "the summary line reports medians")
    ap.add_argument("--label", default="", help="free text copied into the output (machine, load, ...)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # the main process only receives batches
    mc = MultiCropConfig(global_size=args.global_size, local_size=args.local_size, n_local=args.n_local,
                         colour_at_lower_resolution=not args.exact_order, draft=not args.no_draft)
    urls = expand_urls(args.shards)
    common = {"workers": args.workers, "batch_size": args.batch_size,
              "recipe": f"{mc.n_global}x{mc.global_size} + {mc.n_local}x{mc.local_size}",
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(), "label": args.label,
              "torch_threads_main": torch.get_num_threads()}
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        impls = {"both": ["ours", "naive"], "all": ["ours", "naive", "device"]}.get(args.impl, [args.impl])
        for impl in impls:
            if impl in ("ours", "device"):
                cfg = TrainDataConfig(urls=urls, batch_size=args.batch_size, num_workers=args.workers,
                                      shuffle_buffer=args.shuffle_buffer, samples_per_epoch=10 ** 9, crops=mc,
                                      augment_on="cpu" if impl == "ours" else "device",
                                      pin_memory=impl == "device" and args.device.startswith("cuda"))
                batches = make_train_loader(cfg, rank=0, world_size=1, epoch=0, device=args.device)
                if impl == "device":
                    batches = _synchronized(batches, args.device)
                extra = {"colour_at_lower_resolution": mc.colour_at_lower_resolution, "draft": mc.draft}
                if impl == "device":
                    extra = {"device": args.device, "device_name": _device_name(args.device), "draft": mc.draft}
            else:
                ds = NaiveStream(urls, args.batch_size, mc)
                batches = DataLoader(ds, batch_size=None, num_workers=args.workers) if args.workers else ds
                extra = {}
            r = measure(batches, args.seconds, args.batch_size, mc.n_crops)
            r["images_per_s_per_worker"] = round(r["images_per_s"] / max(1, args.workers), 1)
            runs.setdefault(impl, []).append(r["images_per_s"])
            runs.setdefault(impl + "_cpu", []).append(r["images_per_cpu_s"])
            print(json.dumps({"impl": impl, **r, **common, **extra,
                              "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)
            del batches
    med = {k: statistics.median(v) for k, v in runs.items()}
    line: dict = {}
    for impl in [k for k in med if not k.endswith("_cpu")]:
        line[f"{impl}_images_per_s_median"] = round(med[impl], 1)
        line[f"{impl}_crops_per_s_median"] = round(med[impl] * mc.n_crops, 1)
        line[f"{impl}_images_per_cpu_s_median"] = round(med[impl + "_cpu"], 1)
        line[f"{impl}_crops_per_cpu_s_median"] = round(med[impl + "_cpu"] * mc.n_crops, 1)
    if "ours" in med and "naive" in med:
        line["speedup_wall_median"] = round(med["ours"] / med["naive"], 2)
        line["speedup_per_core_median"] = round(med["ours_cpu"] / med["naive_cpu"], 2)
        line["speedup_per_core_per_run"] = [round(a / b, 2) for a, b in zip(runs["ours_cpu"], runs["naive_cpu"])]
    print(json.dumps({"summary": True, "runs": args.repeat, **line, **common}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
