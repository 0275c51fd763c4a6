"""DINO pretraining: the training loop, readable top to bottom.

    ssl-container train --config configs/imagenette.yaml [key=value ...]
    python -m ssl_container.train --config ... [key=value ...]
    torchrun --nproc-per-node 8 -m ssl_container.train --config ...      (or srun / submitit)

``build_run`` (run.py) makes the run: student in a DeepSpeed engine, EMA teacher, loss, schedules,
checkpoints, resumed state. This module is the loop over ``dino_step`` (run.py: the teacher sees the
global crops, the student all crops -> DINO loss -> backward and a scheduled update -> EMA): one
WebDataset loader per epoch, metrics and collapse warnings per step, a checkpoint every
``checkpoint.every_steps``, the online k-NN monitor at epoch ends.
"""
from __future__ import annotations

import hashlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ssl_container import distributed as D
from ssl_container.config import (ConfigError, TrainConfig, config_to_dict, flatten_config, load_config, print_resolved,
                                  train_argument_parser)
from ssl_container.dino import CollapseMonitor
from ssl_container.engine import select_device
from ssl_container.knn import OnlineKNN
from ssl_container.metrics import MetricsLogger, plot_run
from ssl_container.run import Run, build_run, build_student, data_config, dino_step
from ssl_container.files import atomic_write_json
from ssl_container.trackers import Trackers, open_trackers

log = logging.getLogger("ssl_container.train")

__all__ = ["train", "build_student", "data_config", "main", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    pass


class StoppedBySignal(Exception):
    """SIGTERM / SIGINT: the step in flight finished and a checkpoint was saved."""

    def __init__(self, signum: int, folder: Path, step: int) -> None:
        self.signum, self.folder, self.step = signum, folder, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint saved in {folder}; "
                         "run the same command again to resume from it")


class _StopSignals:
    """SIGTERM and SIGINT ask the loop to stop after the current step (with a checkpoint); a second
    one acts at once (the default action is put back). Handlers someone else installed (submitit's,
    a notebook's) are left in place, and so is Slurm's USR2 path."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    DEFAULTS = (signal.SIG_DFL, signal.default_int_handler)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        log.warning("%s received: stopping after this step with a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if signal.getsignal(s) in self.DEFAULTS:
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the DINO pretraining described by ``cfg``; returns a summary dict."""
    env = D.resolve_env()
    device = select_device(cfg, env.local_rank)
    D.init_distributed(device, env)
    try:
        return _train(build_run(cfg, env, device))
    finally:
        D.cleanup()


def _train(run: Run) -> dict[str, Any]:
    cfg, env, state = run.cfg, run.env, run.state
    metrics = MetricsLogger(run.run_dir, env.is_main, run.total_steps, state.step, cfg.logging.every_steps,
                            _trackers(cfg, state.step) if env.is_main else None, cfg.logging.progress)
    if env.is_main:
        log.info("DINO %s: %d steps (%d per epoch, %d epochs), %d rank(s), batch %d/rank, %s, ZeRO-%d, from step %d",
                 cfg.model.name, run.total_steps, run.iters_per_epoch, cfg.epochs, env.world_size, cfg.data.batch_size,
                 run.precision, cfg.engine.zero_stage, state.step)
    monitor = OnlineKNN(cfg.monitor, env.rank, env.world_size, run.device) if cfg.monitor.every_epochs > 0 else None
    collapse = CollapseMonitor(cfg.head.out_dim, rows=cfg.data.crops.n_global * cfg.data.batch_size)
    batches = None
    failed = True
    stops = _StopSignals()
    try:
        stops.__enter__()
        while state.step < run.total_steps:
            epoch, loader = run.epoch_loader()
            batches = iter(loader)
            while state.step < run.total_steps and run.schedule_step // run.iters_per_epoch == epoch:
                record = dino_step(run, batches).metrics
                record.update({f"data_{k}": v for k, v in loader.counters.items() if k in ("bad", "seen")})
                metrics.log(state.step, record)
                warning = collapse.update(state.step, record)
                if warning and env.is_main:
                    log.warning(warning)
                    metrics.event("collapse_warning", step=state.step, message=warning)
                if state.consecutive_nonfinite >= cfg.max_nonfinite:
                    folder = run.save()
                    raise NonFiniteLossError(
                        f"{state.consecutive_nonfinite} consecutive non-finite losses (steps "
                        f"{state.step - state.consecutive_nonfinite + 1}..{state.step}, as logged); the last good weights are "
                        f"saved in {folder}. Usual causes: a learning rate too high for the batch (schedule.lr), fp16 "
                        "overflow (use engine.precision=bf16), or corrupt inputs. Lower schedule.lr or raise "
                        "schedule.warmup_epochs and restart from the same run_dir to resume."
                    )
                # Every rank stops at the same step, even if only one received the signal.
                if env.world_size > 1 or stops.received is not None:
                    if not D.all_reduce_min(stops.received is None, run.device):
                        folder = run.save()
                        if env.is_main:
                            metrics.event("stopped", step=state.step, signal=stops.received or 0, checkpoint=str(folder))
                        raise StoppedBySignal(stops.received or signal.SIGTERM, folder, state.step)
                if state.step % cfg.checkpoint.every_steps == 0 or state.step == run.total_steps:
                    run.save()
            _close(batches)
            epoch_done, in_epoch = divmod(run.schedule_step, run.iters_per_epoch)
            if monitor is not None and in_epoch == 0 and epoch_done % cfg.monitor.every_epochs == 0:
                metrics.scalars("knn", state.step, monitor.run(run.teacher.backbone))
        failed = False
    finally:
        stops.__exit__()
        try:
            _close(batches)
        except Exception:
            # Stopping (submitit's requeue exit, a crash) can race with the workers being signalled
            # too; the loader's complaint must not replace the exception that is stopping the run.
            if not failed:
                raise
            log.warning("the data loader did not shut down cleanly while the run was stopping", exc_info=True)
        if failed:  # trackers record a stopped run as killed; a resume continues it
            metrics.close(ok=False)
    digests = _rank_digests(run.engine.module)
    curves = plot_run(run.run_dir) if env.is_main else None
    summary = {"run_dir": str(run.run_dir), "steps": state.step, "skipped_steps": state.skipped_steps,
               "checkpoint": str(run.checkpoints.root / (run.checkpoints.latest() or "")),
               "curves": str(curves) if curves else None,
               "ranks_in_sync": len(set(digests)) == 1, "student_sha256_per_rank": digests}
    if env.is_main:
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


def main(argv: Sequence[str] | None = None) -> int:
    """``ssl-container train ...`` and ``python -m ssl_container.train ...`` (also under torchrun / srun)."""
    args = train_argument_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.print_config:
        return print_resolved(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"ssl-container train: {err}", file=sys.stderr)
        return 2
    try:
        summary = train(cfg)
    except StoppedBySignal as stop:
        if D.resolve_env().is_main:
            print(f"ssl-container train: {stop}", file=sys.stderr)
        return 128 + stop.signum  # the shell's convention for "terminated by signal N"
    if D.resolve_env().is_main:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
