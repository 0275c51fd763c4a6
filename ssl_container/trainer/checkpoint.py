"""Atomic save and exact resume of everything a DINO run needs to continue; nothing is ever lost.

Layout of ``RUN/checkpoints/`` (one folder per saved step)::

    latest                        name of the newest complete folder; moved only after a full save
    step_00000100/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt   DeepSpeed's files
        teacher.safetensors       fp32 teacher (backbone.* and head.*), for resume and export
        student.safetensors       fp32 student weights, likewise
        dino_state.safetensors    the loss's center
        meta.json                 step, epoch, model and head arguments, config digest, world size, and
                                  the size and sha256 of every other file: written last, once all are on disk

A folder is complete exactly when its meta.json exists. A run killed at any moment (``kill -9`` in
the middle of a save included) resumes from the folder ``latest`` names, verified file by file
against meta.json; if that one is damaged (a truncated or altered file, ``latest`` unreadable) the
newest intact one is used instead, with a warning naming the file. Folders without meta.json are
the remains of an interrupted save and are removed. A save first checks that the disk has room for
one more checkpoint (the size of the last one) and never leaves a partial folder behind. Reading
back never unpickles arbitrary objects: safetensors for weights, ``weights_only`` loads for
DeepSpeed's files (see engine.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ssl_container import distributed as D
from ssl_container.config import CheckpointConfig
from ssl_container.utils.files import atomic_path, atomic_write_text
from ssl_container.run_folder import (STEP_FOLDER, CheckpointError, check_intact, complete_steps, folder_bytes,
                                             folder_files, latest_step_dir, move_aside, newest_intact, read_latest)

log = logging.getLogger(__name__)

__all__ = ["TrainState", "CheckpointError", "CheckpointManager", "check_intact", "latest_step_dir", "move_aside",
           "read_latest"]

@dataclass
class TrainState:
    """Counters that, with the weights, define where training stands. ``step`` counts optimizer
    steps taken (skipped non-finite steps included, so data and schedules stay aligned)."""

    step: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    images_seen: int = 0
    # A resume that changed the samples per step (checkpoint.allow_changes) keeps counting steps but
    # re-places the schedules and the data: the schedules read ``step - schedule_shift``, and in the
    # epoch of the change the streams go on from ``data_base`` ({"epoch", "step", "positions"}); what
    # these mean is trainer/resume.py's (``data_base_in``).
    schedule_shift: int = 0
    data_base: Optional[dict] = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        # Checkpoints of earlier versions also stored a (stale) epoch and an unused 'extra'.
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared storage and non-contiguous views: store plain fp32 copies.
    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
                   for k, v in tensors.items()}, str(tmp), metadata=metadata)


class CheckpointManager:
    """Saves and restores the student engine, the teacher, the loss center and the counters."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, meta: dict[str, Any]) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.keep_last = cfg.keep_last
        self.meta = meta  # model/head arguments and config digest, written into every meta.json

    # -- save --------------------------------------------------------------------------------------
    def save(self, engine: Any, state: TrainState, stateful: Mapping[str, nn.Module], epoch: int) -> Path:
        """Collective: every rank must call it. Returns the folder written.

        ``engine``: the student's DeepSpeed engine (its files, and the fp32 weights as
        student.safetensors); ``stateful``: the other objects by name, each written from its
        ``state_dict()`` to NAME.safetensors (the trainer: teacher, dino_state = the loss's center)."""
        tag = f"step_{state.step:08d}"
        folder = self.root / tag
        if D.is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            if folder.exists():  # a leftover of an interrupted save of this very step
                shutil.rmtree(folder)
        if D.is_main():
            self._prune_before(tag)  # what keep_last lets go makes room first: the advice below is then true
        room = self._room_for_one_more() if D.is_main() else None
        if not D.all_reduce_min(room is None, getattr(engine, "device", torch.device("cpu"))):
            raise CheckpointError(room or "another rank found no room for the checkpoint")
        D.barrier()
        try:
            engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
            if D.is_main():
                for name, obj in stateful.items():
                    _save_safetensors(obj.state_dict(), folder / f"{name}.safetensors")
                _save_safetensors(engine.module.state_dict(), folder / "student.safetensors")
            D.barrier()  # every rank's DeepSpeed files are on disk before meta.json marks the folder complete
            if D.is_main():
                meta = {**self.meta, "step": state.step, "epoch": epoch, "world_size": _world_size(),
                        "stateful": sorted(stateful), "train_state": asdict(state), "files": folder_files(folder)}
                atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))
                atomic_write_text(self.root / "latest", tag)
                self._prune(keep=tag)
        except Exception as err:
            if D.is_main():
                shutil.rmtree(folder, ignore_errors=True)  # never leave a partial folder behind
            free = shutil.disk_usage(self.root).free if self.root.is_dir() else 0
            raise CheckpointError(
                f"saving checkpoint {folder} failed ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
                f"{free / 2**30:.2f} GiB free on its disk. The partial folder was removed; the previous "
                f"checkpoint ({self.latest() or 'none'}) is intact and the run resumes from it."
            ) from err
        self._resume_tag = False  # the next resume_point() looks again
        self._last_good = tag
        D.barrier()
        return folder

    def _room_for_one_more(self) -> str | None:
        """None when the disk holds another checkpoint of the last one's size (+10 %), else why not."""
        previous = [self.root / t for t in self.complete_steps()]
        if not previous:
            return None
        need = int(folder_bytes(previous[-1]) * 1.1)
        free = shutil.disk_usage(self.root).free
        if free >= need:
            return None
        fix = ("Free some space or lower checkpoint.keep_last (now " + str(self.keep_last) + "), then restart"
               if self.keep_last > 1 else
               "With checkpoint.keep_last=1 the disk must still hold two checkpoints while the new one is written "
               "(the newest stays until then): free some space or move run_dir, then restart")
        return (f"not enough disk space for a checkpoint in {self.root}: {free / 2**20:.1f} MiB free, the last "
                f"checkpoint took {need / 1.1 / 2**20:.1f} MiB. {fix}: the run resumes from {previous[-1].name}, "
                "which is intact.")

    def _prune_before(self, tag: str) -> None:
        """Before ``tag`` is written: keep the ``keep_last - 1`` newest complete checkpoints before it,
        and always the newest one (what a resume would use until ``tag`` is complete)."""
        older = [t for t in self.complete_steps() if t < tag]
        if not older:
            return
        keep = set(older[-(self.keep_last - 1):]) if self.keep_last > 1 else set()
        good, latest = getattr(self, "_last_good", None), self.latest()  # known intact: resumed from or written
        keep.add(good if good in older else latest if latest in older else older[-1])
        for t in older:
            if t not in keep:
                shutil.rmtree(self.root / t, ignore_errors=True)
                shutil.rmtree(self.root / f"{t}_universal", ignore_errors=True)

    def _prune(self, keep: str) -> None:
        """Keep the newest ``keep_last`` complete checkpoints up to ``keep`` (just written, intact).
        Folders after it (another lineage, a damaged one that was skipped) are left alone."""
        complete = [t for t in self.complete_steps() if t <= keep]
        for t in complete[: -self.keep_last]:
            if t != keep:
                shutil.rmtree(self.root / t, ignore_errors=True)
                shutil.rmtree(self.root / f"{t}_universal", ignore_errors=True)

    # -- resume ------------------------------------------------------------------------------------
    def complete_steps(self) -> list[str]:
        """Step folders with a meta.json, oldest first."""
        return complete_steps(self.root)

    def latest(self) -> str | None:
        """What ``latest`` names (None when it is missing or broken)."""
        try:
            return read_latest(self.root) if self.root.is_dir() else None
        except CheckpointError:
            return None

    def resume_point(self) -> str | None:
        """The intact checkpoint to resume from: the one ``latest`` names, else (it is missing, broken
        or damaged) the newest intact one; None when there are no complete checkpoints at all."""
        if getattr(self, "_resume_tag", False) is not False:
            return self._resume_tag
        pick = newest_intact(self.root)  # check_intact: every file against its size and sha256
        if pick.latest_problem:
            log.warning("%s: resuming from the newest intact checkpoint", pick.latest_problem)
        for skipped in pick.damaged:
            log.warning("checkpoint %s/%s", self.root, skipped)
        if pick.tag is not None:
            if pick.damaged:
                log.warning("resuming from %s instead: %s", pick.tag, "; ".join(pick.damaged))
            self._resume_tag = self._last_good = pick.tag
            return pick.tag
        damaged = pick.damaged
        if damaged:
            raise CheckpointError(
                f"every checkpoint under {self.root} is damaged: {'; '.join(damaged)}. Nothing was changed; "
                "restore the files from a copy, or start a new run_dir.")
        self._resume_tag = None
        return None

    def peek(self) -> dict[str, Any] | None:
        """meta.json of the checkpoint a resume would use, without loading any weights."""
        tag = self.resume_point()
        return json.loads((self.root / tag / "meta.json").read_text()) if tag else None

    def needs_universal(self, world_size: int, zero_stage: int) -> bool:
        """ZeRO-1/2 optimizer states are partitioned per rank: another world size needs DeepSpeed's
        universal format (converted once, beside the step folder)."""
        meta = self.peek()
        return bool(meta) and zero_stage in (1, 2) and meta.get("world_size", world_size) != world_size

    def prepare_universal(self) -> None:
        """Collective. Rank 0 converts the latest checkpoint to the universal format if needed."""
        from ssl_container.trainer.engine import convert_to_universal

        tag = self.resume_point()
        target = self.root / f"{tag}_universal"
        if D.is_main() and not self.universal_is_current(tag):
            log.info("converting %s to DeepSpeed's universal format for a new world size", tag)
            tmp = self.root / f".{tag}_universal.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            convert_to_universal(self.root / tag, tmp)
            (tmp / "source.json").write_text(json.dumps({"step_folder": tag, "meta_sha256": self._meta_digest(tag)}))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        D.barrier()

    def _meta_digest(self, tag: str) -> str:
        # meta.json records the size and sha256 of every file of the step: it names this checkpoint's lineage.
        return hashlib.sha256((self.root / tag / "meta.json").read_bytes()).hexdigest()

    def universal_is_current(self, tag: str) -> bool:
        """A ``<tag>_universal`` conversion is reused only if it was made from this very step folder: after
        ``latest`` moved back and the run was retrained, a step of the same name is another checkpoint."""
        target = self.root / f"{tag}_universal"
        try:
            source = json.loads((target / "source.json").read_text())
        except (OSError, ValueError):
            return False
        return (target / "zero").is_dir() and source.get("meta_sha256") == self._meta_digest(tag)

    def load(self, engine: Any, stateful: Mapping[str, nn.Module], universal: bool = False) -> TrainState | None:
        """Restore the engine and each named object (strictly) from the newest complete checkpoint;
        ``None`` when there is none."""
        from ssl_container.trainer.engine import weights_only_loads

        tag = self.resume_point()
        if D.is_main():  # folders without meta.json are the remains of a save that never finished
            for p in (self.root.iterdir() if self.root.is_dir() else ()):
                if STEP_FOLDER.match(p.name) and not (p / "meta.json").is_file():
                    log.warning("removing incomplete checkpoint %s (an interrupted save)", p)
                    shutil.rmtree(p, ignore_errors=True)
        D.barrier()
        if tag is None:
            return None
        folder = self.root / tag
        meta = json.loads((folder / "meta.json").read_text())
        self.check_compatible(meta, folder)
        with weights_only_loads():
            load_path, _ = engine.load_checkpoint(str(self.root), tag=f"{tag}_universal" if universal else tag,
                                                  load_module_strict=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {folder}; its files may be damaged. Remove {folder} "
                               f"and point {self.root / 'latest'} at an older step folder to resume from there.")
        for name, obj in stateful.items():
            path = folder / f"{name}.safetensors"
            if not path.is_file():
                raise CheckpointError(f"checkpoint {folder} has no {path.name}; this run needs {sorted(stateful)}. "
                                   "Resume with the version that wrote it, or use a new run_dir.")
            obj.load_state_dict(load_file(str(path), device="cpu"), strict=True)
        state = TrainState.from_dict(meta["train_state"])
        log.info("resumed from %s (step %d, epoch %s)", folder, state.step, meta.get("epoch"))
        return state

    def check_compatible(self, meta: dict[str, Any], folder: Path) -> None:
        for key in ("model", "head"):
            if meta.get(key) != self.meta.get(key):
                raise CheckpointError(
                    f"checkpoint {folder} was written for {key}={meta.get(key)}, but this run has "
                    f"{key}={self.meta.get(key)}. Resume with the original config, or use a new run_dir."
                )


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
