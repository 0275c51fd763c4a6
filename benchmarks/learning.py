"""Does a recipe learn? DINO pretraining for a fixed budget, with the teacher's k-NN along the way.

    python benchmarks/learning.py --config configs/small.yaml --steps 600 --evals 6 \
        --data ../shared/data/imagenette --resolution 64 [--seeds 0,1] [key=value ...]
    python benchmarks/learning.py --config configs/small.yaml --minutes 60 ...

The recipe (config + overrides) is trained by the product's own trainer in segments that end at
the evaluation points; each segment resumes the previous one exactly (the trainer's resume), so the
curve is that of one uninterrupted run. At every point the teacher backbone is evaluated with the
k-NN protocol of ``eval/protocol.py`` on *every* image of the held-out split against every image of
the reference split, and so are the two floors: the same architecture at random initialisation
(same seed) and raw pixels at the same resolution.

``--minutes`` fixes the training wall-clock instead of the step count: a short calibration run
measures the step time, and the recipe's ``epochs`` is set so that the schedules (lr, weight
decay, teacher momentum) end with the budget. Evaluation time is not counted in the budget.

Prints one JSON line per row (``kind``: floor | point | summary) and writes ``learning.png``
(k-NN top-1 against images seen, floors as horizontal lines) and ``learning.jsonl`` under --out.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from eval.protocol import KNN_K, floors, knn_eval, load_split  # noqa: E402
from ssl_container.config import load_config  # noqa: E402
from ssl_container.data.stream import steps_per_epoch  # noqa: E402
from ssl_container.export import load_backbone  # noqa: E402
from ssl_container.trainer.metrics import read_metrics  # noqa: E402
from ssl_container.models import create_model  # noqa: E402
from ssl_container.train import data_config  # noqa: E402


# The k-NN embeddings run where the training ran: on the GPU when there is one.
_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="training steps (the recipe's schedules are kept as they are)")
    budget.add_argument("--minutes", type=float, help="training wall-clock; sets the recipe's epochs to fit")
    p.add_argument("--evals", type=int, default=5, help="evaluation points along the run (the last is the end)")
    p.add_argument("--data", required=True, help="labelled dataset folder with dataset.json (k-NN splits)")
    p.add_argument("--reference-split", default="train")
    p.add_argument("--held-out-split", default="val")
    p.add_argument("--max-shards", type=int, default=None, help="evaluate on the first N shards of each split only")
    p.add_argument("--resolution", type=int, default=None, help="k-NN resolution (default: the global-crop size)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one run each")
    p.add_argument("--out", default="runs/learning", help="output folder (runs, learning.jsonl, learning.png)")
    p.add_argument("--keep-runs", action="store_true", help="keep the run folders (checkpoints) afterwards")
    return p


def _emit(out: Path, row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    with open(out / "learning.jsonl", "a") as f:
        f.write(line + "\n")


def _train_segment(config: str, overrides: list[str]) -> dict:
    """The trainer in its own process, as a user runs it: a process starts and ends its
    distributed state and DeepSpeed engine once."""
    proc = subprocess.run([sys.executable, "-m", "ssl_container.train", "--config", config, *overrides],
                          cwd=_ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training failed (exit {proc.returncode}): {proc.stdout[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _calibrated_epochs(args, cfg_overrides: list[str], out: Path) -> tuple[int, float]:
    """Epochs of the recipe that fill ``--minutes`` of training, from the median of a short run's steps."""
    probe_dir = out / "calibration"
    shutil.rmtree(probe_dir, ignore_errors=True)
    probe = [*cfg_overrides, f"run_dir={probe_dir}", "max_steps=12", "checkpoint.every_steps=1000000",
             "logging.progress=lines"]
    cfg = load_config(args.config, probe)
    _train_segment(args.config, probe)
    times = [cfg.data.batch_size / r["images_per_s"] for r in read_metrics(probe_dir / "metrics.jsonl")
             if r.get("images_per_s")]
    step_s = sorted(times[2:])[len(times[2:]) // 2]
    shutil.rmtree(probe_dir, ignore_errors=True)
    iters = steps_per_epoch(data_config(cfg), 1) // cfg.engine.grad_accum_steps
    # Each segment restarts the loader and engine; leave ~3% of the budget for that.
    epochs = max(1, math.floor(args.minutes * 60 * 0.97 / (step_s * iters)))
    return epochs, step_s


def run_seed(args, seed: int, out: Path, ref, held) -> list[dict]:
    overrides = [*args.overrides, f"seed={seed}"]
    if args.minutes:
        epochs, step_s = _calibrated_epochs(args, overrides, out)
        overrides.append(f"epochs={epochs}")
        _emit(out, {"kind": "calibration", "seed": seed, "step_seconds": round(step_s, 3), "epochs": epochs})
    run_dir = out / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(args.config, [*overrides, f"run_dir={run_dir}", "logging.progress=lines",
                                    "logging.tensorboard=false"])
    iters = steps_per_epoch(data_config(cfg), 1) // cfg.engine.grad_accum_steps
    total = args.steps or cfg.epochs * iters
    total = min(total, cfg.max_steps or total)
    points = sorted({max(1, round(total * (i + 1) / args.evals)) for i in range(args.evals)})
    torch.manual_seed(seed)
    random_init = create_model(cfg.model.name, num_classes=0, **cfg.model.kwargs).to(_DEVICE)
    rows = []
    for name, r in floors(ref, held, [random_init]).items():
        row = {"kind": "floor", "name": name, "seed": seed, **r}
        _emit(out, row)
        rows.append(row)
    seconds = 0.0
    for step in points:
        t0 = time.perf_counter()
        summary = _train_segment(args.config, [*overrides, f"run_dir={run_dir}", f"max_steps={step}",
                                               f"checkpoint.every_steps={step}", "checkpoint.keep_last=1",
                                               "logging.progress=lines", "logging.tensorboard=false"])
        seconds += time.perf_counter() - t0
        teacher = load_backbone(run_dir, "teacher").to(_DEVICE)
        last = read_metrics(run_dir / "metrics.jsonl")[-1]  # step records only, the last of each step
        row = {"kind": "point", "seed": seed, "step": summary["steps"], "total_steps": total,
               "images_seen": summary["steps"] * cfg.data.batch_size * cfg.engine.grad_accum_steps,
               "seconds": round(seconds, 1), "loss": last.get("loss"),
               **{k: last[k] for k in ("teacher_entropy", "kl", "prototypes_used") if k in last},
               **knn_eval(teacher, ref, held)}
        _emit(out, row)
        rows.append(row)
    if not args.keep_runs:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    seeds = sorted({r["seed"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, seed in enumerate(seeds):
        pts = [r for r in rows if r["kind"] == "point" and r["seed"] == seed]
        ax.plot([r["images_seen"] for r in pts], [r["top1"] for r in pts], "o-", color=colors[0],
                alpha=1.0 if i == 0 else 0.6, label=f"DINO teacher, seed {seed}")
        for r in rows:
            if r["kind"] == "floor" and r["seed"] == seed and r["name"] == "random_init":
                ax.axhline(r["top1"], color=colors[1], ls="--", alpha=1.0 if i == 0 else 0.6,
                           label=f"random init, seed {seed}")
    raw = next(r for r in rows if r["kind"] == "floor" and r["name"] == "raw_pixels")
    ax.axhline(raw["top1"], color=colors[2], ls=":", label="raw pixels")
    ax.set_xlabel("images seen")
    ax.set_ylabel(f"k-NN top-1 (%), k={KNN_K}")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning.jsonl").unlink(missing_ok=True)
    cfg = load_config(args.config, args.overrides)
    resolution = args.resolution or cfg.data.crops.global_size
    ref = load_split(args.data, args.reference_split, resolution, args.max_shards)
    held = load_split(args.data, args.held_out_split, resolution, args.max_shards)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows += run_seed(args, seed, out, ref, held)
    png = plot(rows, out / "learning.png",
               f"{Path(args.config).name} {' '.join(args.overrides)}\n{ref.name} ({len(ref)}) -> {held.name} "
               f"({len(held)}), {resolution}px")
    finals = [r for r in rows if r["kind"] == "point" and r["step"] == r["total_steps"]]
    raw = next(r for r in rows if r["kind"] == "floor" and r["name"] == "raw_pixels")["top1"]
    rand = [r["top1"] for r in rows if r["kind"] == "floor" and r["name"] == "random_init"]
    _emit(out, {"kind": "summary", "final_top1": [r["top1"] for r in finals], "raw_pixels_top1": raw,
                "random_init_top1": rand, "margin_over_raw": [round(r["top1"] - raw, 2) for r in finals],
                "margin_over_random": [round(r["top1"] - q, 2) for r, q in zip(finals, rand)], "png": str(png)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
