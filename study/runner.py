"""Running a study's units: train (the product's own trainer, in its own process), then evaluate every
curve checkpoint and the final teacher with the project's protocols, and write one result per unit.

Each unit is an ordinary run folder. The trainer resumes a half-trained one by itself; a unit whose
result matches its plan is skipped; evaluations of curve points already measured are reused from the
unit's partial result, so a stopped study loses at most the step interval and the evaluation in
flight. Every result is written atomically as soon as it exists.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from eval.protocol import EvalSplit, RawPixels, knn_eval, load_split
from ssl_container.signals import Stopped
from ssl_container.utils.files import atomic_write_json
from study.config import EvalDataConfig, StudyConfig
from study.plan import Unit, plan_digest, train_overrides, unit_status

__all__ = ["StudyError", "run_units", "train_unit", "evaluate_unit"]

# Curve points and floors are small models on small images: where the training ran, else the CPU.
_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# What a curve point evaluates: the teacher where the method keeps one (DINO), else the student (distillation,
# whose teacher is an input and is not saved).
EVALUATED = None


class StudyError(RuntimeError):
    """A unit that could not be trained or evaluated; the message says which and where its log is."""


class Splits:
    """k-NN top-1 of any backbone on a labelled set. Small sets are decoded once per study process and
    shared by every unit and curve point (eval/protocol.py); ``streaming`` sets go shard by shard."""

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[EvalSplit, EvalSplit]] = {}

    def get(self, data: EvalDataConfig) -> tuple[EvalSplit, EvalSplit]:
        key = (data.path, data.reference_split, data.held_out_split, data.resolution, data.max_shards)
        if key not in self._cache:
            self._cache[key] = tuple(load_split(data.path, s, data.resolution, data.max_shards)
                                     for s in (data.reference_split, data.held_out_split))
        return self._cache[key]

    def knn(self, model: torch.nn.Module, data: EvalDataConfig) -> dict[str, float]:
        if not data.streaming:
            return knn_eval(model, *self.get(data))
        from eval.features import DataSource, get_features, resolve_data
        from eval.knn import knn_classify
        from eval.protocol import KNN_K
        from ssl_container.data.augment import EvalTransformConfig

        transform = EvalTransformConfig(resize=round(data.resolution * 8 / 7), crop=data.resolution)
        feats = []
        for split in (data.reference_split, data.held_out_split):
            src = resolve_data(data.path, split)
            if data.max_shards is not None and src.urls is not None:
                src = DataSource(src.name, urls=src.urls[:data.max_shards], classes=src.classes)
            feats.append(get_features(model, src, transform, device=_DEVICE, cache_dir=None, num_workers=2))
        ref, held = feats
        result = knn_classify(ref.features, ref.labels, held.features, held.labels, ks=(KNN_K,))
        return {"top1": float(result.top1[KNN_K]), "top5": float(result.top5[KNN_K]),
                "num_reference": len(ref), "num_held_out": len(held)}


def train_unit(cfg: StudyConfig, unit: Unit, overrides: list[str], log: Callable[[str], None]) -> None:
    """The trainer as a user runs it (``python -m ssl_container.train``), resuming where the unit stopped.
    A stop signal to the study reaches the trainer, which saves at its step boundary before the study ends."""
    log_path = Path(cfg.out) / "logs" / f"{unit.key}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ssl_container.train", "--config", str(cfg.recipe), *overrides,
           "logging.progress=lines"]
    with open(log_path, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait()
        except Stopped as stop:
            proc.send_signal(stop.signum)  # a signal to the study alone; a group signal reached it already
            proc.wait()
            raise
    if rc != 0:
        tail = [line for line in log_path.read_text().splitlines() if line.strip()][-1:] or ["(empty log)"]
        raise StudyError(f"{unit.key}: the trainer exited {rc}: {tail[0][-400:]} (whole log: {log_path})")


def _step_dirs(run_dir: Path, every: int | None = None, last: int | None = None) -> list[Path]:
    """Complete step folders; with ``every``, only the curve's points (multiples of it and the final step),
    not the extra saves a stop signal or a failure made on the way."""
    root = run_dir / "checkpoints"
    found = sorted(p for p in root.glob("step_*") if (p / "meta.json").is_file()) if root.is_dir() else []
    if every is None:
        return found
    final = max((int(p.name.split("_")[-1]) for p in found), default=0) if last is None else last
    return [p for p in found if int(p.name.split("_")[-1]) % every == 0 or int(p.name.split("_")[-1]) == final]


def _random_init(unit: Unit) -> torch.nn.Module:
    from ssl_container.models import create_model

    torch.manual_seed(unit.seed)  # the same seed as the run: the network the training started from
    return create_model(unit.arm.model, num_classes=0, **unit.arm.kwargs).to(_DEVICE)


def _train_seconds(run_dir: Path, images_per_step: int) -> tuple[dict[int, float], float | None]:
    """Cumulative training seconds at every step (the trainer's own step times, start-up excluded)
    and the median images/s after the first ten steps."""
    from ssl_container.trainer.metrics import read_metrics

    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("images_per_s")]
    total, at = 0.0, {}
    for r in records:
        total += images_per_step / r["images_per_s"]
        at[int(r["step"])] = total
    speeds = [r["images_per_s"] for r in records[10:]] or [r["images_per_s"] for r in records]
    return at, (statistics.median(speeds) if speeds else None)


def _size(unit: Unit, resolution: int) -> dict[str, Any]:
    from ssl_container.models import create_model
    from ssl_container.models.info import count_macs, count_parameters

    model = create_model(unit.arm.model, num_classes=0, **unit.arm.kwargs)
    return {"params": count_parameters(model), "gmacs": round(count_macs(model, (resolution, resolution)) / 1e9, 4)}


def _kept_detection(out: Path, argv: list[str]) -> dict[str, Any] | None:
    """A finished fine-tuning of the same command (both inits scored) is not run again: a stopped study
    resumes detection seed by seed, each pair being minutes to an hour on a CPU."""
    from eval.detection import command_line

    path = out / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = results.get("command") == command_line(argv)
    return results if same and {"dino", "random"} <= set(results.get("runs", {})) else None


def _detection(cfg: StudyConfig, unit: Unit, weights: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from eval.detection import build_parser, run

    runs = []
    for s in cfg.detection.seeds:
        out = Path(cfg.out) / "detection" / f"{unit.key}_ft{s}"
        argv = ["--data", cfg.detection.data, "--weights", str(weights), "--init", "dino", "random",
                "--seed", str(s), "--out", str(out), *cfg.detection.args]
        args = build_parser().parse_args(argv)
        args.argv = argv
        results = _kept_detection(out, argv)
        if results is None:
            results = run(args, log=lambda m: None)
        else:
            log(f"  detection seed {s}: kept ({out / 'results.json'}, the same command)")
        dino, rand = results["runs"]["dino"]["metrics"], results["runs"]["random"]["metrics"]
        runs.append({"seed": s, "ap": dino["AP"], "ap50": dino["AP50"], "ap_random": rand["AP"],
                     "ap50_random": rand["AP50"], "results": str(out / "results.json")})
        log(f"  detection seed {s}: AP50 {dino['AP50']:.2f} pretrained vs {rand['AP50']:.2f} random init")
    mean = {k: round(statistics.mean(r[k] for r in runs), 3) for k in ("ap", "ap50", "ap_random", "ap50_random")}
    return {**mean, "dataset": cfg.detection.data, "args": list(cfg.detection.args), "runs": runs}


def evaluate_unit(cfg: StudyConfig, unit: Unit, overrides: list[str], splits: Splits, floors: dict[str, Any],
                  plan: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Every curve point's k-NN, the floors, the transfer and (if asked) detection; the partial result is
    saved after each piece so a stopped evaluation resumes where it was."""
    from ssl_container.config import load_config
    from ssl_container.export import load_backbone

    run_cfg = load_config(cfg.recipe, overrides)
    summary = json.loads((unit.run_dir / "summary.json").read_text()) if (unit.run_dir / "summary.json").is_file() else {}
    world = len(summary.get("student_sha256_per_rank") or [1])
    seconds_at, speed = _train_seconds(unit.run_dir, run_cfg.data.batch_size * run_cfg.engine.grad_accum_steps * world)
    partial = json.loads(unit.result_path.read_text()) if unit.result_path.is_file() else {}
    digest = plan_digest(cfg, unit, overrides)
    done = {p["step"]: p for p in partial.get("curve", [])} if partial.get("plan_digest") == digest else {}
    res: dict[str, Any] = {"arm": unit.arm.name, "model": unit.arm.model, "kwargs": unit.arm.kwargs,
                           "arm_overrides": list(unit.arm.overrides), "note": unit.arm.note, "seed": unit.seed,
                           **_size(unit, cfg.knn.resolution), "run_dir": str(unit.run_dir), "world_size": world,
                           "plan_digest": digest, "complete": False}
    curve = []
    every = plan["every"]
    for step_dir in _step_dirs(unit.run_dir, every, plan["steps"]):
        step = int(step_dir.name.split("_")[-1])
        if step not in done:
            top = splits.knn(load_backbone(step_dir, EVALUATED).to(_DEVICE), cfg.knn)
            done[step] = {"step": step, "train_seconds": round(seconds_at.get(step, float("nan")), 1),
                          "knn": round(top["top1"], 2), "knn_top5": round(top["top5"], 2)}
            log(f"  step {step}: k-NN {top['top1']:.2f} %")
        curve.append(done[step])
        res["curve"] = curve
        atomic_write_json(unit.result_path, res)
    if not curve:
        raise StudyError(f"{unit.key}: no checkpoint in {unit.run_dir / 'checkpoints'} to evaluate")
    final = _step_dirs(unit.run_dir)[-1]
    last = curve[-1]
    res.update(steps=last["step"], train_seconds=last["train_seconds"],
               images_per_s=round(speed, 1) if speed else None, knn=last["knn"], knn_top5=last["knn_top5"],
               knn_random=round(splits.knn(_random_init(unit), cfg.knn)["top1"], 2),
               knn_pixels=floors["knn"], final_checkpoint=str(final))
    res["transfer"] = None
    if cfg.transfer is not None:
        top = splits.knn(load_backbone(final, EVALUATED).to(_DEVICE), cfg.transfer)
        res["transfer"] = {"dataset": cfg.transfer.path, "resolution": cfg.transfer.resolution,
                           "num_reference": top["num_reference"], "num_held_out": top["num_held_out"],
                           "knn": round(top["top1"], 2),
                           "knn_random": round(splits.knn(_random_init(unit), cfg.transfer)["top1"], 2),
                           "knn_pixels": floors["transfer"]}
    res["detection"] = _detection(cfg, unit, final, log) if unit.arm.name in cfg.detection.arms else None
    res["complete"] = True
    atomic_write_json(unit.result_path, res)
    return res


def _floors(cfg: StudyConfig, splits: Splits) -> dict[str, Any]:
    """Raw-pixel k-NN of each dataset, once per study (cached in OUT/floors.json)."""
    path = Path(cfg.out) / "floors.json"
    key = json.dumps({"knn": vars(cfg.knn), "transfer": vars(cfg.transfer) if cfg.transfer else None}, sort_keys=True)
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if cached.get("key") == key:
        return cached
    def pixels(data: EvalDataConfig | None) -> float | None:
        # Raw pixels of a streamed set (ImageNet at 224: 150,528 numbers an image) are not worth holding.
        return None if data is None or data.streaming else round(splits.knn(RawPixels(), data)["top1"], 2)

    out = {"key": key, "knn": pixels(cfg.knn), "transfer": pixels(cfg.transfer)}
    atomic_write_json(path, out)
    return out


def run_units(cfg: StudyConfig, units: list[Unit], plan: dict[str, Any], log: Callable[[str], None] = print,
              train: bool = True) -> list[dict[str, Any]]:
    """Train what is not trained (unless ``train`` is False: a Slurm array trains), evaluate what is not
    evaluated; returns the results of every unit that has one."""
    splits = Splits()
    floors: dict[str, Any] | None = None
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    for i, unit in enumerate(units, 1):
        overrides = train_overrides(cfg, unit, plan)
        status = unit_status(cfg, unit, plan, overrides)
        head = f"[study {i}/{len(units)}] {unit.key} ({unit.arm.model})"
        if status["state"] == "done":
            log(f"{head}: done, kept")
            results.append(json.loads(unit.result_path.read_text()))
            continue
        if status["state"] in ("new", "partial"):
            if not train:
                log(f"{head}: not trained yet ({status['steps']} steps), skipped")
                continue
            start = f"from step {status['steps']}" if status["steps"] else "from scratch"
            log(f"{head}: training {plan['steps'] or 'the recipe'} steps {start} "
                f"(log: {Path(cfg.out) / 'logs' / (unit.key + '.log')})")
            t0 = time.perf_counter()
            try:
                train_unit(cfg, unit, overrides, log)
            except StudyError as err:  # an arm that diverges is a result too: say so, go on with the others
                log(f"{head}: FAILED: {err}")
                failed.append(str(err))
                continue
            log(f"{head}: trained in {time.perf_counter() - t0:.0f} s")
        if floors is None:
            log("[study] decoding the evaluation splits and the raw-pixel floors")
            floors = _floors(cfg, splits)
        log(f"{head}: evaluating")
        res = evaluate_unit(cfg, unit, overrides, splits, floors, plan, log)
        pixels = "-" if res["knn_pixels"] is None else f"{res['knn_pixels']:.2f}"
        log(f"{head}: k-NN {res['knn']:.2f} % (random init {res['knn_random']:.2f}, raw pixels {pixels})"
            + (f"; {Path(res['transfer']['dataset']).name} {res['transfer']['knn']:.2f} %" if res["transfer"] else ""))
        results.append(res)
    if failed:
        raise StudyError(f"{len(failed)} unit(s) failed (the others are done and reported): " + "; ".join(failed))
    return results
