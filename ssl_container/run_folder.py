"""The run folder's checkpoint layout, without torch: which step folders are complete, which is the
newest, whether one is intact. ``checkpoint.py`` writes and reads the weights; this module only
looks at names, meta.json and digests, so that the launcher (``--dry-run``) and the command line
can inspect a run folder without the ~3 s of importing torch.

    RUN/checkpoints/latest          the name of the newest complete step folder
    RUN/checkpoints/step_XXXXXXXX/  complete exactly when its meta.json exists (written last)
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ssl_container.signals import Refusal
from ssl_container.utils.files import file_problem, sha256_file

__all__ = ["EXPORT_FILES", "STEP_FOLDER", "CheckpointError", "Pick", "check_intact", "complete_steps", "export_target_problem",
           "folder_bytes", "folder_files", "is_unsafe_pickle", "latest_step_dir", "move_aside", "newest_intact",
           "read_latest"]

STEP_FOLDER = re.compile(r"^step_(\d{8})$")


class CheckpointError(Refusal):
    """A checkpoint that cannot be used, with what to do about it."""


def read_latest(ckpt_root: Path) -> str | None:
    """The step folder ``latest`` names, if it names a complete one (``None`` when there is no
    ``latest``); a ``latest`` that is unreadable or names no complete folder raises CheckpointError."""
    latest = ckpt_root / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_bytes().decode("utf-8", errors="replace").strip()
    if not STEP_FOLDER.match(tag) or not (ckpt_root / tag / "meta.json").is_file():
        raise CheckpointError(
            f"{latest} names {tag[:40]!r}, which is not a complete checkpoint folder. Point it at an existing "
            f"step_XXXXXXXX folder under {ckpt_root} (one with meta.json) to resume from it, or start a new "
            "run_dir; nothing has been changed."
        )
    return tag


def folder_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``folder`` except meta.json, by relative path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "meta.json":
            out[str(p.relative_to(folder))] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def check_intact(folder: Path) -> str | None:
    """None when every file meta.json lists is there with its size and sha256; else what is wrong.
    (Checkpoints of earlier versions list no files: they are taken as they are.)"""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as err:
        return f"meta.json unreadable ({err})"
    for name, want in (meta.get("files") or {}).items():
        problem = file_problem(folder / name, want.get("bytes"), want.get("sha256"), name)
        if problem:
            return problem
    return None


def complete_steps(ckpt_root: Path) -> list[str]:
    """Step folders with a meta.json, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p.name for p in ckpt_root.iterdir() if STEP_FOLDER.match(p.name) and (p / "meta.json").is_file())


@dataclass
class Pick:
    """Which checkpoint to read (``tag``; None when none passes), and why it is not simply the newest."""

    tag: str | None
    damaged: list[str] = field(default_factory=list)  # "step_X is damaged (why)", newest first
    latest_problem: str | None = None  # ``latest`` missing (with complete steps there) or broken


def newest_intact(ckpt_root: Path, problem: Callable[[Path], str | None] = check_intact) -> Pick:
    """The rule every reader of a run folder follows (the trainer's resume, export, the evaluations): the
    step folder ``latest`` names, else (``latest`` missing or broken, or ``problem`` finds that folder
    damaged) the newest complete one that ``problem`` passes. Reads only; the caller says what it skipped."""
    tags = complete_steps(ckpt_root)
    latest_problem = None
    try:
        named = read_latest(ckpt_root) if ckpt_root.is_dir() else None
    except CheckpointError as err:
        named, latest_problem = None, str(err).split(". Point")[0]
    if named is None and tags and latest_problem is None:
        latest_problem = f"{ckpt_root} has complete checkpoints but no usable 'latest'"
    damaged = []
    for tag in ([named] if named else []) + [t for t in reversed(tags) if t != named]:
        why = problem(ckpt_root / tag)
        if why is None:
            return Pick(tag, damaged, latest_problem)
        damaged.append(f"{tag} is damaged ({why})")
    return Pick(None, damaged, latest_problem)


def move_aside(run_dir: Path) -> Path:
    """Rename a run folder to RUN.replaced-<UTC time> (nothing deleted); returns the new name. A run
    folder reached through a symbolic link (a home folder pointing at scratch space) is renamed where
    it lives, and the link then points at a new empty folder there: the new run stays on that storage."""
    import datetime

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    target = Path(os.path.realpath(run_dir))
    aside = target.with_name(f"{target.name}.replaced-{stamp}")
    os.replace(target, aside)
    if Path(run_dir).is_symlink():
        target.mkdir()
    return aside


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def latest_step_dir(run_dir: str | Path) -> Path | None:
    """The newest complete step folder of a run folder (``RUN/checkpoints/<latest>``), None when it has none."""
    root = Path(run_dir) / "checkpoints"
    tag = read_latest(root) if root.is_dir() else None
    return root / tag if tag else None


# What an export folder holds, in the order they are swapped in (meta.json, the completion mark, last).
EXPORT_FILES = ("backbone.safetensors", "model.safetensors", "dino_head.safetensors", "model.onnx", "config.json",
                "README.md", "meta.json")


def export_target_problem(out: Path, overwrite: bool) -> str | None:
    """Why ``out`` may not receive an export (None when it may): it is a run folder or inside one (an
    export there would replace a checkpoint's meta.json), or it holds an export and ``overwrite`` is off.
    Paths only: the command line asks before torch is loaded."""
    resolved = out.resolve()
    for p in (resolved, *resolved.parents[:3]):  # the folder, or a run folder / step folder up to 3 levels above
        run = p.parent.parent if STEP_FOLDER.match(p.name) and p.parent.name == "checkpoints" else \
            p.parent if p.name == "checkpoints" else p
        if (run / "checkpoints").is_dir() and ((run / "config.yaml").is_file() or (run / "checkpoints" / "latest").is_file()):
            return (f"{out}: it is inside the run folder {run}; an export there would replace a checkpoint's files. "
                    "Export to a folder of its own, e.g. --out runs/exports/NAME")
    existing = [f for f in EXPORT_FILES if (out / f).exists()]
    if existing and not overwrite:
        return f"{out}: already holds {', '.join(existing)}; pass overwrite=True (--overwrite) to replace"
    return None


def is_unsafe_pickle(message: str) -> bool:
    """Whether torch.load(weights_only=True) refused a file for the Python objects it pickles (code that
    would run on a full load), as opposed to damaged bytes; torch words it differently across versions."""
    lowered = message.lower()
    return ("unsupported" in lowered and "global" in lowered) or "is blocked" in lowered
