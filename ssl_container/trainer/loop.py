"""The training loop, readable top to bottom: ``train(cfg)``.

``build_run`` (run.py) makes the run: student in a DeepSpeed engine, the method (methods/: DINO's EMA
teacher and loss, or distillation's frozen teacher), schedules, checkpoints, resumed state. This module
is the loop over ``train_step`` (run.py: the method's losses -> backward and a scheduled update -> the
EMA when the method has one): one
WebDataset loader for all epochs, metrics and collapse warnings per step, a checkpoint every
``checkpoint.every_steps``, the online k-NN monitor at epoch ends, a stop signal honoured at a step
boundary. The command line (``ssl_container.train``) imports it only once the config is good, so
``--help`` and config refusals answer without loading torch.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import signal
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ssl_container import distributed as D
from ssl_container.config import TrainConfig, check_shards, config_to_dict, flatten_config
from ssl_container.dino import CollapseMonitor
from ssl_container.trainer.compiling import eager
from ssl_container.trainer.engine import select_device
from ssl_container.trainer.knn_monitor import OnlineKNN
from ssl_container.trainer.metrics import MetricsLogger, plot_run
from ssl_container.trainer.run import Run, build_run, train_step
from ssl_container.signals import GracefulStop, StoppedBySignal
from ssl_container.utils.files import atomic_write_json
from ssl_container.trainer.trackers import Trackers, open_trackers

log = logging.getLogger("ssl_container.train")

__all__ = ["train", "NonFiniteLossError", "LoaderWorkerDied"]


class NonFiniteLossError(RuntimeError):
    pass


class LoaderWorkerDied(RuntimeError):
    """A data loader worker died (killed, out of memory); the message says what was saved."""


def _step(run: Run, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """``train_step``; if a loader worker dies while it fetches, the step has not changed the weights
    or the optimizer (a fetch comes before any update, and accumulated gradients are not saved), so a
    single-rank run saves at this step boundary before stopping: nothing since the last save is lost."""
    try:
        return train_step(run, batches).metrics
    except RuntimeError as err:
        said = str(err).strip().splitlines()[0].rstrip(". ")
        # A worker's death only: PyTorch re-raises a worker's own exception as "Caught X in DataLoader
        # worker process N" (bad data, a bug), which must surface as it is.
        if type(err) is not RuntimeError or "DataLoader worker" not in said or \
                not ("exited unexpectedly" in said or "killed by signal" in said):
            raise
        if run.env.world_size > 1:  # a save is collective, and the other ranks are in the step's all-reduce
            raise LoaderWorkerDied(f"{said}; stopping (the newest checkpoint is the one to resume from)") from None
        if run.buffers:  # a death after the first micro-batch: its centre / BatchNorm updates are undone
            torch._foreach_copy_(run.buffers, run.saved_buffers)
        tag = f"step_{run.state.step:08d}"
        # This step saved already (a periodic save, a resume): keep that checkpoint rather than rewrite it.
        folder = run.checkpoints.root / tag if run.checkpoints.latest() == tag else run.save()
        raise LoaderWorkerDied(f"{said}. The run saved step {run.state.step} in {folder}: run the same command "
                               "again to resume from it (if the worker ran out of memory, lower data.num_workers "
                               "or data.shuffle_buffer)") from None


def train(cfg: TrainConfig, take_signals: Sequence[int] = ()) -> dict[str, Any]:
    """Run (or resume) the DINO pretraining described by ``cfg``; returns a summary dict.

    SIGTERM / SIGINT (to this process or its whole group) from the very start: the run stops at the
    next step boundary with a checkpoint and raises :class:`StoppedBySignal`. ``take_signals``: more
    signals that stop it the same way, taken over from whoever handles them (a launcher's requeue
    warning)."""
    check_shards(cfg)  # before anything is written
    env = D.resolve_env()
    device = select_device(cfg.engine, env.local_rank)
    with GracefulStop(announce=env.is_main, take=tuple(take_signals)) as stops, _process_group(device, env), \
            contextlib.closing(build_run(cfg, env, device)) as run:
        return _train(run, stops)


def _train(run: Run, stops: GracefulStop) -> dict[str, Any]:
    """The loop: a stop check, one step, its metrics and warnings, the periodic save and k-NN."""
    cfg, state = run.cfg, run.state
    metrics = MetricsLogger(run.run_dir, run.env.is_main, run.total_steps, state.step, cfg.logging.every_steps,
                            _trackers(cfg, state.step) if run.env.is_main else None, cfg.logging.progress)
    _announce(run)
    monitor = OnlineKNN(cfg.monitor, run.env.rank, run.env.world_size, run.device) if cfg.monitor.every_epochs else None
    collapse = CollapseMonitor(cfg.head.out_dim, rows=cfg.data.crops.n_global * cfg.data.batch_size)
    loader = run.loader()
    with _stepping(loader, metrics) as batches:
        while state.step < run.total_steps:
            _stop_if_asked(run, stops, metrics)  # before each step: a signal in start-up or an epoch change too
            record = _step(run, batches)
            record.update({f"data_{k}": v for k, v in loader.counters.items() if k in ("bad", "seen")})
            metrics.log(state.step, record)
            _watch(run, collapse, metrics, record)
            if state.step % cfg.checkpoint.every_steps == 0 or state.step == run.total_steps:
                run.save()
            epoch_done, in_epoch = divmod(run.schedule_step, run.iters_per_epoch)
            if monitor is not None and in_epoch == 0 and epoch_done % cfg.monitor.every_epochs == 0:
                with eager():  # eval mode, another size and batch: graphs the training steps never use
                    metrics.scalars("knn", state.step, monitor.run(run.method.monitored(run.engine.module)))
    return _finish(run, metrics)


def _stop_if_asked(run: Run, stops: GracefulStop, metrics: MetricsLogger) -> None:
    """At a step boundary: if any rank received a stop signal, every rank saves and stops here."""
    if run.env.world_size == 1 and stops.received is None:
        return
    if D.all_reduce_min(stops.received is None, run.device):
        return
    tag = f"step_{run.state.step:08d}"
    # Stopped before a step since the last save (during start-up, say): that checkpoint is the state.
    folder = run.checkpoints.root / tag if run.checkpoints.latest() == tag else run.save()
    if run.env.is_main:
        metrics.event("stopped", step=run.state.step, signal=stops.received or 0, checkpoint=str(folder))
    raise StoppedBySignal(stops.received or signal.SIGTERM, folder, run.state.step)


@contextlib.contextmanager
def _process_group(device: torch.device, env: D.DistEnv) -> Iterator[None]:
    D.init_distributed(device, env)
    try:
        yield
    finally:
        D.cleanup()


@contextlib.contextmanager
def _stepping(loader: Any, metrics: MetricsLogger) -> Iterator[Iterator[dict[str, Any]]]:
    """The loader's batches for the loop; however the loop ends, its workers are shut down, and a run
    that failed or was stopped is recorded as killed by the trackers (a resume continues it)."""
    batches = iter(loader)
    try:
        yield batches
    except BaseException:
        try:
            _close(batches)
        except Exception:
            # Stopping (submitit's requeue exit, a crash) can race with the workers being signalled
            # too; the loader's complaint must not replace the exception that is stopping the run.
            log.warning("the data loader did not shut down cleanly while the run was stopping", exc_info=True)
        metrics.close(ok=False)
        raise
    _close(batches)


def _announce(run: Run) -> None:
    cfg = run.cfg
    if run.env.is_main:
        log.info("%s %s: %d steps (%d per epoch, %d epochs), %d rank(s), batch %d/rank, %s, ZeRO-%d, from step %d",
                 "DINO" if cfg.method == "dino" else cfg.method, cfg.model.name, run.total_steps, run.iters_per_epoch,
                 cfg.epochs, run.env.world_size, cfg.data.batch_size, run.precision, cfg.engine.zero_stage, run.state.step)


def _watch(run: Run, collapse: CollapseMonitor, metrics: MetricsLogger, record: dict[str, Any]) -> None:
    """After a step: a collapse warning when the teacher's outputs degenerate; a stop, with the last good
    weights saved, after ``max_nonfinite`` non-finite losses in a row."""
    state = run.state
    warning = collapse.update(state.step, record)
    if warning and run.env.is_main:
        log.warning(warning)
        metrics.event("collapse_warning", step=state.step, message=warning)
    if state.consecutive_nonfinite >= run.cfg.max_nonfinite:
        folder = run.save()
        raise NonFiniteLossError(
            f"{state.consecutive_nonfinite} consecutive non-finite losses (steps "
            f"{state.step - state.consecutive_nonfinite + 1}..{state.step}, as logged); the last good weights are "
            f"saved in {folder}. Usual causes: a learning rate too high for the batch (schedule.lr), fp16 "
            "overflow (use engine.precision=bf16), or corrupt inputs. To go on with a lower learning rate, restart "
            "from the same run_dir with e.g. schedule.lr=<lower> checkpoint.allow_changes=[schedule.lr] (the count "
            "of non-finite steps starts again at 0); if those weights have already run away (see grad_norm in "
            "metrics.jsonl), point checkpoints/latest at an earlier step folder first."
        )


def _finish(run: Run, metrics: MetricsLogger) -> dict[str, Any]:
    """The summary (and summary.json), with a check that every rank ends with the same student."""
    digests = _rank_digests(run.engine.module)
    curves = plot_run(run.run_dir) if run.env.is_main else None
    summary = {"run_dir": str(run.run_dir), "steps": run.state.step, "skipped_steps": run.state.skipped_steps,
               "checkpoint": str(run.checkpoints.root / (run.checkpoints.latest() or "")),
               "curves": str(curves) if curves else None,
               "ranks_in_sync": len(set(digests)) == 1, "student_sha256_per_rank": digests}
    if run.env.is_main:
        atomic_write_json(run.run_dir / "summary.json", summary)
        if not summary["ranks_in_sync"]:
            log.error("student weights differ across ranks at the end of training: %s", digests)
    metrics.close(artifacts=[curves, run.run_dir / "summary.json"])
    # The ranks leave together: one that tore down its process group while rank 0 was still plotting
    # was seen to abort in gloo's teardown (a resume at the final step, where no step paces them).
    D.barrier()
    return summary


def _trackers(cfg: TrainConfig, start_step: int) -> Trackers:
    """The run's trackers, with the resolved config as their parameters (rank 0 only)."""
    lc = cfg.logging
    backends = (["tensorboard"] if lc.tensorboard else []) + list(lc.backends)
    trackers = open_trackers(backends, cfg.run_dir, start_step, experiment=lc.experiment, run_name=lc.run_name,
                             mlflow_uri=lc.mlflow_uri, wandb_mode=lc.wandb_mode)
    trackers.params(flatten_config(config_to_dict(cfg)))
    return trackers


def _rank_digests(module: nn.Module) -> list[str]:
    """sha256 of the student's parameters on every rank: data parallelism must keep them identical."""
    h = hashlib.sha256()
    for _, p in sorted(module.named_parameters()):
        h.update(p.detach().float().cpu().numpy().tobytes())
    digest = h.hexdigest()
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [digest]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, digest)
    return out


def _close(loader) -> None:
    close = getattr(loader, "close", None)
    if close is not None:
        close()
