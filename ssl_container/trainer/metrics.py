"""Run logging: ``metrics.jsonl`` every step, the trackers (TensorBoard, MLflow, W&B: trackers.py), a
progress bar or plain lines with elapsed time and ETA on rank 0, and PNG curves at the end.

``metrics.jsonl`` is append-only: a resumed run appends a ``{"event": "resume"}`` line and then
re-logs the steps after its checkpoint, so readers take the last record of each step
(:func:`read_metrics`). Nothing written before a crash is ever rewritten.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from ssl_container.utils.progress import hms
from ssl_container.trainer.trackers import Trackers

__all__ = ["MetricsLogger", "read_metrics", "plot_run"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Step records in step order, the last record winning for steps logged twice (resume)."""
    by_step: dict[int, dict[str, Any]] = {}
    path = Path(path)
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a hard kill
            continue
        if "step" in rec and "event" not in rec:
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


class MetricsLogger:
    """metrics.jsonl (every step), the trackers (trackers.py), and a progress bar or plain lines with
    elapsed time and ETA on rank 0; on other ranks every call is a no-op."""

    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: int, start_step: int, every: int,
                 trackers: Trackers | None = None, progress: str = "auto") -> None:
        self.enabled = enabled
        self.every = every
        self.total = total_steps
        self.start_step = start_step
        self.path = Path(run_dir) / "metrics.jsonl"
        self.trackers = trackers or Trackers([])
        self._file = None
        self._bar = None
        self._t0 = time.perf_counter()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        if start_step > 0:
            self.event("resume", step=start_step)
        mode = progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def event(self, name: str, **fields: Any) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"event": name, "time": time.time(), **fields}) + "\n")
            self._file.flush()

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        self.trackers.scalars({f"train/{k}": v for k, v in rec.items()
                               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}, step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4f}", lr=f"{rec.get('lr', 0):.2e}")
        elif self.mode == "lines" and (step % self.every == 0 or step == self.total or step == self.start_step + 1):
            parts = [f"step {step}/{self.total}"] + [
                f"{k} {v:.4g}" for k, v in rec.items()
                if k in ("loss", "lr", "wd", "momentum", "teacher_temp", "grad_norm", "images_per_s", "data_wait",
                         "teacher_entropy", "kl", "prototypes_used")
                and isinstance(v, (int, float))
            ]
            print(" | ".join(parts + [self._timing(step)]), flush=True)

    def _timing(self, step: int) -> str:
        """Elapsed wall-clock of this process and the ETA at the pace of its steps so far."""
        elapsed = time.perf_counter() - self._t0
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        return f"elapsed {hms(elapsed)} | eta {hms(eta)}"

    def scalars(self, prefix: str, step: int, values: dict[str, float]) -> None:
        """Evaluation results (online k-NN) into the same log and TensorBoard."""
        self.event(prefix, step=step, **values)
        self.trackers.scalars({f"{prefix}/{k}": v for k, v in values.items()}, step)

    def close(self, artifacts: Iterable[str | Path | None] = (), ok: bool = True) -> None:
        """Close the log; ``artifacts`` (the curves PNG, summary.json) go to the trackers first."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for path in artifacts:
            self.trackers.artifact(path)
        self.trackers.close(ok)
        if self._file is not None:
            self._file.close()
            self._file = None


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information as text
    return v


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Loss and schedule curves of a run as one PNG (``RUN/training_curves.png``)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "DINO loss"), ("lr", "learning rate"), ("wd", "weight decay"),
              ("momentum", "teacher momentum"), ("teacher_temp", "teacher temperature"),
              ("grad_norm", "gradient norm (global)"), ("images_per_s", "images / s"), ("data_wait", "data-wait fraction"),
              ("teacher_entropy", "teacher entropy (nats; collapse: ln K uniform, 0 one-hot)"),
              ("kl", "student-teacher KL (collapse: -> 0)"),
              ("prototypes_used", "share of prototypes chosen in a batch (one-hot collapse: -> 0)"),
              ("koleo", "KoLeo loss")]
    panels = [(k, t) for k, t in panels if any(isinstance(r.get(k), (int, float)) for r in records)]
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.6 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        xs, ys = _series(records, key)
        ax.plot(xs, ys, lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{run_dir.name}: {len(records)} steps", fontsize=11)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "training_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys
