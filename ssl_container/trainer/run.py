"""What a DINO run is made of, and one step of it: ``build_run(cfg, env, device) -> Run`` and
``train_step(run, batches) -> StepRecord`` (generic: the method in ``run.method`` computes the losses).

The loop (``trainer/loop.py``; ``train.py`` is its command line) runs over these two; the step
benchmark and the tests call the very same functions, so a published step time is the trainer's step.
``build_run`` puts the student in a DeepSpeed engine with identical initial weights on every rank;
distribution (SyncBatchNorm, the engine) and speed tricks (fast CPU kernels, ``torch.compile``) are
applied here, from outside the models.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ssl_container import distributed as D
from ssl_container.trainer.checkpoint import CheckpointError, CheckpointManager, TrainState, move_aside
from ssl_container.config import (ConfigError, TrainConfig, config_digest, data_config,
                                  config_to_dict, save_config)
from ssl_container.utils.cpu_kernels import use_fast_cpu_kernels
from ssl_container.data.config import TrainDataConfig
from ssl_container.data.stream import make_train_loader, steps_per_epoch
from ssl_container.dino import DINOSchedules, get_param_groups
from ssl_container.methods import build_method
from ssl_container.methods.base import Method
from ssl_container.trainer.compiling import compile_backbones
from ssl_container.trainer.engine import (TeacherEMA, autocast_context, build_optimizer, effective_precision,
                                          initialize_engine)
from ssl_container.trainer.flat import FlatParameters, pack_buffers
from ssl_container.trainer.resume import data_base_in, fresh_start_refusal, plan_resume, resolve_zero_stage
from ssl_container.trainer.run_lock import RunFolderBusy, RunLock
from ssl_container.utils.runtime import retain_freed_memory

log = logging.getLogger("ssl_container.train")

__all__ = ["Run", "StepRecord", "build_models", "build_run", "build_student", "data_config", "train_step"]


def build_student(cfg: TrainConfig) -> nn.Module:
    """The student ``cfg.method`` trains, freshly initialised (benchmarks, FLOP counts)."""
    return build_method(cfg).build_student()


@dataclass
class Run:
    """Everything one DINO run holds; ``state`` is what a checkpoint resumes."""

    cfg: TrainConfig
    env: D.DistEnv
    device: torch.device
    precision: str
    engine: Any  # the student inside its DeepSpeed engine; engine.module is the method's student
    optimizer: torch.optim.Optimizer
    method: Method  # the teacher, the losses and their state (methods/); the student is engine.module
    schedules: DINOSchedules
    data: TrainDataConfig
    checkpoints: CheckpointManager
    state: TrainState
    total_steps: int
    iters_per_epoch: int
    ema: TeacherEMA | None  # the method's EMA teacher, when it has one
    grads: FlatParameters | None = None  # the student's gradients where the trainer averages and clips them
    # BatchNorm statistics and the center move in every forward: a skipped step restores them from
    # a copy taken before each step into ``saved_buffers`` (allocated once). Every buffer of the
    # teacher, student and loss lives in one of these few flat tensors (flat.pack_buffers).
    buffers: list[torch.Tensor] = field(default_factory=list)
    saved_buffers: list[torch.Tensor] = field(default_factory=list)
    lock: RunLock | None = None  # rank 0's hold on the run folder (run_lock.py); released by close()

    def __post_init__(self) -> None:
        self.saved_buffers = [b.clone() for b in self.buffers]

    def begin_step(self) -> None:
        """Snapshot the buffers (a skipped step restores them: one copy per flat tensor) and point the
        gradients back at the flat buffer where the trainer owns them (DeepSpeed's step sets them to None)."""
        if self.buffers:
            torch._foreach_copy_(self.saved_buffers, self.buffers)
        if self.grads is not None:
            self.grads.zero_grad()

    def update(self, boundary: bool) -> torch.Tensor | None:
        """``engine.step()`` after a backward; at the accumulation boundary, where the trainer owns the
        gradients, it first averages them over the ranks and clips them (returns their norm)."""
        norm = None
        if self.grads is not None and boundary:
            self.grads.all_reduce_mean()
            norm = self.grads.clip_grad_norm_(self.cfg.optim.clip_grad)
        self.engine.step()
        return norm

    def end_step(self, finite: bool, momentum: float | None, grad_norm: torch.Tensor | None) -> Any:
        """The teacher's EMA after a good step, the buffers restored after a skipped one; counts the step
        and returns the gradient norm to log (None for a skipped step)."""
        state = self.state
        if finite:
            if self.ema is not None:
                self.ema(momentum)
            state.consecutive_nonfinite = 0
        else:
            torch._foreach_copy_(self.buffers, self.saved_buffers)
            state.skipped_steps += 1
            state.consecutive_nonfinite += 1
        state.step += 1
        if not finite:
            return None
        return grad_norm if self.grads is not None else self.engine.get_global_grad_norm()

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def schedule_step(self) -> int:
        """Where the schedules and the data stand: the step count, unless a resume changed the samples per step."""
        return self.state.step - self.state.schedule_shift

    def loader(self) -> Any:
        """The training batches from where the run stands, through every later epoch (one set of
        loader workers for the whole run: no restart stall at each epoch)."""
        epoch, in_epoch = divmod(self.schedule_step, self.iters_per_epoch)
        accum = self.cfg.engine.grad_accum_steps
        return make_train_loader(self.data, self.env.rank, self.env.world_size, epoch, start_step=in_epoch * accum,
                                 device=self.device, base=data_base_in(self.state, epoch), epochs=None,
                                 steps=self.iters_per_epoch * accum)

    def close(self) -> None:
        """Let another trainer have the run folder."""
        if self.lock is not None:
            self.lock.release()

    def save(self) -> Path:
        return self.checkpoints.save(self.engine, self.state, self.stateful, self.schedule_step // self.iters_per_epoch)

    @property
    def stateful(self) -> dict[str, nn.Module]:
        """What a checkpoint holds besides the engine, by name (file names in the step folder): the method's."""
        return self.method.stateful()

    @property
    def teacher(self) -> nn.Module | None:
        return getattr(self.method, "teacher", None)


@dataclass
class StepRecord:
    """One optimizer step: whether it was applied, and what it logs to metrics.jsonl."""

    finite: bool
    images: int
    seconds: float
    metrics: dict[str, Any]


def _set_cpu_threads(cfg: TrainConfig, env: D.DistEnv, device: torch.device) -> None:
    """On CPU, leave a core to each loader worker: OpenMP threads that outnumber the free cores spin
    against each other and a step gets several times slower. OMP_NUM_THREADS, when set, wins."""
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(env.local_world_size, 1) - cfg.data.num_workers))


def _check_crops(cfg: TrainConfig, backbone: nn.Module) -> None:
    """Crop sizes the backbone cannot take fail here, naming the keys, not at the first step."""
    stride = getattr(backbone, "total_stride", None)
    if not stride:
        return
    c = cfg.data.crops
    sizes = {"data.crops.global_size": c.global_size, **({"data.crops.local_size": c.local_size} if c.n_local else {})}
    bad = {k: v for k, v in sizes.items() if v % stride}
    if bad:
        raise ConfigError(
            f"{cfg.model.name} needs crop sizes divisible by its total stride {stride}: "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + " (e.g. " + ", ".join(f"{k}={max(stride, round(v / stride) * stride)}" for k, v in bad.items()) + ")")


def build_run(cfg: TrainConfig, env: D.DistEnv, device: torch.device, resume: bool | None = None) -> Run:
    """Models, engine, teacher, loss, schedules and checkpoints of ``cfg``, resumed from the newest
    complete checkpoint in its run folder when ``checkpoint.resume`` (or ``resume``) says so. The
    process group must already exist (``distributed.init_distributed``).

    Rank 0 locks the run folder first (``Run.close`` lets it go): a second trainer on the same folder
    is refused before it writes anything."""
    lock = RunLock(cfg.run_dir) if env.is_main else None
    refusal = lock.acquire() if lock is not None else None
    if not D.all_reduce_min(refusal is None, device):
        if lock is not None:
            lock.release()
            lock.remove_created_dir()
        raise RunFolderBusy(refusal or f"{cfg.run_dir} is in use by another trainer (rank 0's message names it)")
    try:
        run = _build_run(cfg, env, device, resume, lock)
    except BaseException:
        if lock is not None:
            lock.release()
            lock.remove_created_dir()
        raise
    run.lock = lock
    return run


def _data_and_schedules(cfg: TrainConfig, env: D.DistEnv) -> tuple[TrainDataConfig, int, DINOSchedules]:
    """The data stream's config, optimizer steps per epoch, and the schedules over them."""
    dcfg = data_config(cfg)
    accum = cfg.engine.grad_accum_steps
    micro_per_epoch = steps_per_epoch(dcfg, env.world_size)
    iters_per_epoch = micro_per_epoch // accum
    if iters_per_epoch < 1:
        raise ConfigError(f"an epoch has {micro_per_epoch} batches per rank, fewer than engine.grad_accum_steps={accum}: "
                          "raise data.samples_per_epoch or lower engine.grad_accum_steps")
    sched = DINOSchedules(cfg.epochs, iters_per_epoch, cfg.data.batch_size * accum * env.world_size, cfg.schedule)
    return dcfg, iters_per_epoch, sched


def _build_run(cfg: TrainConfig, env: D.DistEnv, device: torch.device, resume: bool | None,
               lock: RunLock | None) -> Run:
    run_dir = Path(cfg.run_dir)
    precision = effective_precision(cfg.engine, device)
    _set_cpu_threads(cfg, env, device)
    if device.type == "cpu" and cfg.engine.cpu_retain_memory:
        retain_freed_memory()

    student, method = build_models(cfg, device, precision)
    dcfg, iters_per_epoch, sched = _data_and_schedules(cfg, env)

    # --- checked before anything is written: crops, the run folder's checkpoints ----------------------
    _check_crops(cfg, student.backbone)
    ckpt = CheckpointManager(run_dir, cfg.checkpoint, meta={})
    resume = cfg.checkpoint.resume if resume is None else resume
    resolve_zero_stage(cfg, ckpt, resume)  # before the config is compared, recorded or saved
    ckpt.meta = {
        "model": {"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs)},
        "method": cfg.method,
        **method.checkpoint_meta(student),
        "config_sha256": config_digest(cfg),
        "config": config_to_dict(cfg),  # the reference a resume compares its config with
    }
    existing = ckpt.complete_steps()
    carried = None
    if existing and not resume:
        _start_over(cfg, env, existing, lock)
    elif resume and existing:
        carried = plan_resume(cfg, ckpt, iters_per_epoch, env.world_size, method)  # refuses before any write
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    # --- engine and resume --------------------------------------------------------------------------
    universal = resume and ckpt.needs_universal(env.world_size, cfg.engine.zero_stage)
    if universal:
        ckpt.prepare_universal()
    no_wd = {f"backbone.{n}" for n in getattr(student.backbone, "no_weight_decay", lambda: set())()}
    optimizer = build_optimizer(cfg.optim, get_param_groups(student, no_wd), lr=cfg.schedule.lr)
    engine, optimizer, ds_config, grads = initialize_engine(cfg.engine, student, optimizer, micro_batch=cfg.data.batch_size,
                                                     clip_grad=cfg.optim.clip_grad, device=device,
                                                     world_size=env.world_size, load_universal=universal)
    if env.is_main:
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1))
    state = (ckpt.load(engine, method.stateful(), universal) if resume else None) or TrainState()
    state.consecutive_nonfinite = 0  # a restart (after a divergence stop, with a lower lr) gets fresh tries
    if carried is not None and carried.step == state.step:
        state.schedule_shift, state.data_base = carried.schedule_shift, carried.data_base
    end = sched.total_iters + state.schedule_shift  # the step count at the schedules' end
    engine.train()
    target = method.ema_target()
    if target is not None:
        target.train()  # batch statistics, as DINO's teacher
    # After the load: the teacher takes the student's storage layout and the buffers move into flat
    # tensors, values kept (a load copies into tensors in place, so either order would do).
    ema = TeacherEMA(target, engine) if target is not None else None
    return Run(cfg=cfg, env=env, device=device, precision=precision, engine=engine, optimizer=optimizer,
               method=method, schedules=sched, data=dcfg, checkpoints=ckpt, state=state,
               total_steps=min(end, cfg.max_steps or end), iters_per_epoch=iters_per_epoch, ema=ema, grads=grads,
               buffers=pack_buffers(_buffer_order(method, engine.module)))


def _buffer_order(method: Method, student: nn.Module) -> tuple[nn.Module, ...]:
    """The modules whose buffers a step moves, in the order the trainer packed them before methods were
    modules (teacher, student, loss state): the flat tensors, and so the step's arithmetic, are unchanged."""
    moving = method.moving()
    return (*moving[:1], student, *moving[1:])


def build_models(cfg: TrainConfig, device: torch.device, precision: str) -> tuple[nn.Module, Method]:
    """The student and the method (its teacher, losses) with identical initial weights on every rank;
    distribution (SyncBatchNorm) and speed (CPU kernels, regional compile) applied from outside the models."""
    try:
        method = build_method(cfg)
    except ValueError as err:  # a distillation teacher that cannot be read
        raise ConfigError(str(err)) from None
    torch.manual_seed(cfg.seed)
    try:
        student = method.build_student()
    except ValueError as err:  # an unknown model name, or kwargs it does not take
        raise ConfigError(f"model.name={cfg.model.name}: {err}") from None
    student = D.maybe_sync_batchnorm(student, device).to(device)
    if device.type == "cpu" and precision == "fp32" and cfg.engine.fast_cpu_kernels and not cfg.engine.compile:
        use_fast_cpu_kernels(student)  # DINO's teacher, a deep copy, inherits them (compiled blocks: inductor's own)
    method.attach(student, device)
    if cfg.engine.compile:
        crops = cfg.data.crops
        compile_backbones(student, *method.networks(), mode=cfg.engine.compile_mode,
                          input_sizes=len({crops.global_size, crops.local_size if crops.n_local else crops.global_size}))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # crop sizes are fixed: pick each convolution's fastest kernel once
    return student, method


def _start_over(cfg: TrainConfig, env: D.DistEnv, existing: list[str], lock: RunLock | None) -> None:
    """A fresh start where checkpoints exist: refused, unless ``checkpoint.overwrite`` moves the old run
    folder aside (nothing is deleted)."""
    run_dir = Path(cfg.run_dir)
    refusal = fresh_start_refusal(cfg, existing)
    if refusal is not None:
        raise CheckpointError(refusal)
    if env.is_main:
        lock.release()  # the lock file goes with the old folder otherwise
        log.warning("checkpoint.overwrite=true: the previous run is now %s", move_aside(run_dir))
        refusal = lock.acquire()
        if refusal:
            raise RunFolderBusy(refusal)
    D.barrier()


def _step_seed(seed: int, step: int, rank: int) -> int:
    # Reseeding per step makes dropout / drop-path independent of what ran before: a resumed run
    # draws exactly what the uninterrupted run drew, on any number of restarts.
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def _to_host(values: dict[str, Any]) -> dict[str, float]:
    """Scalars (tensors or numbers) as floats, with one device-to-host copy for all the tensors."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in values.items() if k not in keys}
    if keys:
        on_host = torch.stack([values[k].detach().float().reshape(()) for k in keys]).cpu().tolist()
        out.update(zip(keys, on_host))
    return out


def train_step(run: Run, batches: Iterator[dict[str, Any]]) -> StepRecord:
    """One optimizer step over ``engine.grad_accum_steps`` batches of crops: the method's losses (DINO:
    the teacher sees the global crops, the student all of them) -> backward -> scheduled update -> the
    EMA of the method's teacher. A non-finite loss on any rank skips the step on every rank and leaves
    every buffer untouched. Nothing here knows a method's config: ``run.method`` does."""
    cfg, state, engine = run.cfg, run.state, run.engine
    it, accum = state.step, cfg.engine.grad_accum_steps
    at = run.schedule_step
    values = run.schedules.apply(run.optimizer, at)
    method_values = run.method.step_values(run.schedules, at)
    t0 = time.perf_counter()
    wait = 0.0
    losses, finite_all, images, stats = [], True, 0, {}
    run.begin_step()
    grad_norm = None
    for micro in range(accum):
        w0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - w0
        # Seeded after fetching: starting loader workers draws from the global generator.
        torch.manual_seed(_step_seed(cfg.seed, it * accum + micro, run.env.rank))
        crops = [c.to(run.device, non_blocking=True) for c in batch["crops"]]
        if cfg.model.channels_last:
            crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
        images += crops[0].shape[0]
        out = run.method.losses(engine, crops, method_values, lambda: autocast_context(run.precision, run.device))
        loss = out.loss
        # Every rank must take the same branch, or the gradient all-reduce waits forever.
        finite = D.all_reduce_min(bool(torch.isfinite(loss).item()), run.device)
        if not finite:
            finite_all = False
            if accum == 1:
                break  # no backward, no optimizer step: the step is skipped exactly
            loss = out.anchor.float().sum() * 0.0  # the poisoned micro-batch contributes no gradient
        engine.backward(loss)
        grad_norm = run.update(boundary=micro == accum - 1)
        # Tensors until the step ends: one transfer to the host per step, not one per value.
        losses.append(loss.detach().float() if finite else torch.tensor(float("nan"), device=run.device))
        stats = dict(out.stats) if finite else {}
    grad_norm = run.end_step(finite_all, method_values.get("momentum"), grad_norm)
    state.images_seen += images * run.env.world_size
    host = _to_host({**({"loss": torch.stack(losses).mean()} if losses else {}), **stats,
                     **({"grad_norm": grad_norm} if grad_norm is not None else {})})
    elapsed = time.perf_counter() - t0  # after the copy to the host: the device's work is in it
    metrics = {
        "loss": host.pop("loss") if finite_all else host.pop("loss", float("nan")) * float("nan"),
        "lr": values["lr"], "wd": values["wd"], **method_values,
        "grad_norm": host.pop("grad_norm", None),
        "images_per_s": images * run.env.world_size / max(elapsed, 1e-9),
        "data_wait": wait / max(elapsed, 1e-9),
        "skipped_steps": state.skipped_steps,
        "epoch": run.schedule_step // run.iters_per_epoch,
        **{k: v for k, v in host.items() if k != "koleo" or finite_all},
    }
    if run.device.type == "cuda":
        metrics["memory_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    else:
        metrics["memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return StepRecord(finite=finite_all, images=images * run.env.world_size, seconds=elapsed, metrics=metrics)
