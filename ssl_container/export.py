"""Export a trained backbone as fp32 safetensors + JSON metadata, and load it back for fine-tuning.

What can be read (by :func:`export`, :func:`load_backbone` and :func:`read_checkpoint`):

* a run folder (``config.yaml`` + ``checkpoints/latest``): the newest complete checkpoint;
* a step folder (``checkpoints/step_00000100/``): our consolidated ``teacher.safetensors`` /
  ``student.safetensors`` (keys ``backbone.*`` and ``head.*``) and ``meta.json``. DeepSpeed's own
  files in that folder are never opened;
* an exported folder (``backbone.safetensors`` + ``meta.json``) or any ``.safetensors`` file;
* a ``.pth`` / ``.pt`` / ``.pth.tar`` file that ``torch.load(weights_only=True)`` can read, e.g. an
  official DINO checkpoint (``teacher`` / ``student`` / ``model`` entries, ``module.`` and
  ``backbone.`` prefixes) or the official allenai/container checkpoint (its key names are converted).

Anything else is refused with :class:`CheckpointRefused` naming the file and what is accepted: other
extensions, and pickles that would need ``weights_only=False`` (arbitrary code on load).

The export folder::

    DIR/backbone.safetensors    fp32 backbone, this project's key names, no classifier
    DIR/meta.json               architecture + arguments, source, which, step, config digest,
                                evaluation results when known, sha256 of every weights file
    DIR/dino_head.safetensors   optional: the DINO projection head (keys as in DINOHead.state_dict())

``backbone.safetensors`` loads in timm without this package's loader::

    timm.create_model("container_light", pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file="DIR/backbone.safetensors"))

(pass ``meta.json``'s ``model.kwargs`` too when the run changed the architecture), or with
``load_backbone("DIR")``, which reads the architecture from ``meta.json`` itself.
Every file is written to a temporary name and renamed into place; ``meta.json`` comes last, so a
folder with a ``meta.json`` holds a complete export.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import signal
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ssl_container.utils.files import atomic_path, atomic_write_bytes, file_problem
from ssl_container.run_folder import (EXPORT_FILES, CheckpointError, export_target_problem,
                                              is_unsafe_pickle, latest_step_dir, newest_intact)

log = logging.getLogger("ssl_container.export")

__all__ = [
    "ACCEPTED",
    "Checkpoint",
    "CheckpointRefused",
    "EXPORT_FORMAT",
    "ExportStoppedAfterSwap",
    "export",
    "load_backbone",
    "read_checkpoint",
]

EXPORT_FORMAT = "ssl_container.export/1"
TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar")
WHICH = ("teacher", "student")
ACCEPTED = (
    "a run folder (config.yaml + checkpoints/latest), a step folder (teacher.safetensors / "
    "student.safetensors + meta.json), an exported folder (backbone.safetensors + meta.json), a "
    ".safetensors file, or a .pth / .pt / .pth.tar file readable with torch.load(weights_only=True)"
)
# Arguments that describe how a model is built for a task, not the architecture of the backbone.
_NOT_ARCHITECTURE = ("num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "features_only")
_DEFAULT_MODEL = "container_light"


class CheckpointRefused(CheckpointError, ValueError):
    """The input is not something this module reads safely (wrong kind of file, unsafe pickle, damaged
    weights ...). A :class:`CheckpointError`, so the command lines report it in one line."""


@dataclass
class Checkpoint:
    """One backbone's weights and what is known about them, whatever file they came from."""

    backbone: dict[str, torch.Tensor]
    model_name: str
    model_kwargs: dict[str, Any]
    source: dict[str, Any]
    which: str | None = None
    head: dict[str, torch.Tensor] | None = None
    head_config: dict[str, Any] | None = None
    step: int | None = None
    epoch: int | None = None
    config_sha256: str | None = None
    eval: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    trained_size: int | None = None  # the global crop side it was trained at (data.crops.global_size)


# ------------------------------------------------------------------------------------------------
# reading


def read_checkpoint(path: str | os.PathLike, which: str | None = None, *, allow_nonfinite: bool = False) -> Checkpoint:
    """Read backbone (and DINO head) weights from anything in :data:`ACCEPTED`.

    ``which`` picks ``"teacher"`` or ``"student"`` where the source holds both (default teacher);
    where the source records that it holds the other one (an export, a step's student.safetensors)
    it is an error; for a plain single-model file it is ignored.
    Backbone keys come back in this project's names with any classifier removed. Weights holding NaN
    or infinity (a diverged run) are refused unless ``allow_nonfinite``: a k-NN of a NaN network is a
    meaningless number and an export of one a trap for whoever fine-tunes it.
    """
    ckpt = _read_checkpoint(path, which)
    if not allow_nonfinite:
        bad = sum(int((~torch.isfinite(v)).sum()) for v in ckpt.backbone.values() if v.is_floating_point())
        if bad:
            total = sum(v.numel() for v in ckpt.backbone.values() if v.is_floating_point())
            raise CheckpointRefused(
                f"{path}: {bad:,} of {total:,} backbone weights are NaN or infinite (the run diverged): use an "
                "earlier checkpoint (a step folder under checkpoints/), or pass --allow-nonfinite to read it anyway")
    return ckpt


def _read_checkpoint(path: str | os.PathLike, which: str | None) -> Checkpoint:
    if which is not None and which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder (expected {ACCEPTED})")
    if p.is_dir():
        if (p / "checkpoints").is_dir():
            return _read_run_dir(p, which)
        if (p / "backbone.safetensors").is_file():
            return _read_export_dir(p, which)
        if _is_step_dir(p):
            return _read_step_dir(p, which, run_dir=_run_dir_of_step(p), kind="step")
        if (p / "config.yaml").is_file():
            raise CheckpointRefused(f"{p}: run folder without a checkpoints/ folder: nothing saved yet")
        raise CheckpointRefused(f"{p}: folder holds none of the expected files; accepted: {ACCEPTED}")
    name = p.name.lower()
    if name.endswith(".safetensors"):
        return _read_safetensors_file(p, which)
    if name.endswith(TORCH_SUFFIXES):
        return _read_torch_file(p, which)
    raise CheckpointRefused(f"{p}: unsupported file type; accepted: {ACCEPTED}")


def _is_step_dir(p: Path) -> bool:
    return any((p / f"{w}.safetensors").is_file() for w in WHICH)


def _run_dir_of_step(step_dir: Path) -> Path | None:
    run = step_dir.parent.parent
    return run if step_dir.parent.name == "checkpoints" and (run / "config.yaml").is_file() else None


def _latest_step_dir(run_dir: Path) -> Path:
    try:
        step_dir = latest_step_dir(run_dir)  # the run folder's layout is checkpoint.py's
    except RuntimeError as err:
        raise CheckpointRefused(str(err)) from None
    if step_dir is None:
        raise CheckpointRefused(
            f"{run_dir}: run folder without checkpoints/latest, so it has no complete checkpoint yet; "
            "pass a step folder (checkpoints/step_XXXXXXXX) explicitly if you know one is complete"
        )
    return step_dir


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointRefused(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointRefused(f"{path}: expected a JSON object")
    return data


def _model_from_meta(meta: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    model = (meta or {}).get("model") or {}
    if isinstance(model, str):
        return model, {}
    return model.get("name") or _DEFAULT_MODEL, _architecture_kwargs(model.get("kwargs") or {})


def _architecture_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dict(kwargs).items() if k not in _NOT_ARCHITECTURE}


def _run_config(run_dir: Path | None) -> tuple[tuple[str, dict[str, Any]] | None, str | None]:
    """The model section and the sha256 of ``config.yaml`` of a run folder (None when absent)."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None, None
    raw = (run_dir / "config.yaml").read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        import yaml

        cfg = yaml.safe_load(raw) or {}
    except Exception:  # an unreadable config still has a digest
        return None, digest
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return (_model_from_meta({"model": model}) if model else None), digest


def _read_yaml(path: Path) -> Any:
    try:
        import yaml

        return yaml.safe_load(path.read_bytes())
    except Exception:  # absent or unreadable: nothing recorded
        return None


def _global_crop(config: Any) -> int | None:
    try:
        size = config["data"]["crops"]["global_size"]
    except (KeyError, TypeError):
        return None
    return int(size) if isinstance(size, int) else None


def _pick_which(which: str | None, available: list[str], where: Path) -> str:
    if not available:
        raise CheckpointRefused(f"{where}: holds neither teacher.safetensors nor student.safetensors")
    want = which or ("teacher" if "teacher" in available else available[0])
    if want not in available:
        raise CheckpointRefused(f"{where}: has no {want} weights (found: {', '.join(available)})")
    return want


def _read_run_dir(run_dir: Path, which: str | None) -> Checkpoint:
    """The newest step folder whose weights are intact (run_folder.newest_intact, the trainer's rule); a
    damaged newer one is skipped, with a warning."""
    root = run_dir / "checkpoints"
    pick = newest_intact(root, lambda step_dir: _weights_problem(step_dir, which))
    nothing = pick.tag is None and not pick.damaged
    if pick.latest_problem or nothing:
        try:
            _latest_step_dir(run_dir)  # raises, in the words a user acts on: what is wrong with ``latest``
        except CheckpointRefused as err:
            if nothing:
                raise
            log.warning("%s; reading the newest complete checkpoint instead", err)
    if pick.tag is None:
        raise CheckpointRefused(f"{run_dir}: no intact checkpoint ({'; '.join(pick.damaged)}); restore the files "
                                "from a copy")
    ckpt = _read_step_dir(root / pick.tag, which, run_dir=run_dir, kind="run", verified=True)
    if pick.damaged:
        note = f"{'; '.join(pick.damaged)}: read {pick.tag} instead, the newest intact checkpoint"
        ckpt.notes.append(note)
        log.warning("%s: %s", run_dir, note)
    return ckpt


def _weights_problem(step_dir: Path, which: str | None) -> str | None:
    """What is wrong with the weights file of a step folder against the size and sha256 its meta.json
    recorded at save time (the trainer's own check); None when it matches or nothing was recorded."""
    available = [w for w in WHICH if (step_dir / f"{w}.safetensors").is_file()]
    try:
        name = f"{_pick_which(which, available, step_dir)}.safetensors"
    except CheckpointRefused as err:
        return str(err).split(": ", 1)[-1]
    try:
        meta = json.loads((step_dir / "meta.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return f"meta.json unreadable ({err})"
    want = (meta.get("files") or {}).get(name) if isinstance(meta, dict) else None
    return file_problem(step_dir / name, want and want.get("bytes"), want and want.get("sha256"))


def _read_step_dir(step_dir: Path, which: str | None, run_dir: Path | None, kind: str,
                   verified: bool = False) -> Checkpoint:
    available = [w for w in WHICH if (step_dir / f"{w}.safetensors").is_file()]
    which = _pick_which(which, available, step_dir)
    weights = step_dir / f"{which}.safetensors"
    problem = None if verified else _weights_problem(step_dir, which)
    if problem is not None:
        raise CheckpointRefused(f"{step_dir}: damaged, {problem}; use an older step folder (or the run folder, "
                                "which falls back to the newest intact one) or restore the file from a copy")
    ckpt = _from_state_dict(_load_safetensors(weights), weights)
    meta = _read_json(step_dir / "meta.json")
    run_model, run_digest = _run_config(run_dir)
    if meta and meta.get("model"):
        ckpt.model_name, ckpt.model_kwargs = _model_from_meta(meta)
    elif run_model:
        ckpt.model_name, ckpt.model_kwargs = run_model
    else:
        ckpt.notes.append("architecture not recorded in the checkpoint; assumed container_light defaults")
    meta = meta or {}
    ckpt.which = which
    ckpt.step, ckpt.epoch = meta.get("step"), meta.get("epoch")
    if ckpt.step is None and (m := re.fullmatch(r"step_(\d+)", step_dir.name)):
        ckpt.step = int(m.group(1))
    ckpt.config_sha256 = meta.get("config_sha256") or run_digest
    ckpt.eval = meta.get("eval") or None
    run_config = _read_yaml(run_dir / "config.yaml") if run_dir else None
    ckpt.trained_size = _global_crop(meta.get("config")) or _global_crop(run_config)
    if ckpt.head is not None:
        ckpt.head_config = meta.get("head") or _infer_head_config(ckpt.head)
    ckpt.source = {
        "kind": kind,
        "path": str(step_dir.resolve()),
        "run": str(run_dir.resolve()) if run_dir else None,
        "file": weights.name,
    }
    return ckpt


def _read_export_dir(export_dir: Path, which: str | None) -> Checkpoint:
    meta = _read_json(export_dir / "meta.json")
    if meta is None:
        raise CheckpointRefused(f"{export_dir}: backbone.safetensors without meta.json is an incomplete export")
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointRefused(f"{export_dir / 'meta.json'}: format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
    exported_which = meta.get("which")
    if which is not None and exported_which is not None and which != exported_which:
        raise CheckpointRefused(f"{export_dir}: is an export of the {exported_which}, not the {which}")
    weights = export_dir / "backbone.safetensors"
    recorded = meta.get("weights") if isinstance(meta.get("weights"), dict) else {}
    problem = file_problem(weights, None, recorded.get("sha256"))
    if problem is not None:
        raise CheckpointRefused(f"{export_dir}: damaged export, {problem}; export it again from its run")
    ckpt = _from_state_dict(_load_safetensors(weights), weights)
    ckpt.model_name, ckpt.model_kwargs = _model_from_meta(meta)
    ckpt.which = exported_which
    ckpt.step, ckpt.epoch = meta.get("step"), meta.get("epoch")
    ckpt.config_sha256, ckpt.eval = meta.get("config_sha256"), meta.get("eval")
    ckpt.trained_size = (meta.get("resolution") or {}).get("trained")
    head_file = export_dir / "dino_head.safetensors"
    if head_file.is_file():
        ckpt.head = _load_safetensors(head_file)
        ckpt.head_config = (meta.get("dino_head") or {}).get("config") or _infer_head_config(ckpt.head)
    ckpt.source = {"kind": "export", "path": str(export_dir.resolve()), "file": weights.name,
                   "exported_from": meta.get("source")}
    return ckpt


def _read_safetensors_file(path: Path, which: str | None) -> Checkpoint:
    parent = path.parent
    if path.name == "backbone.safetensors" and (parent / "meta.json").is_file():
        return _read_export_dir(parent, which)
    stem = path.name[: -len(".safetensors")]
    if stem in WHICH:
        if which is not None and which != stem:
            raise CheckpointRefused(f"{path}: holds the {stem}, not the {which}")
        if (parent / "meta.json").is_file():
            return _read_step_dir(parent, stem, run_dir=_run_dir_of_step(parent), kind="step")
    ckpt = _from_state_dict(_load_safetensors(path), path)
    ckpt.head_config = _infer_head_config(ckpt.head) if ckpt.head else None
    ckpt.which = stem if stem in WHICH else None
    ckpt.source = {"kind": "safetensors", "path": str(path.resolve())}
    return ckpt


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointRefused(f"{path}: not a readable safetensors file ({e})") from e


def _read_torch_file(path: Path, which: str | None) -> Checkpoint:
    try:
        # weights_only: tensors, containers and plain values only; an argparse.Namespace (official
        # DINO checkpoints store their arguments as one) is a plain attribute bag and is allowed too.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n")[0].strip() or "unpickling failed"
        detail = detail.split(". Please use")[0]
        unsafe = is_unsafe_pickle(text)
        raise CheckpointRefused(
            f"{path}: refused, torch.load(weights_only=True) cannot read it ({detail})"
            + ("; it pickles Python objects, and loading it with weights_only=False would run arbitrary code. "
               "Re-save only the tensors (torch.save(model.state_dict(), ...) or safetensors) and pass that"
               if unsafe else "; it is damaged or not a torch file")
            + f"; accepted: {ACCEPTED}"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointRefused(f"{path}: not a readable torch file ({str(e).splitlines()[0] if str(e) else e!r}); accepted: {ACCEPTED}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointRefused(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors (a state_dict)")
    picked = None
    if any(k in obj for k in WHICH):
        available = [w for w in WHICH if isinstance(obj.get(w), Mapping)]
        picked = _pick_which(which, available, path)
        state = obj[picked]
    else:
        # A single model: "which" has nothing to choose between and is not contradicted, so it is ignored.
        state = next((obj[k] for k in ("model", "state_dict", "model_state_dict", "module") if isinstance(obj.get(k), Mapping)), obj)
    ckpt = _from_state_dict(state, path)
    ckpt.head_config = _infer_head_config(ckpt.head) if ckpt.head else None
    ckpt.which = picked
    ckpt.epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
    ckpt.source = {"kind": "torch", "path": str(path.resolve())}
    return ckpt


def _from_state_dict(state: Mapping[str, Any], where: Path) -> Checkpoint:
    """Split a state dict into backbone (our names, no classifier) and DINO head."""
    from ssl_container.models import convert_official_state_dict, is_official_state_dict

    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointRefused(f"{where}: expected a state_dict of tensors, but {bad[:3]} are not tensors")
    flat: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
            while key.startswith(prefix):
                key = key[len(prefix):]
        flat[key] = value
    head = None
    notes: list[str] = []
    if any(k.startswith("backbone.") for k in flat):
        backbone = {k[len("backbone."):]: v for k, v in flat.items() if k.startswith("backbone.")}
        head = {k[len("head."):]: v for k, v in flat.items() if k.startswith("head.")} or None
        other = [k for k in flat if not k.startswith(("backbone.", "head.", "projector."))]
        if other:
            raise CheckpointRefused(f"{where}: unexpected keys {other[:5]} next to backbone.* and head.*")
        if any(k.startswith("projector.") for k in flat):  # methods/distill.py: training-only
            notes.append("the distillation projector (projector.*) left out: the export is the backbone only")
    else:
        backbone = flat
    if is_official_state_dict(backbone):
        backbone = convert_official_state_dict(backbone)
        notes.append("official allenai/container key names converted")
    classifier = [k for k in backbone if k in ("head.weight", "head.bias")]
    if classifier:
        notes.append("classifier (head.weight, head.bias) left out: the export is the backbone only")
        backbone = {k: v for k, v in backbone.items() if k not in classifier}
    if not backbone:
        raise CheckpointRefused(f"{where}: no backbone weights found")
    return Checkpoint(backbone=backbone, model_name=_DEFAULT_MODEL, model_kwargs={}, source={},
                      head=head, notes=notes)


def _infer_head_config(head: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What the shapes of a DINO head state dict tell: dims, layer count, BatchNorm."""
    linears = sorted(
        (int(k.split(".")[1]), v) for k, v in head.items()
        if k.startswith("mlp.") and k.endswith(".weight") and v.ndim == 2
    )
    if not linears and "mlp.weight" in head:  # nlayers == 1: a bare Linear
        linears = [(0, head["mlp.weight"])]
    cfg: dict[str, Any] = {}
    if linears:
        cfg.update(in_dim=linears[0][1].shape[1], bottleneck_dim=linears[-1][1].shape[0], nlayers=len(linears))
        if len(linears) > 1:
            cfg["hidden_dim"] = linears[0][1].shape[0]
        cfg["use_bn"] = any(k.endswith("running_mean") for k in head)
    v = head.get("last_layer.parametrizations.weight.original1", head.get("last_layer.weight_v"))
    if v is not None:
        cfg["out_dim"] = v.shape[0]
    return cfg


# ------------------------------------------------------------------------------------------------
# building and loading


def _build_and_load(ckpt: Checkpoint, model_name: str | None, model_kwargs: Mapping[str, Any]) -> nn.Module:
    from ssl_container.models import create_model

    name = model_name or ckpt.model_name
    kwargs = {**ckpt.model_kwargs, **dict(model_kwargs)}
    num_classes = kwargs.pop("num_classes", 0)
    for k in ("pretrained", "pretrained_cfg_overlay"):
        kwargs.pop(k, None)
    model = create_model(name, num_classes=num_classes, **kwargs)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    state = {k: v for k, v in ckpt.backbone.items() if num_classes == 0 or not k.startswith(classifier + ".")}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not (num_classes and k.startswith(classifier + "."))]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        def some(keys: list[str]) -> str:
            return f"{len(keys)} {keys[:3]}{'...' if len(keys) > 3 else ''}"

        raise ValueError(
            f"the weights from {ckpt.source.get('path')} do not fit {name}({_fmt_kwargs(kwargs)}): "
            f"missing {some(missing)}, unexpected {some(unexpected)}, shape mismatches (file vs model) "
            f"{some(mismatched)}; pass the architecture the run was trained with (model name and arguments)"
        )
    model.load_state_dict(state, strict=not num_classes)
    return model


def _fmt_kwargs(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def load_backbone(
    path: str | os.PathLike,
    which: str | None = None,
    *,
    model_name: str | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """A backbone with the weights at ``path`` (anything in :data:`ACCEPTED`), ready to fine-tune.

    The architecture and its arguments come from the checkpoint's metadata (``container_light``
    defaults when there is none); ``model_kwargs`` override them, e.g. ``num_classes=10`` for a
    freshly initialised classifier or ``drop_path_rate=0.1``. Every backbone weight must fit
    (strict); only a new classifier may be missing. ``which`` = ``"teacher"`` (default where a
    source holds both) or ``"student"``.
    """
    ckpt = read_checkpoint(path, which)
    return _build_and_load(ckpt, model_name, model_kwargs)


# ------------------------------------------------------------------------------------------------
# writing


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=dict(metadata))


def _jsonable(value: Any) -> Any:
    """Config values as JSON (tuples -> lists, tensors/numbers -> Python numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def export_onnx(model: nn.Module, path: str | os.PathLike, size: int = 224, opset: int = 17) -> dict[str, Any]:
    """The backbone as ONNX (input ``images`` N x 3 x H x W, output ``features`` N x num_features), with
    dynamic batch, height and width (multiples of the model's stride). Models are stock PyTorch, so
    the exporter sees plain convolutions and matmuls."""
    was_training = model.training
    model.eval()
    path = Path(path)
    try:
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            # The trace turns the model's input-size check into a constant (its message says so); the
            # dynamic axes below are what keep sizes free, so the warning tells a user nothing.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "features": {0: "batch"}})
    finally:
        model.train(was_training)
    return {"file": path.name, "sha256": _sha256(path.read_bytes()), "opset": opset,
            "inputs": {"images": ["batch", 3, "height", "width"]}, "outputs": {"features": ["batch", "num_features"]}}


def timm_config(model: nn.Module, name: str, model_args: Mapping[str, Any], input_size: int | None = None,
                crop_pct: float | None = None) -> dict[str, Any]:
    """config.json in timm's pretrained-config format (what ``local-dir:`` and ``hf-hub:`` read).
    ``input_size`` / ``crop_pct``: the resolution and crop the weights were trained and evaluated at
    (timm's data config then prepares images the way they were seen), else the architecture's defaults."""
    base = dict(getattr(model, "pretrained_cfg", None) or {})
    keep = ("input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "pool_size",
            "first_conv", "license")
    pretrained_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in base.items() if k in keep}
    if input_size:
        stride = int(getattr(model, "total_stride", 32) or 32)
        pretrained_cfg["input_size"] = [3, int(input_size), int(input_size)]
        pretrained_cfg["pool_size"] = [max(1, int(input_size) // stride)] * 2
    if crop_pct:
        pretrained_cfg["crop_pct"] = float(crop_pct)
    pretrained_cfg.update({"tag": "dino", "custom_load": False, "num_classes": 0, "classifier": "head"})
    return {"architecture": name, "num_classes": 0, "num_features": getattr(model, "num_features", None),
            "model_args": _jsonable(dict(model_args)), "pretrained_cfg": pretrained_cfg}


def model_card(meta: Mapping[str, Any]) -> str:
    """README.md for the export folder (the Hub shows it first): what it is, how it was made and
    evaluated, how to load it."""
    name = meta["model"]["name"]
    evals = meta.get("eval") or {}
    rows = "\n".join(f"| {k} | {round(v, 2) if isinstance(v, float) else v} |" for k, v in evals.items()) \
        or "| (none recorded) | |"
    size = (meta.get("resolution") or {}).get("trained")
    trained = f", trained at {size}x{size} px" if size else ""
    floors = ("The floors rows are the same protocol on a randomly initialised network of the same architecture "
              "and on raw pixels: the pretraining is worth the distance from the better of them."
              if any("floor" in k for k in evals) else
              "No floors (random init, raw pixels under the same protocol) were recorded with these figures: "
              "judge them against such floors before trusting them.")
    return f"""---
library_name: timm
license: apache-2.0
tags: [image-feature-extraction, self-supervised, dino, timm, ssl_container]
---
# {name}, DINO-pretrained backbone

A {name} backbone (no classifier, {meta['model'].get('num_features')} features) pretrained with DINO
by ssl_container ({meta.get('which') or 'backbone'} network, step {meta.get('step')}{trained}).
Recipe digest (sha256 of the resolved training config): `{meta.get('config_sha256')}`.

## Evaluation

| metric | value |
|---|---|
{rows}

k-NN figures use DINO's protocol (cosine similarity, weighted vote exp(sim / 0.07), k = 20) on the data named
beside them. {floors}

## Use

```python
import timm, ssl_container  # importing ssl_container registers {name} with timm
model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True, num_classes=0)  # or "hf-hub:ORG/NAME"
features = model(images)                                                     # (N, {meta['model'].get('num_features')})
model = ssl_container.export.load_backbone("PATH_TO_THIS_FOLDER")            # the same weights, strict load
```
Upload: `huggingface_hub.upload_folder(repo_id="ORG/NAME", folder_path="PATH_TO_THIS_FOLDER")`.
Weights: `model.safetensors` (= `backbone.safetensors`, sha256 `{meta['weights']['sha256']}`), fp32.
"""


def export(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    which: str | None = None,
    *,
    include_head: bool = False,
    eval_results: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    onnx: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Write ``out_dir/backbone.safetensors`` (fp32), ``meta.json`` and optionally ``dino_head.safetensors``
    and ``model.onnx`` (``onnx=True``: the backbone with dynamic batch, height and width).

    ``which``: ``"teacher"`` (default where both exist; DINO's teacher is the better backbone) or
    ``"student"``. ``eval_results`` are merged over those recorded in the checkpoint. The weights
    are checked by building the architecture and loading them strictly before anything is written.
    Returns ``out_dir``.
    """
    ckpt = read_checkpoint(source, which, allow_nonfinite=allow_nonfinite)
    if include_head and not ckpt.head:
        raise CheckpointRefused(f"{source}: has no DINO head weights (head.*) to export")
    model = _build_and_load(ckpt, model_name, model_kwargs or {})
    name = model_name or ckpt.model_name
    arch_kwargs = _architecture_kwargs({**ckpt.model_kwargs, **dict(model_kwargs or {})})

    out = Path(out_dir).expanduser()
    refusal = export_target_problem(out, overwrite)
    if refusal:
        raise FileExistsError(refusal)
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.iterdir():  # temporaries of an export killed before this version swapped folders
        if re.fullmatch(r"\.(?:%s)\..+\.tmp" % "|".join(map(re.escape, EXPORT_FILES)), leftover.name):
            leftover.unlink()
    # Beside the folder where it really lives (a link to another disk: os.replace cannot cross file systems).
    staging = out.resolve().parent / f".{out.resolve().name}.export-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_export(staging, ckpt, model, name, arch_kwargs, include_head, eval_results, onnx)
        with _signals_deferred() as received:  # the swap: a stop signal waits the milliseconds until it is done
            # meta.json marks a complete export: the old one goes first and the new one comes last, so a
            # crash in between leaves a folder no reader takes for complete.
            (out / "meta.json").unlink(missing_ok=True)
            for f in EXPORT_FILES:
                if (staging / f).exists():
                    os.replace(staging / f, out / f)
                elif (out / f).exists():
                    os.unlink(out / f)  # stale: an ONNX graph or head of an earlier export into this folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if received:
        raise ExportStoppedAfterSwap(received[0], out)
    return out


class ExportStoppedAfterSwap(BaseException):
    """A stop signal arrived while the new export was swapped in: it finished first, and is complete."""

    def __init__(self, signum: int, out: Path) -> None:
        self.signum, self.out = int(signum), out
        super().__init__(f"stopped by {signal.Signals(signum).name} as the export was being swapped in: it finished "
                         f"first, {out} holds the new export, complete")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """SIGTERM / SIGINT only recorded inside the block (the list yielded), for the caller to act on after
    it. Python runs signal handlers in the main thread whichever thread the kernel delivered to (torch's
    threads do not block them), so the handlers are replaced, not the signal mask."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _write_export(out: Path, ckpt: Checkpoint, model: nn.Module, name: str, arch_kwargs: dict[str, Any],
                  include_head: bool, eval_results: Mapping[str, Any] | None, onnx: bool) -> None:

    # The state the strict load produced: every floating tensor fp32, our key order.
    state = {
        k: (v.float() if v.is_floating_point() else v).detach().clone().contiguous()
        for k, v in model.state_dict().items()
    }
    # Only {"format": "pt"} in the safetensors header: larger metadata is serialised in a random
    # order, and identical weights should give an identical file (and sha256). meta.json has the rest.
    backbone_bytes = _safetensors_bytes(state, {"format": "pt"})
    files: dict[str, dict[str, Any]] = {
        "backbone": {"file": "backbone.safetensors", "sha256": _sha256(backbone_bytes),
                     "tensors": len(state), "parameters": sum(p.numel() for p in model.parameters()),
                     "dtype": "float32"},
    }
    head_bytes = None
    if include_head:
        head = {k: (v.float() if v.is_floating_point() else v) for k, v in ckpt.head.items()}
        head_bytes = _safetensors_bytes(head, {"format": "pt"})
        files["dino_head"] = {"file": "dino_head.safetensors", "sha256": _sha256(head_bytes),
                              "tensors": len(head), "config": _jsonable(ckpt.head_config or {})}

    if onnx:
        files["onnx"] = export_onnx(model, out / "model.onnx")
    evals = {**(ckpt.eval or {}), **dict(eval_results or {})} or None
    import ssl_container

    meta = {
        "format": EXPORT_FORMAT,
        "model": {"name": name, "kwargs": _jsonable(arch_kwargs), "num_features": getattr(model, "num_features", None)},
        "which": ckpt.which,
        "step": ckpt.step,
        "epoch": ckpt.epoch,
        "config_sha256": ckpt.config_sha256,
        "eval": _jsonable(evals) if evals else None,
        # what config.json tells timm's data config: the side it was trained at, evaluated at, and the crop
        "resolution": {"trained": ckpt.trained_size, "evaluated": (evals or {}).get("knn_resolution"),
                       "crop_pct": (evals or {}).get("knn_crop_pct")},
        "source": _jsonable(ckpt.source),
        "weights": files["backbone"],
        "dino_head": files.get("dino_head"),
        "onnx": files.get("onnx"),
        "notes": ckpt.notes,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"ssl_container": ssl_container.__version__, "torch": torch.__version__},
        "load": {
            "timm": f"timm.create_model({name!r}, pretrained=True, num_classes=0, "
                    "pretrained_cfg_overlay=dict(file='<DIR>/backbone.safetensors')"
                    + (", **meta['model']['kwargs'])" if arch_kwargs else ")"),
            "ssl_container": "ssl_container.export.load_backbone('<DIR>')",
        },
    }
    atomic_write_bytes(out / "backbone.safetensors", backbone_bytes)
    # The Hugging Face Hub / timm layout beside it: timm.create_model("local-dir:OUT") and
    # huggingface_hub.upload_folder read config.json + model.safetensors; README.md is the model card.
    atomic_write_bytes(out / "model.safetensors", backbone_bytes)
    resolution = meta["resolution"]
    config = timm_config(model, name, arch_kwargs, input_size=resolution["evaluated"] or resolution["trained"],
                         crop_pct=resolution["crop_pct"])
    atomic_write_bytes(out / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    atomic_write_bytes(out / "README.md", model_card(meta).encode())
    if head_bytes is not None:
        atomic_write_bytes(out / "dino_head.safetensors", head_bytes)
    atomic_write_bytes(out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
