"""DINO pretraining: the training loop, readable top to bottom.

    ssl-container train --config configs/imagenette.yaml [key=value ...]
    python -m ssl_container.train --config ... [key=value ...]
    torchrun --nproc-per-node 8 -m ssl_container.train --config ...      (or srun / submitit)

One step: a batch of crops from the WebDataset stream -> the teacher sees the global crops, the
student (a DeepSpeed engine) all crops -> DINO loss against the centred teacher -> backward and an
optimizer step with scheduled lr / weight decay -> EMA of the student into the teacher -> metrics;
every ``checkpoint.every_steps`` a checkpoint of everything resumable.
"""
from __future__ import annotations

import json
import logging
import hashlib
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ssl_container import distributed as D
from ssl_container.checkpoint import CheckpointManager, TrainState
from ssl_container.config import TrainConfig, config_digest, load_config, save_config
from ssl_container.cpu_kernels import use_fast_cpu_kernels
from ssl_container.dino import (CollapseMonitor, DINOHead, DINOLoss, DINOSchedules, MultiCropWrapper, get_param_groups,
                                koleo_loss)
from ssl_container.engine import (autocast_context, compile_backbones, ema_update, effective_precision, initialize_engine,
                                  make_teacher, select_device)
from ssl_container.metrics import MetricsLogger, plot_run
from ssl_container.runtime import retain_freed_memory

log = logging.getLogger("ssl_container.train")

__all__ = ["train", "build_student", "data_config", "main", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    pass


def build_student(cfg: TrainConfig) -> MultiCropWrapper:
    from ssl_container.models import create_model

    backbone = create_model(cfg.model.name, num_classes=0, drop_path_rate=cfg.model.drop_path_rate, **cfg.model.kwargs)
    if cfg.model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    head = DINOHead(backbone.num_features, cfg.head.out_dim, cfg.head.hidden_dim, cfg.head.bottleneck_dim,
                    cfg.head.nlayers, cfg.head.norm_last_layer, cfg.head.use_bn)
    return MultiCropWrapper(backbone, head)


def data_config(cfg: TrainConfig):
    """The data pipeline's own config, from the run config's ``data`` section."""
    from ssl_container.data.augment import MultiCropConfig
    from ssl_container.data.stream import TrainDataConfig

    d, c = cfg.data, cfg.data.crops
    if not d.urls:
        raise ValueError("data.urls is empty: pass the training shards, e.g. data.urls=[/data/train-{000000..000099}.tar]")
    urls: Any = d.urls if (d.weights is not None or len(d.urls) > 1) else d.urls[0]
    return TrainDataConfig(
        urls=urls, weights=d.weights, batch_size=d.batch_size, num_workers=d.num_workers,
        shuffle_buffer=d.shuffle_buffer, samples_per_epoch=d.samples_per_epoch, seed=cfg.seed,
        max_bad_fraction=d.max_bad_fraction, augment_on=d.augment_on,
        multicrop=MultiCropConfig(n_global=c.n_global, global_size=c.global_size, global_scale=tuple(c.global_scale),
                                  n_local=c.n_local, local_size=c.local_size, local_scale=tuple(c.local_scale),
                                  blur_sigma=tuple(c.blur_sigma)),
    )


def _set_cpu_threads(cfg: TrainConfig, env: D.DistEnv, device: torch.device) -> None:
    """On CPU, leave a core to each loader worker: OpenMP threads that outnumber the free cores spin
    against each other and a step gets several times slower. OMP_NUM_THREADS, when set, wins."""
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, cores // max(local_ranks, 1) - cfg.data.num_workers))


def _disable_drop_path(model: nn.Module) -> None:
    """DINO's teacher has no stochastic depth; a deep copy of the student would inherit it."""
    for m in model.modules():
        for attr in ("p", "drop_prob"):
            if type(m).__name__ == "DropPath" and hasattr(m, attr):
                setattr(m, attr, 0.0)


# Steps whose loss is replaced by NaN, to exercise the skip/stop logic end to end (tests only).
_FAULT_NAN_STEPS = {int(s) for s in os.environ.get("SSL_CONTAINER_FAULT_NAN_STEPS", "").split(",") if s.strip()}


def _step_seed(seed: int, step: int, rank: int) -> int:
    # Reseeding per step makes dropout / drop-path independent of what ran before: a resumed run
    # draws exactly what the uninterrupted run drew, on any number of restarts.
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the DINO pretraining described by ``cfg``; returns a summary dict."""
    env = D.resolve_env()
    device = select_device(cfg, env.local_rank)
    D.init_distributed(device, env)
    try:
        return _train(cfg, env, device)
    finally:
        D.cleanup()


def _train(cfg: TrainConfig, env: D.DistEnv, device: torch.device) -> dict[str, Any]:
    from ssl_container.data.stream import make_train_loader, steps_per_epoch

    run_dir = Path(cfg.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    precision = effective_precision(cfg, device)
    _set_cpu_threads(cfg, env, device)
    if device.type == "cpu" and cfg.engine.cpu_retain_memory:
        retain_freed_memory()

    # --- models: identical initial weights on every rank, distribution applied from outside ---------
    torch.manual_seed(cfg.seed)
    student = D.maybe_sync_batchnorm(build_student(cfg), device).to(device)
    if device.type == "cpu" and precision == "fp32" and cfg.engine.fast_cpu_kernels:
        use_fast_cpu_kernels(student)  # the teacher, a deep copy, inherits them
    teacher = make_teacher(student)
    _disable_drop_path(teacher)
    if cfg.engine.compile:
        compile_backbones(student, teacher)
    crops = cfg.data.crops
    dino_loss = DINOLoss(cfg.head.out_dim, crops.n_global + crops.n_local, cfg.dino.student_temp,
                         cfg.dino.center_momentum, cfg.dino.sinkhorn_knopp, n_global_crops=crops.n_global).to(device)

    # --- data and schedules -----------------------------------------------------------------------
    dcfg = data_config(cfg)
    accum = cfg.engine.grad_accum_steps
    micro_per_epoch = steps_per_epoch(dcfg, env.world_size)
    iters_per_epoch = micro_per_epoch // accum
    if iters_per_epoch < 1:
        raise ValueError(f"an epoch has {micro_per_epoch} batches per rank, fewer than engine.grad_accum_steps={accum}")
    sched = DINOSchedules(
        epochs=cfg.epochs, niter_per_ep=iters_per_epoch, total_batch_size=cfg.data.batch_size * accum * env.world_size,
        base_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, warmup_epochs=cfg.optim.warmup_epochs,
        weight_decay=cfg.optim.weight_decay, weight_decay_end=cfg.optim.weight_decay_end,
        momentum_teacher=cfg.dino.momentum_teacher, warmup_teacher_temp=cfg.dino.warmup_teacher_temp,
        teacher_temp_end=cfg.dino.teacher_temp, warmup_teacher_temp_epochs=cfg.dino.warmup_teacher_temp_epochs,
        freeze_last_layer=cfg.dino.freeze_last_layer,
    )
    # --- engine and resume --------------------------------------------------------------------------
    ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep_last, meta={
        "model": {"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs)},
        "head": {"in_dim": student.backbone.num_features, **asdict(cfg.head)},
        "config_sha256": config_digest(cfg),
    })
    universal = cfg.checkpoint.resume and ckpt.needs_universal(env.world_size, cfg.engine.zero_stage)
    if universal:
        ckpt.prepare_universal()
    no_wd = {f"backbone.{n}" for n in getattr(student.backbone, "no_weight_decay", lambda: set())()}
    engine, optimizer, ds_config = initialize_engine(cfg, student, get_param_groups(student, no_wd), device,
                                                     env.world_size, load_universal=universal)
    if env.is_main:
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1))
    state = (ckpt.load(engine, teacher, dino_loss.center, universal) if cfg.checkpoint.resume else None) or TrainState()
    total_steps = min(sched.total_iters, cfg.max_steps or sched.total_iters)
    metrics = MetricsLogger(run_dir, env.is_main, total_steps, state.step, cfg.logging.every_steps,
                            cfg.logging.tensorboard, cfg.logging.progress)
    if env.is_main:
        log.info("DINO %s: %d steps (%d per epoch, %d epochs), %d rank(s), batch %d/rank, %s, ZeRO-%d, from step %d",
                 cfg.model.name, total_steps, iters_per_epoch, cfg.epochs, env.world_size, cfg.data.batch_size,
                 precision, cfg.engine.zero_stage, state.step)

    monitor = _OnlineKNN(cfg, env, device) if cfg.monitor.every_epochs > 0 else None
    collapse = CollapseMonitor(cfg.head.out_dim, rows=crops.n_global * cfg.data.batch_size)
    engine.train()
    teacher.train()  # batch statistics, as DINO's teacher
    loader = batches = None
    failed = True
    try:
        while state.step < total_steps:
            epoch, in_epoch = divmod(state.step, iters_per_epoch)
            loader = make_train_loader(dcfg, env.rank, env.world_size, epoch, start_step=in_epoch * accum,
                                       device=device)
            batches = iter(loader)
            while state.step < total_steps and state.step // iters_per_epoch == epoch:
                record = _train_step(cfg, state, sched, engine, optimizer, teacher, dino_loss, batches, accum,
                                     device, precision, env)
                record.update({f"data_{k}": v for k, v in loader.counters.items() if k in ("bad", "seen")})
                metrics.log(state.step, record)
                warning = collapse.update(state.step, record)
                if warning and env.is_main:
                    log.warning(warning)
                    metrics.event("collapse_warning", step=state.step, message=warning)
                if state.consecutive_nonfinite >= cfg.max_nonfinite:
                    folder = ckpt.save(engine, teacher, dino_loss.center, state)
                    raise NonFiniteLossError(
                        f"{state.consecutive_nonfinite} consecutive non-finite losses (steps "
                        f"{state.step - state.consecutive_nonfinite}..{state.step - 1}); the last good weights are "
                        f"saved in {folder}. Usual causes: a learning rate too high for the batch (optim.lr), fp16 "
                        "overflow (use engine.precision=bf16), or corrupt inputs. Lower optim.lr or raise "
                        "optim.warmup_epochs and restart from the same run_dir to resume."
                    )
                if state.step % cfg.checkpoint.every_steps == 0 or state.step == total_steps:
                    ckpt.save(engine, teacher, dino_loss.center, state)
            _close(batches)
            loader = None
            state.epoch = state.step // iters_per_epoch
            if monitor is not None and state.step % iters_per_epoch == 0 and state.epoch % cfg.monitor.every_epochs == 0:
                metrics.scalars("knn", state.step, monitor.run(teacher.backbone))
        failed = False
    finally:
        try:
            _close(batches)
        except Exception:
            # Stopping (submitit's requeue exit, a crash) can race with the workers being signalled
            # too; the loader's complaint must not replace the exception that is stopping the run.
            if not failed:
                raise
            log.warning("the data loader did not shut down cleanly while the run was stopping", exc_info=True)
        metrics.close()
    digests = _rank_digests(engine.module)
    curves = plot_run(run_dir) if env.is_main else None
    summary = {"run_dir": str(run_dir), "steps": state.step, "skipped_steps": state.skipped_steps,
               "checkpoint": str(ckpt.root / (ckpt.latest() or "")), "curves": str(curves) if curves else None,
               "ranks_in_sync": len(set(digests)) == 1, "student_sha256_per_rank": digests}
    if env.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if not summary["ranks_in_sync"]:
            log.error("student weights differ across ranks at the end of training: %s", digests)
    return summary


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


def _train_step(cfg, state, sched, engine, optimizer, teacher, dino_loss, batches, accum, device, precision, env) -> dict:
    it = state.step
    values = sched.apply(optimizer, it)
    momentum, teacher_temp = sched.momentum(it), sched.teacher_temp(it)
    n_global = cfg.data.crops.n_global
    t0 = time.perf_counter()
    wait = 0.0
    losses, finite_all, images, stats, koleo_values = [], True, 0, {}, []
    # BatchNorm statistics move in every forward and the center in every loss; a skipped step must
    # leave them all untouched.
    buffers = [b for m in (teacher, engine.module, dino_loss) for b in m.buffers()]
    buffers_before = [b.clone() for b in buffers]
    for micro in range(accum):
        w0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - w0
        # Seeded after fetching: starting loader workers draws from the global generator.
        torch.manual_seed(_step_seed(cfg.seed, it * accum + micro, env.rank))
        crops = [c.to(device, non_blocking=True) for c in batch["crops"]]
        if cfg.model.channels_last:
            crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
        images += crops[0].shape[0]
        with torch.no_grad(), autocast_context(precision, device):
            teacher_out = teacher(crops[:n_global])
        if cfg.dino.koleo_weight > 0:
            feats, student_out = engine(crops, return_features=True)
        else:
            student_out = engine(crops)
        loss = dino_loss(student_out, teacher_out, teacher_temp)
        if cfg.dino.koleo_weight > 0:
            # DINOv2: on the student's global crops, each crop's batch on its own.
            koleo = sum(koleo_loss(f) for f in feats[:n_global * crops[0].shape[0]].chunk(n_global))
            koleo_values.append(float(koleo.detach()))
            loss = loss + cfg.dino.koleo_weight * koleo
        if it in _FAULT_NAN_STEPS:  # fault injection for the tests of the non-finite path
            loss = loss * float("nan")
        # Every rank must take the same branch, or the gradient all-reduce waits forever.
        finite = D.all_reduce_min(bool(torch.isfinite(loss).item()), device)
        if not finite:
            finite_all = False
            if accum == 1:
                break  # no backward, no optimizer step: the step is skipped exactly
            loss = student_out.float().sum() * 0.0  # the poisoned micro-batch contributes no gradient
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float().item() if finite else float("nan"))
        stats = {k: v.item() for k, v in dino_loss.last_stats.items()} if finite else {}
    if finite_all:
        ema_update(teacher, engine, momentum)
        state.consecutive_nonfinite = 0
    else:
        for b, saved in zip(buffers, buffers_before):
            b.copy_(saved)
        state.skipped_steps += 1
        state.consecutive_nonfinite += 1
    state.step += 1
    state.images_seen += images * env.world_size
    elapsed = time.perf_counter() - t0
    grad_norm = engine.get_global_grad_norm() if finite_all else None
    record = {
        "loss": sum(losses) / len(losses) if finite_all else float("nan"),
        "lr": values["lr"], "wd": values["wd"], "momentum": momentum, "teacher_temp": teacher_temp,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "images_per_s": images * env.world_size / max(elapsed, 1e-9),
        "data_wait": wait / max(elapsed, 1e-9),
        "skipped_steps": state.skipped_steps,
        "epoch": state.step // sched.niter_per_ep,
        **stats,
        **({"koleo": sum(koleo_values) / len(koleo_values)} if koleo_values and finite_all else {}),
    }
    if device.type == "cuda":
        record["memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        record["memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return record


def _close(loader) -> None:
    close = getattr(loader, "close", None)
    if close is not None:
        close()


class _OnlineKNN:
    """k-NN top-1 of the teacher backbone on a labelled split, every ``monitor.every_epochs``."""

    def __init__(self, cfg: TrainConfig, env: D.DistEnv, device: torch.device) -> None:
        if not cfg.monitor.train_urls or not cfg.monitor.val_urls:
            raise ValueError("monitor.every_epochs > 0 needs monitor.train_urls and monitor.val_urls")
        self.cfg, self.env, self.device = cfg, env, device

    def run(self, backbone: nn.Module) -> dict[str, float]:
        from ssl_container.data.augment import EvalTransformConfig
        from ssl_container.data.stream import make_eval_loader
        m = self.cfg.monitor
        transform = EvalTransformConfig(resize=m.resize, crop=m.crop)
        was_training = backbone.training
        backbone.eval()
        try:
            feats = {}
            for split, urls in (("train", m.train_urls), ("val", m.val_urls)):
                loader = make_eval_loader(urls if len(urls) > 1 else urls[0], batch_size=64, rank=self.env.rank,
                                          world_size=self.env.world_size, num_workers=2, transform=transform)
                xs, ys = [], []
                with torch.no_grad():
                    for images, labels, _ in loader:
                        xs.append(backbone(images.to(self.device)).float().cpu())
                        ys.append(labels)
                        if split == "train" and m.max_train_samples and sum(len(y) for y in ys) >= m.max_train_samples:
                            break
                feats[split] = (torch.cat(xs), torch.cat(ys))
            feats = {k: _gather(*v) for k, v in feats.items()}
            top1, top5 = _knn_accuracy(*feats["train"], *feats["val"], k=m.k)
            return {f"top1_k{m.k}": top1, f"top5_k{m.k}": top5}
        finally:
            backbone.train(was_training)


def _knn_accuracy(train_x, train_y, val_x, val_y, k: int = 20, temperature: float = 0.07) -> tuple[float, float]:
    """DINO's weighted k-NN vote, brute force: enough for a monitor on a labelled subset (the full,
    faiss-backed evaluation is ``python -m eval.knn``)."""
    train_x = torch.nn.functional.normalize(train_x, dim=1)
    val_x = torch.nn.functional.normalize(val_x, dim=1)
    classes = int(max(train_y.max(), val_y.max())) + 1
    correct1 = correct5 = 0
    for start in range(0, len(val_x), 1024):
        sims, idx = (val_x[start:start + 1024] @ train_x.T).topk(min(k, len(train_x)), dim=1)
        votes = torch.zeros(len(idx), classes).scatter_add_(1, train_y[idx], (sims / temperature).exp())
        top = votes.topk(min(5, classes), dim=1).indices
        truth = val_y[start:start + 1024, None]
        correct1 += int((top[:, :1] == truth).sum())
        correct5 += int((top == truth).any(dim=1).sum())
    return correct1 / len(val_x), correct5 / len(val_x)


def _gather(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return x, y
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, (x, y))
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ssl_container.train ...`` is ``ssl-container train ...``."""
    from ssl_container.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
