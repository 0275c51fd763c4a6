"""A study's typed config: the arms, the one DINO recipe they share, the budget, the seeds and the
evaluations. YAML (``configs/studies/*.yaml``) + ``key=value`` overrides, validated by OmegaConf's
structured configs like the trainer's own config, so a typo fails before anything trains.

An arm is a backbone (a model name and its constructor arguments) plus, only where the recipe cannot
serve every arm alike, its own trainer overrides; those are printed in the study's table so nobody
mistakes them for the shared recipe.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

__all__ = ["ArmConfig", "EvalDataConfig", "DetectionConfig", "StudyConfig", "StudyConfigError", "load_study_config"]


class StudyConfigError(ValueError):
    """A study config that cannot work; the message names the key and the fix."""


@dataclass
class ArmConfig:
    name: str = "???"  # short, unique: names the run folder (runs/<name>_seed<S>)
    model: str = "???"  # a registered Container variant or any timm model name
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor arguments (model.kwargs)
    overrides: list[str] = field(default_factory=list)  # trainer key=value for this arm only (stated in the table)
    note: str = ""  # one line for the table: what the arm is, why its settings


@dataclass
class EvalDataConfig:
    """A labelled shard set (dataset.json) for the k-NN protocol of eval/protocol.py."""

    path: str = "???"
    reference_split: str = "train"
    held_out_split: str = "val"
    resolution: int = 64
    max_shards: Optional[int] = None  # only the first N shards of each split (a cheaper look)
    # false: both splits decoded once into memory (eval/protocol.py; small sets, many curve points);
    # true: features extracted shard by shard (eval/features.py), resize to resolution * 8/7 then centre
    # crop as DINO's k-NN does: for sets too large to hold decoded (ImageNet).
    streaming: bool = False


@dataclass
class DetectionConfig:
    """Faster R-CNN transfer (eval/detection.py) of the final teacher against the same backbone at random init."""

    arms: list[str] = field(default_factory=list)  # which arms get it (empty: none)
    data: str = "../shared/data/coco128"
    seeds: list[int] = field(default_factory=lambda: [0])  # fine-tuning seeds, each for both inits
    args: list[str] = field(default_factory=list)  # more eval.detection arguments (epochs, sizes, recipe)


@dataclass
class SlurmConfig:
    """What ``--slurm`` asks for each arm's training job (launch.options.JobOptions fields)."""

    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyConfig:
    name: str = "study"
    out: str = "runs/study"
    recipe: str = "???"  # the DINO recipe every arm trains with (a trainer YAML)
    overrides: list[str] = field(default_factory=list)  # trainer key=value for every arm
    steps: Optional[int] = None  # training steps per arm (null: the recipe's epochs); schedules end with them
    curve_every_steps: Optional[int] = None  # a k-NN point on the curve every N steps (default: 4 points)
    seeds: list[int] = field(default_factory=lambda: [0])
    arms: list[ArmConfig] = field(default_factory=list)
    knn: EvalDataConfig = field(default_factory=EvalDataConfig)  # the pretraining data's held-out split
    transfer: Optional[EvalDataConfig] = None  # a second dataset (k-NN only)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    headline: list[str] = field(default_factory=list)  # two arm names: the comparison the verdict states

    def arm(self, name: str) -> ArmConfig:
        for a in self.arms:
            if a.name == name:
                return a
        raise StudyConfigError(f"no arm named '{name}': this study has {', '.join(a.name for a in self.arms)}")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _check(cfg: StudyConfig, source: str) -> StudyConfig:
    if not cfg.arms:
        raise StudyConfigError(f"{source}: 'arms' is empty: list at least one arm (name, model, kwargs)")
    names = [a.name for a in cfg.arms]
    for a in cfg.arms:
        if not _NAME.match(a.name):
            raise StudyConfigError(f"{source}: arm name {a.name!r}: use letters, digits and _ . + - (it names a folder)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StudyConfigError(f"{source}: arm names must be unique, {dup} repeat")
    if not cfg.seeds:
        raise StudyConfigError(f"{source}: 'seeds' is empty: give at least one seed")
    for key in ("steps", "curve_every_steps"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise StudyConfigError(f"{source}: '{key}' must be >= 1, got {value}")
    if cfg.steps is None and cfg.curve_every_steps is None:
        raise StudyConfigError(f"{source}: with 'steps: null' (the recipe's epochs) set 'curve_every_steps' too")
    unknown = [n for n in cfg.detection.arms if n not in names]
    if unknown:
        raise StudyConfigError(f"{source}: detection.arms names {unknown}, which are not arms of this study")
    if cfg.headline and (len(cfg.headline) != 2 or any(n not in names for n in cfg.headline)):
        raise StudyConfigError(f"{source}: 'headline' must name two arms of this study, got {list(cfg.headline)}")
    return cfg


def load_study_config(path: str | Path, overrides: Sequence[str] = ()) -> StudyConfig:
    """Defaults <- the study YAML <- ``key=value`` overrides (dotted keys; lists as [a,b])."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise StudyConfigError(f"study config '{path}' does not exist; the studies are configs/studies/*.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise StudyConfigError(f"study config '{path}' is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise StudyConfigError(f"study config '{path}' must hold a mapping, got {type(raw).__name__}")
    try:
        base = OmegaConf.structured(StudyConfig)
        if isinstance(raw.get("arms"), list):  # a list of structured entries: validate each against ArmConfig
            raw = {**raw, "arms": [OmegaConf.merge(OmegaConf.structured(ArmConfig), a) for a in raw["arms"]]}
        for key in ("transfer",):
            if isinstance(raw.get(key), dict):
                raw = {**raw, key: OmegaConf.merge(OmegaConf.structured(EvalDataConfig), raw[key])}
        merged = OmegaConf.merge(base, raw)
        for item in overrides:
            if "=" not in item:
                raise StudyConfigError(f"override '{item}' is not key=value (e.g. steps=100 or seeds=[0,1])")
            key, value = item.split("=", 1)
            OmegaConf.update(merged, key.strip(), yaml.safe_load(value) if value.strip() else "", merge=False)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        raise StudyConfigError(f"{path}: bad study config{f' at {key!r}' if key else ''}: "
                               f"{str(err).splitlines()[0]}") from None
    # The recipe is named relative to the study file (both live in configs/), or to the working folder.
    if not Path(cfg.recipe).is_absolute() and not Path(cfg.recipe).is_file() and (path.parent / cfg.recipe).is_file():
        cfg.recipe = os.path.normpath(path.parent / cfg.recipe)
    return _check(cfg, str(path))


def study_config_dict(cfg: StudyConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
