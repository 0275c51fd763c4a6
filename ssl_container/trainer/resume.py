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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ssl_container.config import (MOVED_KEYS, ConfigError, TrainConfig, config_to_dict, data_config, flatten_config,
                                  load_config)
from ssl_container.data.stream import samples_per_rank, steps_per_epoch, stream_positions
from ssl_container.trainer.checkpoint import CheckpointError, CheckpointManager, TrainState

log = logging.getLogger("ssl_container.train")

__all__ = ["STATE_KEYS", "ResumePlan", "carry_position", "changes_state", "check_carried_streams", "config_changes",
           "data_base_in", "fresh_start_refusal", "make_plan", "plan_resume", "preview", "reference_config",
           "resolve_zero_stage"]

# Keys whose change reinterprets a saved run: the method and its teacher, the data position (batch, epoch
# length, crops), the schedules' lengths, the seed of every random draw. Resuming with another value
# refuses unless checkpoint.allow_changes names the key.
STATE_KEYS = ("method", "distill.", "seed", "data.seed", "epochs", "data.batch_size", "data.samples_per_epoch",
              "data.urls", "data.weights", "data.crops.", "engine.grad_accum_steps", "schedule.warmup_epochs", "schedule.lr", "schedule.min_lr",
              "schedule.lr_reference_batch", "schedule.warmup_teacher_temp_epochs", "schedule.freeze_last_layer")


def data_base_in(state: TrainState, epoch: int) -> tuple[int, list[int]] | None:
    """(step, positions) the streams go on from in ``epoch``, where a change was carried over in it."""
    b = state.data_base
    return (b["step"], b["positions"]) if b and b["epoch"] == epoch else None


def config_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key that differs from a run's saved config.yaml."""
    old = {MOVED_KEYS.get(k, k): v for k, v in flatten_config(saved).items()}
    new = flatten_config(config_to_dict(cfg))
    # A key the saved config does not hold is one an older version did not have: it ran with the default.
    defaults = flatten_config(config_to_dict(TrainConfig()))
    return [(k, old.get(k, defaults.get(k)), new.get(k)) for k in sorted(set(old) | set(new))
            if _comparable(k, old.get(k, defaults.get(k))) != _comparable(k, new.get(k))
            and not (k in _AUTO_KEYS and None in (old.get(k), new.get(k)))]


# Keys whose null means "decided by the run folder" (resolve_zero_stage, before comparing): a null on
# either side is no change.
_AUTO_KEYS = ("engine.zero_stage",)


# Keys holding file paths: a relative and an absolute path to the same file are the same value.
_PATH_KEYS = ("run_dir", "data.urls", "monitor.train_urls", "monitor.val_urls")


def _comparable(key: str, value: Any) -> Any:
    if key not in _PATH_KEYS or value is None:
        return value

    def one(v: Any) -> Any:
        if not isinstance(v, str) or "://" in v or v.startswith("pipe:"):
            return v
        return os.path.realpath(os.path.expanduser(v))

    return [one(v) for v in value] if isinstance(value, (list, tuple)) else one(value)


def changes_state(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in STATE_KEYS)


@dataclass
class ResumePlan:
    """What resuming a run folder with a config does, decided before anything is written."""

    checkpoint: Path | None = None  # the intact step folder it continues from (None: nothing to resume)
    reference: Path | None = None  # where the config it was trained with was read (meta.json, or config.yaml)
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key, trained with, now)
    refused: str | None = None  # why this resume is refused
    state: TrainState | None = None  # the counters it goes on with: step, schedule shift, carried data position
    carried: tuple[int, int] | None = None  # samples per step before -> now, when this resume carries the position

    def describe(self) -> list[str]:
        """The plan in a few lines (``ssl-container launch --dry-run`` prints them)."""
        if self.refused is not None:  # one verdict: the refusal, not a resume that will not happen
            where = f"{self.checkpoint.parent.parent} has checkpoint {self.checkpoint.name}, but " if self.checkpoint else ""
            return [f"{where}the resume is refused: {self.refused}"]
        if self.checkpoint is None:
            return []
        lines = [f"{self.checkpoint.parent.parent} has checkpoint {self.checkpoint.name}: the job resumes from it"]
        if self.changes:
            lines.append(f"config changes against the config the run was trained with ({self.reference}): "
                         + "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in self.changes))
        if self.state is not None and self.carried:
            lines.append(f"samples per step {self.carried[0]} -> {self.carried[1]} (checkpoint.allow_changes): step "
                         f"{self.state.step} goes on at the schedules' step {self.state.step - self.state.schedule_shift}"
                         + (f", each data stream from sample position {self.state.data_base['positions']}"
                            if self.state.data_base else ""))
        return lines


def plan_resume(cfg: TrainConfig, ckpt: CheckpointManager, iters_per_epoch: int, world_size: int,
                method: Any = None) -> TrainState | None:
    """The counters a resume of ``ckpt``'s newest intact checkpoint goes on with (None: none to read),
    after every check (the config's, then the method's own: a distillation teacher whose weights changed);
    raises :class:`CheckpointError` for a resume that must be refused."""
    plan = make_plan(cfg, ckpt, iters_per_epoch, world_size)
    if plan.refused is None and method is not None:
        plan.refused = method.resume_refusal(ckpt.peek() or {})
    if plan.refused is not None:  # one line: the refusal names the change itself
        raise CheckpointError(plan.refused)
    if plan.changes:
        log.warning("resuming %s with a changed config: %s", cfg.run_dir,
                    "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in plan.changes))
    if plan.carried:
        log.warning("%s", plan.describe()[-1])
    return plan.state


def resolve_zero_stage(cfg: TrainConfig, ckpt: CheckpointManager, resume: bool) -> None:
    """Make ``engine.zero_stage: null`` (the default) concrete before anything compares or records the
    config: a resume goes on with the stage its checkpoint's optimizer state is laid out for, a new run
    takes 0. ZeRO-0 keeps the gradients in one flat buffer that the trainer averages and clips (the
    fewest host calls a step, on one GPU or many); ZeRO-1/2 partition AdamW's state over the ranks,
    which pays in memory only for backbones far larger than Container-Light (docs/performance.md)."""
    if cfg.engine.zero_stage is not None:
        return
    stage = 0
    if resume and ckpt.complete_steps():
        try:
            meta = ckpt.peek()
        except CheckpointError:
            meta = None  # the resume's own checks say what is wrong with the folder
        folder = ckpt.root / ckpt.resume_point() if meta else None
        found = reference_config(meta, folder, Path(cfg.run_dir)) if meta else None
        saved = (found[0].get("engine") or {}).get("zero_stage", 1) if found else None  # 1: the old default
        if saved is not None:
            stage = int(saved)
        elif folder is not None:  # no stage on record (a config.yaml a launcher wrote): ZeRO-1/2 files tell
            stage = 1 if any(folder.glob("zero_pp_rank_*optim_states.pt")) else 0
    cfg.engine.zero_stage = stage


def make_plan(cfg: TrainConfig, ckpt: CheckpointManager, iters_per_epoch: int | None, world_size: int,
              check_model: bool = True) -> ResumePlan:
    """The :class:`ResumePlan` of ``ckpt``'s newest intact checkpoint with ``cfg`` (refusals recorded in
    it, not raised). ``check_model=False`` skips the comparison with the built model's metadata (the
    launcher plans before any model exists; a model change is listed among the config changes)."""
    plan = ResumePlan()
    try:
        meta = ckpt.peek()  # verifies the checkpoint's files; falls back to the newest intact one
        if meta is None:
            return plan
        plan.checkpoint = ckpt.root / ckpt.resume_point()
        if check_model:
            ckpt.check_compatible(meta, plan.checkpoint)
        found = reference_config(meta, plan.checkpoint, Path(cfg.run_dir))
        state = TrainState.from_dict(meta.get("train_state", {}))
        if found is not None:
            plan.reference = found[1]
            plan.changes = [c for c in config_changes(found[0], cfg) if c[0] != "checkpoint.allow_changes"]
            previous = _accepted(cfg, plan.changes, found)
            if (previous is not None or state.data_base) and iters_per_epoch is None:
                raise CheckpointError("placing the carried data position needs the data section complete (data.urls, "
                                      "data.samples_per_epoch)")
            if previous is not None:
                carry_position(state, previous, cfg, iters_per_epoch, world_size, meta.get("world_size", world_size))
                if state.step:
                    plan.carried = (previous.data.batch_size * previous.engine.grad_accum_steps,
                                    cfg.data.batch_size * cfg.engine.grad_accum_steps)
        if iters_per_epoch is not None:
            check_carried_streams(state, cfg, iters_per_epoch, world_size, meta.get("world_size", world_size))
        plan.state = state
    except CheckpointError as err:
        plan.refused = str(err)
    return plan


def preview(cfg: TrainConfig, world_size: int) -> ResumePlan:
    """The plan a trainer started now with ``cfg`` on ``world_size`` ranks would follow in its run folder
    (for a launcher: it reads the folder, builds no model and writes nothing)."""
    ckpt = CheckpointManager(cfg.run_dir, cfg.checkpoint, meta={})
    resolve_zero_stage(cfg, ckpt, cfg.checkpoint.resume)
    existing = ckpt.complete_steps()
    if existing and not cfg.checkpoint.resume:
        return ResumePlan(refused=fresh_start_refusal(cfg, existing))
    if not existing:
        return ResumePlan()
    try:
        iters: int | None = max(1, steps_per_epoch(data_config(cfg), world_size) // cfg.engine.grad_accum_steps)
    except ConfigError:
        iters = None  # an incomplete data section (no shards yet): only a carried position needs it
    return make_plan(cfg, ckpt, iters, world_size, check_model=False)


def fresh_start_refusal(cfg: TrainConfig, existing: list[str]) -> str | None:
    """Why a fresh start (``checkpoint.resume=false``) may not go ahead where checkpoints exist: it would
    replace them. None with ``checkpoint.overwrite``, which moves the old run folder aside instead."""
    if not existing or cfg.checkpoint.overwrite:
        return None
    run_dir = Path(cfg.run_dir)
    return (f"{run_dir} holds checkpoints ({existing[0]} .. {existing[-1]}) and checkpoint.resume=false: a fresh "
            "start would replace them. Choose one: resume them (checkpoint.resume=true), train in a new "
            "run_dir, or checkpoint.overwrite=true, which renames the old run folder to "
            f"{run_dir.name}.replaced-<time> and starts fresh (nothing is deleted). Nothing has been changed.")


def reference_config(meta: dict[str, Any], step_dir: Path, run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The config a checkpoint was trained with and where it was read: its meta.json records it; the
    run's config.yaml stands in for checkpoints of earlier versions. config.yaml is no reference once a
    checkpoint records its own: a launcher rewrites it at submission, and a changed run may stop before
    its first save."""
    if "config" in meta:
        return meta["config"], step_dir / "meta.json"
    path = run_dir / "config.yaml"
    return ((yaml.safe_load(path.read_text()) or {}), path) if path.is_file() else None


def _accepted(cfg: TrainConfig, changes: list[tuple[str, Any, Any]],
              found: tuple[dict[str, Any], Path]) -> TrainConfig | None:
    """Keys that reinterpret the saved state are refused unless checkpoint.allow_changes names them.
    Returns the trained-with config when an accepted change alters the samples per step or epoch (the
    position is then carried over)."""
    layout = [(k, a, b) for k, a, b in changes if k in _OPTIMIZER_LAYOUT_KEYS]
    if layout:
        k, a, b = layout[0]
        raise CheckpointError(
            f"resuming {cfg.run_dir} with {k}={b!r}: its checkpoint holds the optimizer state of {k}={a!r}, which "
            f"{b!r} cannot read. Resume with {k}={a!r}, or train in a new run_dir. Nothing has been changed.")
    refused = [k for k, _, _ in changes if changes_state(k) and k not in cfg.checkpoint.allow_changes]
    if refused:
        raise CheckpointError(
            f"resuming {cfg.run_dir} would change {', '.join(refused)}, which the saved state depends on (data "
            "position, schedules, random draws). Resume with the values it was trained with (its config.yaml, or "
            "the checkpoint's meta.json), train in a new run_dir, "
            f"or accept the change knowingly with checkpoint.allow_changes=[{','.join(refused)}]. Nothing has been "
            "changed.")
    if not any(k in _PER_STEP_KEYS for k, _, _ in changes):
        return None
    try:
        return load_config(found[0])
    except (ConfigError, ValueError) as err:
        raise CheckpointError(f"{found[1]} cannot be read back to carry the data position over: {err}") from None


# Keys that fix the saved optimizer state's layout (DeepSpeed's flat ZeRO partitions or a plain optimizer;
# AdamW's moments or SGD's momentum): no checkpoint.allow_changes makes another value load.
_OPTIMIZER_LAYOUT_KEYS = ("engine.zero_stage", "optim.optimizer")

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
    positions = stream_positions(k * old_accum, streams, old_data.batch_size, data_base_in(state, epoch)) if k else [0] * streams
    left = samples_per_rank(new_data, world_size) - sum(positions)
    new_k = min(iters_per_epoch, max(0, iters_per_epoch - left // (new_data.batch_size * accum))) if k else 0
    state.schedule_shift = state.step - (epoch * iters_per_epoch + new_k)
    state.data_base = {"epoch": epoch, "step": new_k * accum, "positions": positions} if k else None


def check_carried_streams(state: TrainState, cfg: TrainConfig, iters_per_epoch: int, world_size: int,
                           saved_world_size: int) -> None:
    """Positions carried over by an earlier change hold for the streams they were counted in: until that
    epoch ends, another data.num_workers or number of ranks is refused before anything is written."""
    base = state.data_base
    if not data_base_in(state, (state.step - state.schedule_shift) // iters_per_epoch):
        return
    if len(base["positions"]) != max(1, cfg.data.num_workers) or world_size != saved_world_size:
        raise CheckpointError(
            f"this run changed its samples per step in epoch {base['epoch']}, and its data streams go on from the "
            f"positions they had reached until that epoch ends: resume with data.num_workers="
            f"{len(base['positions'])} and {saved_world_size} rank(s) until then. Nothing has been changed.")
