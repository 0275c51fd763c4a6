"""The resume policy, in one place: what a run folder's checkpoint and a new config make of a resume.

A resume compares the config with the one the checkpoint was written with (its meta.json; the run's
config.yaml for checkpoints of earlier versions). Every difference is listed; a key that
reinterprets the saved state (data position, schedules, random draws) is refused unless
``checkpoint.allow_changes`` names it; an accepted change of the samples per step or per epoch
carries the position over (the schedules' step and each data stream's sample position), and positions
carried by an earlier change hold only for the streams they were counted in. All of it is decided
before anything is written; ``build_run`` applies the result.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from ssl_container.config import (ConfigError, TrainConfig, changes_state, config_changes, data_config,
                                  load_config)
from ssl_container.data.stream import samples_per_rank, steps_per_epoch, stream_positions
from ssl_container.trainer.checkpoint import CheckpointError, CheckpointManager, TrainState

log = logging.getLogger("ssl_container.train")

__all__ = ["carry_position", "check_carried_streams", "plan_resume", "reference_changes"]


def plan_resume(cfg: TrainConfig, ckpt: CheckpointManager, iters_per_epoch: int, world_size: int) -> TrainState | None:
    """The counters a resume of ``ckpt``'s newest intact checkpoint goes on with (None: none to read),
    after every check; raises :class:`CheckpointError` for a resume that must be refused."""
    meta = ckpt.peek()  # verifies the checkpoint's files; falls back to the newest intact one
    if meta is None:
        return None
    ckpt.check_compatible(meta, ckpt.root / ckpt.resume_point())
    saved_world = meta.get("world_size", world_size)
    previous = reference_changes(cfg, meta, Path(cfg.run_dir) / "config.yaml")
    carried = TrainState.from_dict(meta.get("train_state", {}))
    if previous is not None:
        carry_position(carried, previous, cfg, iters_per_epoch, world_size, saved_world)
    check_carried_streams(carried, cfg, iters_per_epoch, world_size, saved_world)
    return carried


def reference_changes(cfg: TrainConfig, meta: dict[str, Any], saved_path: Path) -> TrainConfig | None:
    """A resume lists every key that differs from the config the checkpoint was written with (its
    meta.json; the run's config.yaml for checkpoints of earlier versions); keys that reinterpret the
    saved state refuse unless checkpoint.allow_changes names them. Returns that config when an accepted
    change alters the samples per step or epoch (the position is then carried over). config.yaml is not
    the reference: a launcher writes it at submission, and a changed run may stop before its first save."""
    if "config" in meta:
        saved = meta["config"]
    elif saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text()) or {}
    else:
        return None
    changes = [c for c in config_changes(saved, cfg) if c[0] != "checkpoint.allow_changes"]
    if not changes:
        return None
    log.warning("resuming %s with a changed config: %s", saved_path.parent,
                "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes))
    refused = [k for k, _, _ in changes if changes_state(k) and k not in cfg.checkpoint.allow_changes]
    if refused:
        raise CheckpointError(
            f"resuming {saved_path.parent} would change {', '.join(refused)}, which the saved state depends on (data "
            "position, schedules, random draws). Resume with the values it was trained with (its config.yaml, or "
            "the checkpoint's meta.json), train in a new run_dir, "
            f"or accept the change knowingly with checkpoint.allow_changes=[{','.join(refused)}]. Nothing has been "
            "changed.")
    if not any(k in _PER_STEP_KEYS for k, _, _ in changes):
        return None
    try:
        return load_config(saved)
    except (ConfigError, ValueError) as err:
        raise CheckpointError(f"{saved_path} cannot be read back to carry the data position over: {err}") from None


# Keys that change the samples per step or per epoch: an accepted change re-places schedules and data.
_PER_STEP_KEYS = ("data.batch_size", "engine.grad_accum_steps", "data.samples_per_epoch")


def carry_position(state: TrainState, old: TrainConfig, cfg: TrainConfig, iters_per_epoch: int, world_size: int,
                    old_world_size: int) -> None:
    """After an accepted change of the samples per step, go on at the same point: the same epoch, the
    schedules at the step that leaves the same number of samples in it, and each data stream at the
    raw sample position it had reached, so that no position is skipped or read twice."""
    if not state.step:
        return
    old_data, new_data = data_config(old), data_config(cfg)
    old_accum, accum = old.engine.grad_accum_steps, cfg.engine.grad_accum_steps
    old_iters = steps_per_epoch(old_data, old_world_size) // old_accum
    epoch, k = divmod(state.step - state.schedule_shift, old_iters)
    streams = max(1, new_data.num_workers)
    if k and (max(1, old_data.num_workers) != streams or old_world_size != world_size):
        raise CheckpointError(
            f"a change of the samples per step or epoch in the middle of epoch {epoch} (step {k} of {old_iters}) "
            "carries each data stream's position only with the same streams: keep "
            f"data.num_workers={old_data.num_workers} and {old_world_size} rank(s) for this resume (change them at an "
            "epoch boundary). Nothing has been changed.")
    positions = stream_positions(k * old_accum, streams, old_data.batch_size, state.base_in(epoch)) if k else [0] * streams
    left = samples_per_rank(new_data, world_size) - sum(positions)
    new_k = min(iters_per_epoch, max(0, iters_per_epoch - left // (new_data.batch_size * accum))) if k else 0
    state.schedule_shift = state.step - (epoch * iters_per_epoch + new_k)
    state.data_base = {"epoch": epoch, "step": new_k * accum, "positions": positions} if k else None
    log.warning("samples per step %d -> %d (checkpoint.allow_changes): step %d goes on at the schedules' step %d "
                "(epoch %d, %d of %d steps); each data stream of a rank goes on from its sample position %s",
                old_data.batch_size * old_accum, new_data.batch_size * accum, state.step,
                state.step - state.schedule_shift, epoch, new_k, iters_per_epoch, positions)


def check_carried_streams(state: TrainState, cfg: TrainConfig, iters_per_epoch: int, world_size: int,
                           saved_world_size: int) -> None:
    """Positions carried over by an earlier change hold for the streams they were counted in: until that
    epoch ends, another data.num_workers or number of ranks is refused before anything is written."""
    base = state.data_base
    if not state.base_in((state.step - state.schedule_shift) // iters_per_epoch):
        return
    if len(base["positions"]) != max(1, cfg.data.num_workers) or world_size != saved_world_size:
        raise CheckpointError(
            f"this run changed its samples per step in epoch {base['epoch']}, and its data streams go on from the "
            f"positions they had reached until that epoch ends: resume with data.num_workers="
            f"{len(base['positions'])} and {saved_world_size} rank(s) until then. Nothing has been changed.")
