"""What an epoch boundary costs the trainer: one loader per epoch (workers restarted) against one
loader through every epoch (the trainer's, workers kept). JSON lines on stdout.

    python benchmarks/epoch_boundary.py --config configs/demo.yaml --epochs 4 --step-seconds 0.25

Both sides are the product's ``make_train_loader`` over the config's data section (``epochs=1`` per
epoch against ``epochs=None``); a consumer that holds each batch ``--step-seconds`` (the training
step, without its CPU load) stands in for the trainer. Reported per side: the wait for the first batch
of each epoch after the first (the dip the metrics show once per epoch), the median wait of the
other batches, and the wall time of the whole pass.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ssl_container.config import load_config  # noqa: E402
from ssl_container.data import make_train_loader, steps_per_epoch  # noqa: E402


def _consume(batches, n: int, step_seconds: float) -> list[float]:
    waits = []
    for _ in range(n):
        t0 = time.perf_counter()
        next(batches)
        waits.append(time.perf_counter() - t0)
        time.sleep(step_seconds)
    return waits


def run(data, epochs: int, step_seconds: float, mode: str) -> dict:
    steps = steps_per_epoch(data, 1)
    t0 = time.perf_counter()
    waits: list[float] = []
    if mode == "per_epoch":
        for epoch in range(epochs):
            batches = iter(make_train_loader(data, 0, 1, epoch))
            waits += _consume(batches, steps, step_seconds)
            batches.close()
    else:
        batches = iter(make_train_loader(data, 0, 1, 0, epochs=None))
        waits += _consume(batches, steps * epochs, step_seconds)
        batches.close()
    first = [waits[e * steps] for e in range(1, epochs)]
    others = [w for i, w in enumerate(waits) if i % steps]
    return {"mode": mode, "epochs": epochs, "steps_per_epoch": steps, "workers": data.num_workers,
            "step_seconds": step_seconds, "epoch_start_wait_s": [round(w, 3) for w in first],
            "median_wait_s": round(statistics.median(others), 4), "wall_s": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--step-seconds", type=float, default=0.25)
    ap.add_argument("overrides", nargs="*", help="config overrides (data.num_workers=2 ...)")
    args = ap.parse_args(argv)
    data = load_config(args.config, args.overrides).data
    for mode in ("per_epoch", "persistent"):
        print(json.dumps(run(data, args.epochs, args.step_seconds, mode)), flush=True)


if __name__ == "__main__":
    main()
