"""DataLoader workers that outlive a stop signal, so the main process can finish its step and save.

Slurm (time limit, preemption, ``scancel``), ``timeout``, ``kill -- -PGID`` and a terminal's Ctrl-C
signal the whole process group, loader workers included. A worker left with the default action dies
of SIGTERM; the main process then fails in ``next()`` ("DataLoader worker (pid …) is killed by signal:
Terminated", pytorch#4507) before its own handler can finish the step and save. So the workers
ignore SIGTERM and SIGINT and the main process shuts them down when it is done with them.

There is a window between the start of a worker and its init function, and PyTorch's worker loop
installs a SIGTERM handler of its own (which dies of the signal) at the start of it: a signal landing
there would kill the worker. :class:`DataLoader` closes it while the workers start by holding the
stop signals blocked in the calling thread and setting them to ``SIG_IGN``: a forked child inherits
both. A spawned one inherits ``SIG_IGN`` across ``exec`` but not the mask (multiprocessing's spawn
resets it, and the child has more than one thread by the time any code of ours runs there, so it
cannot be blocked again for all of them): there the init function, as it is unpickled in the child
before the worker loop starts, makes PyTorch's handler installation put the stop signals straight
back to ``SIG_IGN``, which leaves a window of two system calls. Each worker sets them to ``SIG_IGN`` in its init function and unblocks them,
which drops anything pending. In the main process Linux keeps a blocked signal pending even while it
is ignored; the handler is put back before the mask, so the signal is delivered to the caller's
handler as soon as the workers are up (one that was already pending when the block began is raised
again).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import time
import weakref
from typing import Any, Callable, Iterator

import torch.utils.data

__all__ = ["DataLoader", "STOP_SIGNALS", "batches_of", "dead_worker", "ignore_stop_signals", "shutdown", "stop_signals_blocked"]

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def ignore_stop_signals(worker_id: int, then: Callable[[int], Any] | None = None) -> None:
    """A worker init function: SIGTERM and SIGINT ignored, then the caller's own init (if any)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if then is not None:
        then(worker_id)


class _WorkerInit:
    """:func:`ignore_stop_signals` as a worker init function that, unpickled in a spawned worker,
    blocks the stop signals there until it runs (see the module doc)."""

    def __init__(self, then: Callable[[int], Any] | None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals(worker_id, self.then)

    def __getstate__(self) -> dict[str, Any]:
        return {"then": self.then}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.then = state["then"]
        _keep_stop_signals_ignored()


def _keep_stop_signals_ignored() -> None:
    """In a spawned worker, before PyTorch's worker loop: its signal set-up installs a SIGTERM handler
    that ends the worker (with status 0 when the parent sent the signal, as a group signal from the
    main process does); have the stop signals ignored again the moment it returns."""
    from torch.utils.data._utils import signal_handling  # the worker loop looks it up there at call time

    install = signal_handling._set_worker_signal_handlers
    if getattr(install, "keeps_stop_signals_ignored", False):
        return

    def install_then_ignore(*args: Any, **kwargs: Any) -> Any:
        result = install(*args, **kwargs)
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        return result

    install_then_ignore.keeps_stop_signals_ignored = True  # type: ignore[attr-defined]
    signal_handling._set_worker_signal_handlers = install_then_ignore


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold SIGTERM/SIGINT back while processes are started (see the module doc): blocked and ignored
    here, inherited that way by the children; on leaving, the handlers come back before the mask, so
    a signal that came meanwhile reaches this process's own handler."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may change handlers; nothing to hold back elsewhere
        return
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    settable = {s: h for s, h in handlers.items() if h is not None}  # None: set outside Python
    pending = signal.sigpending() & STOP_SIGNALS  # setting SIG_IGN would discard these
    try:
        for s in settable:
            signal.signal(s, signal.SIG_IGN)
        yield
    finally:
        for s, h in settable.items():
            signal.signal(s, h)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        for s in pending:
            if s not in previous_mask:
                signal.raise_signal(s)


class DataLoader(torch.utils.data.DataLoader):
    """``torch.utils.data.DataLoader`` whose workers ignore the stop signals (see the module doc).
    Every loader of the project with worker processes is one of these: training, evaluation,
    labelled folders, the linear probe and detection."""

    def __init__(self, *args: Any, worker_init_fn: Callable[[int], Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, worker_init_fn=_WorkerInit(worker_init_fn), **kwargs)

    def _get_iterator(self):  # where the workers are started
        if self.num_workers == 0:
            return super()._get_iterator()
        with stop_signals_blocked():
            it = super()._get_iterator()
        _defer_worker_failures()
        _live.add(it)
        return it


def _defer_worker_failures() -> None:
    """PyTorch's SIGCHLD handler raises "DataLoader worker ... is killed by signal" wherever the main
    thread happens to be when a worker dies: in the middle of an optimizer step or an EMA update, a
    state nobody can save. Without it, the next fetch notices the dead worker (PyTorch checks its
    workers every 5 s while it waits) at a point where nothing is half-done, and the trainer saves there."""
    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGCHLD)
    if callable(handler) and getattr(handler, "__module__", "").startswith("torch.utils.data"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def dead_worker(it: Any, wait: float = 2.0) -> str | None:
    """A line naming a dead worker of the DataLoader iterator ``it`` (its pid and signal), waiting up to
    ``wait`` seconds for one to show; ``None`` if every worker lives."""
    workers = list(getattr(it, "_workers", ()))
    deadline = time.monotonic() + wait
    while workers:
        dead = [w for w in workers if not w.is_alive()]
        if dead:
            w = dead[0]
            how = (f"killed by signal {signal.Signals(-w.exitcode).name}" if w.exitcode and w.exitcode < 0
                   else f"exit code {w.exitcode}")
            return f"DataLoader worker (pid {w.pid}) exited unexpectedly ({how})"
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return None


def batches_of(it: Any, wait: float = 2.0) -> Iterator[Any]:
    """The batches of the DataLoader iterator ``it``, a dead worker always reported as PyTorch reports
    one it noticed: ``RuntimeError("DataLoader worker (pid N) exited unexpectedly ...")``.

    A worker killed while the main process receives its batch (the tensors' file descriptors come over
    a socket) resets that socket before the kernel has reaped it, so PyTorch's liveness check still sees
    it alive and lets ``ConnectionResetError`` or ``EOFError`` through; the death shows within
    milliseconds, hence the short wait in :func:`dead_worker`."""
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (ConnectionError, EOFError) as err:
            said = dead_worker(it, wait)
            if said is None:
                raise
            raise RuntimeError(said) from err
        yield batch


def shutdown(it: Any) -> None:
    """Stop the workers of a DataLoader iterator. PyTorch's own shutdown ends with ``terminate()``
    (SIGTERM) for a worker that does not join in time, which these workers ignore: SIGKILL them."""
    stop = getattr(it, "_shutdown_workers", None)
    if stop is None:
        return
    stop()
    for w in getattr(it, "_workers", ()):
        if w.is_alive() and w.pid:
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            w.join(timeout=5)
    _live.discard(it)


# At interpreter exit, multiprocessing terminates daemonic children with SIGTERM and joins them: a
# worker of an iterator nobody closed would ignore it and the exit would hang. This runs first
# (atexit is last-in, first-out; multiprocessing registered its hook when it was imported).
_live: "weakref.WeakSet[Any]" = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for it in list(_live):
        shutdown(it)
