"""Progress of long work: a bar in a terminal, plain lines with elapsed time and ETA in a log file.

Every long command (feature extraction, k-NN, linear probes, shard writing, detection fine-tuning)
reports through :class:`Progress`, so a person at a terminal sees a bar and a Slurm log gets a line at
the first update and then one every ``every_s`` seconds that still reads well after ``tail``.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any

__all__ = ["Progress", "hms"]


def hms(seconds: float) -> str:
    """``1:02:03`` / ``2:03``; ``?`` when not known."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``with Progress(total, "features", "img") as p: ... p.update(n)``. ``mode``: auto (a bar when
    stderr is a terminal, else lines), bar, lines or off; ``enabled=False`` (other ranks) is silent."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", mode: str = "auto", every_s: float = 30.0,
                 enabled: bool = True, stream: Any = None) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream or sys.stderr
        self.mode = "off" if not enabled else (("bar" if self.stream.isatty() else "lines") if mode == "auto" else mode)
        self.done = 0
        self._t0 = self._last = time.perf_counter()
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1, file=self.stream)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def line(self) -> str:
        elapsed = time.perf_counter() - self._t0
        if self.total:
            eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f} %) | "
                    f"elapsed {hms(elapsed)} | eta {hms(eta)}")
        return f"{self.desc}: {self.done} {self.unit} | elapsed {hms(elapsed)}"

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines" and (self.done == n or time.perf_counter() - self._last >= self.every_s):
            # the first update too: a log shows within seconds that the work started, and at what pace
            self._last = time.perf_counter()
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and self.done:
            print(self.line(), file=self.stream, flush=True)
        self.mode = "off"
