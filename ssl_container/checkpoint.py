"""Atomic save and exact resume of everything a DINO run needs to continue.

Layout of ``RUN/checkpoints/`` (one folder per saved step)::

    latest                        name of the newest *complete* folder; moved only after a full save
    step_00000100/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt   DeepSpeed's files (+ client state)
        teacher.safetensors       fp32 teacher (backbone.* and head.*), for resume and export
        student.safetensors       fp32 student weights, likewise
        meta.json                 step, epoch, model and head arguments, config digest, world size

A run killed at any moment (``kill -9`` in the middle of a save included) resumes from the folder
``latest`` names; folders written after it are incomplete by construction and are removed on resume.
Reading back never unpickles arbitrary objects: safetensors for weights, ``weights_only`` loads for
DeepSpeed's files (see engine.py).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ssl_container import distributed as D
from ssl_container.files import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["TrainState", "CheckpointManager", "latest_step_dir", "read_latest"]

_TAG = re.compile(r"^step_(\d{8})$")


@dataclass
class TrainState:
    """Counters that, with the weights, define where training stands. ``step`` counts optimizer
    steps taken (skipped non-finite steps included, so data and schedules stay aligned)."""

    step: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    images_seen: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        # Checkpoints of earlier versions also stored a (stale) epoch and an unused 'extra'.
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared storage and non-contiguous views: store plain fp32 copies.
    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
                   for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_latest(ckpt_root: Path) -> str | None:
    latest = ckpt_root / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not _TAG.match(tag) or not (ckpt_root / tag / "meta.json").is_file():
        raise RuntimeError(
            f"{latest} names '{tag}', which is not a complete checkpoint folder. Point it at an existing "
            f"step_XXXXXXXX folder under {ckpt_root} (one with meta.json) to resume from it, or start a new "
            "run_dir; nothing has been changed."
        )
    return tag


def latest_step_dir(run_dir: str | Path) -> Path | None:
    """The newest complete step folder of a run folder (``RUN/checkpoints/<latest>``), None when it has none."""
    root = Path(run_dir) / "checkpoints"
    tag = read_latest(root) if root.is_dir() else None
    return root / tag if tag else None


class CheckpointManager:
    """Saves and restores the student engine, the teacher, the loss center and the counters."""

    def __init__(self, run_dir: str | Path, keep_last: int, meta: dict[str, Any]) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
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
        D.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        if D.is_main():
            for name, obj in stateful.items():
                _save_safetensors(obj.state_dict(), folder / f"{name}.safetensors")
            _save_safetensors(engine.module.state_dict(), folder / "student.safetensors")
            meta = {**self.meta, "step": state.step, "epoch": epoch, "world_size": _world_size(),
                    "stateful": sorted(stateful), "train_state": asdict(state)}
            atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))
        if os.environ.get("SSL_CONTAINER_FAULT_KILL_IN_SAVE") == str(state.step) and D.is_main():
            # Fault injection for the atomicity test: die after the files, before the pointer moves.
            os.kill(os.getpid(), 9)
        D.barrier()  # every rank's DeepSpeed files are on disk before the pointer moves
        if D.is_main():
            atomic_write_text(self.root / "latest", tag)
            self._prune(keep=tag)
        D.barrier()
        return folder

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.root.iterdir() if _TAG.match(p.name))
        complete = [t for t in tags if (self.root / t / "meta.json").is_file() and t <= keep]
        doomed = set(complete[: -self.keep_last]) | {t for t in tags if t not in complete}
        for t in doomed - {keep}:
            shutil.rmtree(self.root / t, ignore_errors=True)
            shutil.rmtree(self.root / f"{t}_universal", ignore_errors=True)

    # -- resume ------------------------------------------------------------------------------------
    def latest(self) -> str | None:
        return read_latest(self.root) if self.root.is_dir() else None

    def peek(self) -> dict[str, Any] | None:
        """meta.json of the newest complete checkpoint, without loading anything."""
        tag = self.latest()
        return json.loads((self.root / tag / "meta.json").read_text()) if tag else None

    def needs_universal(self, world_size: int, zero_stage: int) -> bool:
        """ZeRO-1/2 optimizer states are partitioned per rank: another world size needs DeepSpeed's
        universal format (converted once, beside the step folder)."""
        meta = self.peek()
        return bool(meta) and zero_stage in (1, 2) and meta.get("world_size", world_size) != world_size

    def prepare_universal(self) -> None:
        """Collective. Rank 0 converts the latest checkpoint to the universal format if needed."""
        from ssl_container.engine import convert_to_universal

        tag = self.latest()
        target = self.root / f"{tag}_universal"
        if D.is_main() and not (target / "zero").is_dir():
            log.info("converting %s to DeepSpeed's universal format for a new world size", tag)
            tmp = self.root / f".{tag}_universal.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            convert_to_universal(self.root / tag, tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        D.barrier()

    def load(self, engine: Any, stateful: Mapping[str, nn.Module], universal: bool = False) -> TrainState | None:
        """Restore the engine and each named object (strictly) from the newest complete checkpoint;
        ``None`` when there is none."""
        from ssl_container.engine import weights_only_loads

        tag = self.latest()
        if tag is None:
            return None
        folder = self.root / tag
        if D.is_main():  # folders beyond 'latest' are the remains of a save that never finished
            for p in self.root.iterdir():
                if _TAG.match(p.name) and p.name > tag:
                    log.warning("removing incomplete checkpoint %s", p)
                    shutil.rmtree(p, ignore_errors=True)
        D.barrier()
        meta = json.loads((folder / "meta.json").read_text())
        self._check_compatible(meta, folder)
        with weights_only_loads():
            load_path, _ = engine.load_checkpoint(str(self.root), tag=f"{tag}_universal" if universal else tag,
                                                       load_module_strict=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {folder}; its files may be damaged. Remove {folder} "
                               f"and point {self.root / 'latest'} at an older step folder to resume from there.")
        for name, obj in stateful.items():
            path = folder / f"{name}.safetensors"
            if not path.is_file():
                raise RuntimeError(f"checkpoint {folder} has no {path.name}; this run needs {sorted(stateful)}. "
                                   "Resume with the version that wrote it, or use a new run_dir.")
            obj.load_state_dict(load_file(str(path), device="cpu"), strict=True)
        state = TrainState.from_dict(meta["train_state"])
        log.info("resumed from %s (step %d, epoch %s)", folder, state.step, meta.get("epoch"))
        return state

    def _check_compatible(self, meta: dict[str, Any], folder: Path) -> None:
        for key in ("model", "head"):
            if meta.get(key) != self.meta.get(key):
                raise RuntimeError(
                    f"checkpoint {folder} was written for {key}={meta.get(key)}, but this run has "
                    f"{key}={self.meta.get(key)}. Resume with the original config, or use a new run_dir."
                )


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
