"""Stop signals: SIGTERM and SIGINT, as clusters, ``timeout`` and terminals send them.

Two policies, one per kind of command:

* :class:`GracefulStop` (the trainer): the first signal asks the loop to stop at the next step
  boundary; the loop saves a checkpoint and exits ``128 + N``. A repeat more than
  ``GracefulStop.REPEAT_GRACE_S`` later stops the process at once (the default action). Repeats
  inside that window are the same stop delivered twice: a group signal reaches every process, and
  launchers such as torchrun forward it once more to their children a moment later.
* :func:`stop_raises` (evaluation commands): the signal raises :class:`Stopped` in the main thread,
  so the command unwinds through its ``finally`` blocks and atomic writes (what is written stays
  written, nothing torn is left), and its ``main`` exits ``128 + N`` with one line.

Loader workers ignore both signals (``ssl_container.data.workers``); the main process shuts them down.
Handlers somebody else installed (submitit's, a notebook's) are left in place.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import functools
import sys
from typing import Any, Callable, Iterator

log = logging.getLogger("ssl_container.signals")

__all__ = ["GracefulStop", "Refusal", "Stopped", "StoppedBySignal", "STOP_SIGNALS", "stop_raises", "stoppable", "exit_code"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_DEFAULTS = (signal.SIG_DFL, signal.default_int_handler)


class Refusal(RuntimeError):
    """Input the command cannot use (a damaged or unsafe checkpoint, a wrong file), with what to do about
    it: a :func:`stoppable` command prints its message in one line and exits 2. The checkpoint readers'
    ``CheckpointError`` is one; this module knows the kind, not the readers."""


def exit_code(signum: int) -> int:
    """The shell's convention for "terminated by signal N"."""
    return 128 + int(signum)


def _ours_to_take(s: int) -> bool:
    return signal.getsignal(s) in _DEFAULTS


class GracefulStop:
    """Record the first stop signal for the loop to act on at a step boundary (see the module doc).

    ``announce``: log the one warning line (rank 0 only: every rank of a job receives the signal)."""

    REPEAT_GRACE_S = 3.0

    def __init__(self, announce: bool = True, take: tuple[int, ...] = ()) -> None:
        """``take``: further signals handled the same way even where someone else installed a handler
        (a launcher that hands its requeue warning, or a SIGTERM it would ignore, to the trainer)."""
        self.announce = announce
        self.take = tuple(int(s) for s in take)
        self.received: int | None = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._at = signum, now
            if self.announce:
                log.warning("%s received: stopping after this step with a checkpoint (send it again to stop at once)",
                            signal.Signals(signum).name)
            return
        if now - self._at < self.REPEAT_GRACE_S:
            return  # the same stop, delivered again by a launcher
        # A deliberate second signal: stop now, with the signal's own default action.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in dict.fromkeys((*STOP_SIGNALS, *self.take)):
                if s in self.take or _ours_to_take(s):
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()


class StoppedBySignal(Exception):
    """The trainer's stop: the step in flight finished and a checkpoint was saved in ``folder``."""

    def __init__(self, signum: int, folder: Any, step: int) -> None:
        self.signum, self.folder, self.step = int(signum), folder, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint saved in {folder}; "
                         "run the same command again to resume from it")


class Stopped(BaseException):
    """A stop signal ended an evaluation command; ``main`` turns it into ``128 + signum``. A
    BaseException, like KeyboardInterrupt, so that ``except Exception`` blocks let it through."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def stop_raises() -> Iterator[None]:
    """Within the block, the first SIGTERM or SIGINT raises :class:`Stopped` in the main thread.
    While the command unwinds, repeats within ``GracefulStop.REPEAT_GRACE_S`` are ignored (the same
    stop delivered twice) and a later one stops the process at once."""
    previous: dict[int, Any] = {}
    first_at: list[float] = []

    def handle(signum: int, frame: Any) -> None:
        if not first_at:
            first_at.append(time.monotonic())
            raise Stopped(signum)
        if time.monotonic() - first_at[0] >= GracefulStop.REPEAT_GRACE_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            if _ours_to_take(s):
                previous[s] = signal.signal(s, handle)
    try:
        yield
    finally:
        for s, p in previous.items():
            signal.signal(s, p)


_stoppable_depth: list[str] = []


def stoppable(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command's ``main``: a stop signal unwinds it (files it finished stay, atomic writes
    leave nothing torn) and it returns ``128 + N`` after one line from rank 0. Weights it cannot use
    (a damaged or unsafe checkpoint, a missing file) are refused in one line with exit code 2."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            if _stoppable_depth:  # called from another stoppable command: the outermost one reports
                return main(*args, **kwargs)
            _stoppable_depth.append(prog)
            try:
                return _run(*args, **kwargs)
            finally:
                _stoppable_depth.pop()

        def _run(*args: Any, **kwargs: Any) -> int:
            with stop_raises():
                try:
                    return main(*args, **kwargs)
                except Stopped as stop:
                    from ssl_container.distributed import resolve_env

                    if resolve_env().is_main:
                        print(f"{prog}: {stop}; what it had finished writing is kept, and running the same command "
                              "again reuses it", file=sys.stderr)
                    return exit_code(stop.signum)
                except (Refusal, FileNotFoundError) as err:
                    from ssl_container.distributed import resolve_env

                    if resolve_env().is_main:
                        print(f"{prog}: {err}", file=sys.stderr)
                    return 2
        return run
    return wrap
