"""Typed run configuration: dataclasses, YAML files and ``key=value`` command-line overrides.

The code holds the defaults (DINO's official recipe, Container-Light); a YAML recipe holds only the
choices that differ; overrides come last. The merge goes through OmegaConf's structured configs, so
an unknown key or a wrongly typed value fails before any work is done, and this module turns
OmegaConf's errors into one message that names the key and what it accepts. The resolved config is
saved beside every run (``config.yaml``) and its digest goes into checkpoints and exports.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from ssl_container.utils.checks import check_fields
from ssl_container.data.config import TrainDataConfig
from ssl_container.dino.config import DINOLossConfig, HeadConfig, ScheduleConfig
from ssl_container.methods.config import METHOD_NAMES, DistillConfig
from ssl_container.utils.files import atomic_write_text

log = logging.getLogger(__name__)

# logging.backends: the trackers trainer/trackers.py opens (the config checks the names before torch loads).
BACKENDS = ("tensorboard", "mlflow", "wandb")

__all__ = [
    "data_config",
    "train_argument_parser",
    "print_resolved",
    "check_shards",
    "ConfigError",
    "TrainConfig",
    "ModelConfig",
    "HeadConfig",
    "DINOLossConfig",
    "OptimConfig",
    "ScheduleConfig",
    "EngineConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "MonitorConfig",
    "load_config",
    "save_config",
    "config_to_dict",
    "config_digest",
]


class ConfigError(ValueError):
    """A configuration problem, with the offending key and the fix in the message."""


@dataclass
class ModelConfig:
    name: str = "container_light"  # container_light | container | container_pam | any timm model name
    drop_path_rate: float = 0.1
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments
    grad_checkpointing: bool = False
    channels_last: bool = True  # feed crops as channels_last (weights stay contiguous: DeepSpeed broadcasts them)

    def __post_init__(self) -> None:
        check_fields(self, "model", non_negative=("drop_path_rate",))


@dataclass
class OptimConfig:
    """The optimizer; its lr and weight decay are set every step by the ``schedule`` section."""

    optimizer: str = "adamw"  # adamw | sgd
    clip_grad: float = 3.0  # global norm; 0 disables
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # SGD only

    def __post_init__(self) -> None:
        check_fields(self, "optim", non_negative=("clip_grad",), choices={"optimizer": ("adamw", "sgd")})


@dataclass
class EngineConfig:
    zero_stage: Optional[int] = None  # 0 | 1 | 2 | null: 0 for a new run, the checkpoint's stage on resume
    precision: str = "bf16"  # fp32 | bf16 | fp16 (bf16 falls back to fp32 on CPU)
    grad_accum_steps: int = 1
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile each repeated block of the backbones (regional: bounded compile time)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs
    cpu_retain_memory: bool = True  # CPU: keep freed tensor memory in the process, no page faults per step (runtime.py)
    fast_cpu_kernels: bool = True  # fp32 on CPU: Container's 1x1 / depthwise convs on faster kernels (cpu_kernels.py)

    def __post_init__(self) -> None:
        check_fields(self, "engine", positive=("grad_accum_steps",), choices={
            "zero_stage": (None, 0, 1, 2), "precision": ("fp32", "bf16", "fp16"), "device": ("auto", "cpu", "cuda"),
            "compile_mode": ("default", "reduce-overhead", "max-autotune-no-cudagraphs")})


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    resume: bool = True  # resume from the newest intact checkpoint in run_dir
    overwrite: bool = False  # start fresh where checkpoints exist: the old run folder is renamed aside, never deleted
    allow_changes: list[str] = field(default_factory=list)  # resume although these state keys changed (trainer/resume.STATE_KEYS)

    def __post_init__(self) -> None:
        check_fields(self, "checkpoint", positive=("every_steps", "keep_last"))
        self.allow_changes = [MOVED_KEYS.get(k, k) for k in self.allow_changes]


@dataclass
class LoggingConfig:
    every_steps: int = 10  # metrics.jsonl is written every step; this paces console lines
    tensorboard: bool = True  # the same as listing tensorboard in backends
    backends: list[str] = field(default_factory=list)  # more trackers: tensorboard | mlflow | wandb (trackers.py)
    experiment: str = "ssl_container"  # MLflow experiment / W&B project
    run_name: Optional[str] = None  # default: the run folder's name
    mlflow_uri: Optional[str] = None  # default: sqlite:///RUN/mlflow.db, artifacts in RUN/mlflow-artifacts
    wandb_mode: Optional[str] = None  # online | offline | disabled (default: W&B's own settings, e.g. WANDB_MODE)
    progress: str = "auto"  # auto | bar | lines | off

    def __post_init__(self) -> None:
        check_fields(self, "logging", positive=("every_steps",), choices={"progress": ("auto", "bar", "lines", "off")})
        for backend in self.backends:
            if backend not in BACKENDS:
                raise ValueError(f"config key 'logging.backends' names {backend!r}; allowed values: {', '.join(BACKENDS)}")
        if self.wandb_mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"config key 'logging.wandb_mode' is {self.wandb_mode!r}; allowed values: "
                             "online, offline, disabled (or leave it unset for W&B's own settings)")


@dataclass
class MonitorConfig:
    """Online k-NN on a labelled split every N epochs (0 disables)."""

    every_epochs: int = 0
    train_urls: list[str] = field(default_factory=list)
    val_urls: list[str] = field(default_factory=list)
    resize: int = 256
    crop: int = 224
    k: int = 20
    max_train_samples: Optional[int] = None


@dataclass
class TrainConfig:
    run_dir: str = "runs/dino"
    seed: int = 0
    epochs: int = 100
    max_steps: Optional[int] = None  # stop early (demo, tests) while schedules keep the full length
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    method: str = "dino"  # what a step computes (ssl_container/methods): dino | distill
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    dino: DINOLossConfig = field(default_factory=DINOLossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        # Sections check themselves; what is left spans sections.
        check_fields(self, "", positive=("epochs", "max_steps", "max_nonfinite"), choices={"method": METHOD_NAMES})
        if self.method == "distill" and not self.distill.teacher:
            raise ValueError("method=distill needs config key 'distill.teacher': an export folder, a run or step "
                             "folder, a weights file, or a model name with local weights")
        for name in ("warmup_epochs", "warmup_teacher_temp_epochs"):
            if getattr(self.schedule, name) > self.epochs:
                raise ValueError(f"config key 'schedule.{name}' ({getattr(self.schedule, name)}) exceeds 'epochs' "
                                 f"({self.epochs})")


def _field_at(dotted: str) -> tuple[Any, Any]:
    """The dataclass that holds a dotted key, and the key's field (None where the path leaves the schema)."""
    node: Any = TrainConfig
    *sections, name = dotted.strip().split(".")
    for part in sections:
        f = {f.name: f for f in dataclasses.fields(node)}.get(part)
        if f is None or f.default_factory is dataclasses.MISSING or not dataclasses.is_dataclass(f.default_factory()):
            return None, None
        node = type(f.default_factory())
    return node, {f.name: f for f in dataclasses.fields(node)}.get(name)


def _explain(err: Exception, source: str) -> ConfigError:
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) or "Key '" in str(err) and "not in" in str(err):
        section = _field_at(key)[0] if key else None
        allowed = ", ".join(f.name for f in dataclasses.fields(section)) if section else "see ssl_container/config.py"
        return ConfigError(f"{source}: unknown config key '{key}'. Allowed keys here: {allowed}")
    if isinstance(err, OmegaConfBaseException):
        msg = str(err).split("\n")[0]
        return ConfigError(f"{source}: bad value for '{key}': {msg}")
    return ConfigError(f"{source}: {err}")


def split_top_level(text: str) -> list[str]:
    """Split ``a,b{1,2},c`` at commas outside braces/brackets (brace patterns contain commas)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _parse_override_value(raw: str) -> Any:
    """YAML scalars and lists, except that WebDataset brace patterns (``{000..009}``) stay text."""
    raw = raw.strip()
    if raw.startswith("[") and raw.endswith("]"):
        return [_parse_override_value(p) for p in split_top_level(raw[1:-1])]
    if raw.startswith("{"):
        try:
            value = yaml.safe_load(raw)
            if isinstance(value, dict):
                return value
        except yaml.YAMLError:
            pass
        return raw
    if "{" in raw or raw.startswith(("/", "pipe:", "http", "s3:", "gs:")):
        return raw
    if raw.lower() in ("on", "off", "yes", "no", "y", "n"):
        # YAML 1.1 reads these as booleans (logging.progress=off would fail as False); OmegaConf
        # still turns them into booleans for boolean keys.
        return raw
    try:
        return yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return raw


# Keys that moved into the schedule section. Recipes, overrides and saved runs that use the old names
# still load: the value goes to its new key and the new name is logged.
MOVED_KEYS = {**{f"optim.{k}": f"schedule.{k}" for k in ("lr", "min_lr", "warmup_epochs", "weight_decay",
                                                         "weight_decay_end")},
              **{f"dino.{k}": f"schedule.{k}" for k in ("momentum_teacher", "teacher_temp", "warmup_teacher_temp",
                                                        "warmup_teacher_temp_epochs", "freeze_last_layer")}}


def _move_renamed_keys(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The recipe mapping with every key of ``MOVED_KEYS`` under its new name."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for old, new in MOVED_KEYS.items():
        (old_section, name), (new_section, new_name) = old.split("."), new.split(".")
        if not isinstance(out.get(old_section), dict) or name not in out[old_section]:
            continue
        target = out.setdefault(new_section, {})
        if not isinstance(target, dict) or new_name in target:
            raise ConfigError(f"{source}: '{old}' and '{new}' are both set; '{old}' is the old name of '{new}': "
                              "keep only the new one")
        target[new_name] = out[old_section].pop(name)
        log.warning("%s: '%s' is now '%s' (the old name still works)", source, old, new)
    return out


def load_config(path: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults <- recipe (a YAML file or a mapping of the same keys) <- ``key=value`` overrides,
    validated, as a :class:`TrainConfig`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.structured(TrainConfig)
    if path is not None:
        if isinstance(path, Mapping):
            raw, source = dict(path), "the recipe mapping"
        else:
            path = Path(path)
            source = str(path)
            if not path.is_file():
                raise ConfigError(f"config file '{path}' does not exist; the recipes are in configs/")
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(raw).__name__}")
        raw = _move_renamed_keys(raw, source)
        try:
            base = OmegaConf.merge(base, OmegaConf.create(raw))
        except OmegaConfBaseException as err:
            raise _explain(err, source) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. schedule.lr=1e-4 or data.urls=[a.tar,b.tar])")
        key, raw_value = item.split("=", 1)
        if key.strip() in MOVED_KEYS:
            log.warning("override '%s': '%s' is now '%s' (the old name still works)", item, key.strip(),
                        MOVED_KEYS[key.strip()])
            key = MOVED_KEYS[key.strip()]
        value = _parse_override_value(raw_value)
        if isinstance(value, str) and "list" in str(getattr(_field_at(key)[1], "type", "")).lower():
            value = [value]  # data.urls=/data/train-{0..9}.tar means a one-element list
        nested: Any = value
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        try:
            base = OmegaConf.merge(base, OmegaConf.create(nested))
        except OmegaConfBaseException as err:
            raise _explain(err, f"override '{item}'") from None
    try:
        cfg: TrainConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _explain(err, "config") from None
    except ValueError as err:  # a section's own validation (__post_init__), which names its key
        raise ConfigError(str(err)) from None
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dicts and lists (tuples as lists, as YAML and the saved config.yaml hold them)."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; ``kwargs`` mappings stay whole (their keys are the model's)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_digest(cfg: TrainConfig) -> str:
    """sha256 of the resolved config (sorted JSON), recorded in checkpoints and exports."""
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half a file)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def train_argument_parser() -> argparse.ArgumentParser:
    """The trainer's command line (``ssl-container train`` / ``python -m ssl_container.train``): a
    recipe, key=value overrides, ``--print-config``. It lives with the schema it resolves so that
    ``--help`` and ``--print-config`` answer without importing the trainer (torch, DeepSpeed)."""
    parser = argparse.ArgumentParser(
        prog="ssl-container train",
        description="DINO pretraining. Defaults are DINO's recipe with Container-Light; a YAML recipe and "
                    "key=value overrides change them (unknown keys fail before any work).")
    parser.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                        help="start N ranks on this machine (torchrun's launcher, run in-process: a stop signal to "
                             "the group ends in the ranks' checkpoint and one line, not a launcher traceback)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. schedule.lr=1e-4 data.batch_size=32")
    return parser


def print_resolved(path: str | Path | None, overrides: Sequence[str], prog: str = "ssl-container train") -> int:
    """``--print-config``: the resolved config as YAML (exit status 0), or the problem (status 2)."""
    try:
        cfg = load_config(path, overrides)
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return 0


def check_shards(cfg: TrainConfig) -> None:
    """Local shards that are missing or unreadable fail here, before the run folder is touched (and, from
    the command line, before torch is loaded)."""
    from ssl_container.data.sources import dataset_json_problem, expand_urls, local_path

    if not cfg.data.urls:
        raise ConfigError("data.urls is empty: pass the training shards, e.g. data.urls=[/data/train-{000000..000099}.tar]")
    try:
        urls = expand_urls(cfg.data.urls)
    except ValueError as err:
        raise ConfigError(f"data.urls: {err}") from None
    paths = [p for p in map(local_path, urls) if p is not None and not p.startswith("pipe:")]
    missing = [p for p in paths if not os.path.isfile(p)]
    unreadable = [p for p in paths if p not in missing and not os.access(p, os.R_OK)]
    if missing:
        how = ("`ssl-container demo` makes a small shard set (Open Clip Art drawings), `ssl-container shards write` packs an "
               "image folder; point data.urls at them")
        raise ConfigError(f"data.urls: {len(missing)} of the {len(urls)} training shards are missing (first: "
                          f"{missing[0]}). {how}.")
    if unreadable:
        raise ConfigError(f"data.urls: {len(unreadable)} of the {len(urls)} training shards cannot be read (first: "
                          f"{unreadable[0]}): check their permissions.")
    problem = dataset_json_problem(urls)
    if problem:
        raise ConfigError(f"data.urls: {problem}")


def data_config(cfg: TrainConfig) -> TrainDataConfig:
    """The data section, which is the stream's config, with the run's seed where it names none."""
    if not cfg.data.urls:
        raise ConfigError("data.urls is empty: pass the training shards, e.g. data.urls=[/data/train-{000000..000099}.tar]")
    return cfg.data if cfg.data.seed is not None else replace(cfg.data, seed=cfg.seed)
