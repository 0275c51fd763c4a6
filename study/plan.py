"""What a study will do: one unit per (arm, seed), each an ordinary run folder, and where each stands.

Units are ordered seed by seed (every arm of seed 0, then of seed 1, ...), so a study stopped half-way
already holds one complete comparison. Every unit trains with the same recipe, budget and schedule
length; only the backbone (and any arm override, stated) differs. The trainer's own resume makes a
half-trained unit continue where it stopped; a unit whose ``result.json`` matches its plan is kept.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from study.config import ArmConfig, StudyConfig, StudyConfigError

__all__ = ["Unit", "plan_units", "train_overrides", "unit_status", "describe_plan", "schedule"]


@dataclass(frozen=True)
class Unit:
    arm: ArmConfig
    seed: int
    run_dir: Path
    result_path: Path

    @property
    def key(self) -> str:
        return f"{self.arm.name}_seed{self.seed}"


def plan_units(cfg: StudyConfig, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> list[Unit]:
    """The units to run, seed-major, restricted to ``arms`` / ``seeds`` when given."""
    chosen = [cfg.arm(n) for n in arms] if arms else list(cfg.arms)
    for s in seeds or ():
        if s not in cfg.seeds:
            raise StudyConfigError(f"seed {s} is not one of the study's seeds {cfg.seeds} (set seeds=[...] to add it)")
    out = Path(cfg.out)
    return [Unit(a, s, out / "runs" / f"{a.name}_seed{s}", out / "results" / f"{a.name}_seed{s}.json")
            for s in (seeds or cfg.seeds) for a in chosen]


def schedule(cfg: StudyConfig, world_size: int = 1) -> dict[str, int | None]:
    """Steps, the recipe's epochs that end its schedules with them, and the curve's checkpoint interval."""
    if cfg.steps is None:
        return {"steps": None, "epochs": None, "every": int(cfg.curve_every_steps)}
    from ssl_container.config import data_config, load_config
    from ssl_container.data.stream import steps_per_epoch

    recipe = load_config(cfg.recipe, cfg.overrides)
    iters = max(1, steps_per_epoch(data_config(recipe), world_size) // recipe.engine.grad_accum_steps)
    every = cfg.curve_every_steps or math.ceil(cfg.steps / 4)
    return {"steps": cfg.steps, "epochs": max(1, math.ceil(cfg.steps / iters)), "every": every}


def train_overrides(cfg: StudyConfig, unit: Unit, plan: dict[str, int | None]) -> list[str]:
    """The trainer's ``key=value`` list for one unit: shared overrides, the arm, the seed, the budget."""
    out = [*cfg.overrides, f"model.name={unit.arm.model}", f"model.kwargs={json.dumps(unit.arm.kwargs)}",
           f"seed={unit.seed}", f"run_dir={unit.run_dir}"]
    if plan["steps"] is not None:
        out += [f"max_steps={plan['steps']}", f"epochs={plan['epochs']}"]
    # Every curve point is a kept checkpoint; the last one is what the study evaluates and exports.
    points = math.ceil((plan["steps"] or 10 ** 7) / plan["every"]) + 1
    out += [f"checkpoint.every_steps={plan['every']}", f"checkpoint.keep_last={min(points, 10 ** 4)}"]
    return out + list(unit.arm.overrides)


def plan_digest(cfg: StudyConfig, unit: Unit, overrides: Sequence[str]) -> str:
    """What a finished unit's result must match to be kept: its recipe file, overrides and evaluations."""
    recipe = Path(cfg.recipe).read_bytes() if Path(cfg.recipe).is_file() else b""
    evals = {"knn": vars(cfg.knn), "transfer": vars(cfg.transfer) if cfg.transfer else None,
             "detection": vars(cfg.detection) if unit.arm.name in cfg.detection.arms else None}
    blob = json.dumps({"overrides": list(overrides), "evals": evals}, sort_keys=True, default=str).encode()
    return hashlib.sha256(recipe + blob).hexdigest()[:16]


def trained_steps(run_dir: Path) -> int:
    from ssl_container.run_folder import latest_step_dir

    step_dir = latest_step_dir(run_dir) if run_dir.is_dir() else None
    return int(step_dir.name.split("_")[-1]) if step_dir else 0


def unit_status(cfg: StudyConfig, unit: Unit, plan: dict[str, int | None], overrides: Sequence[str]) -> dict[str, Any]:
    """``done`` (a result matching the plan), ``trained`` (to evaluate), ``partial`` (resumes) or ``new``."""
    steps = trained_steps(unit.run_dir)
    if unit.result_path.is_file():
        try:
            result = json.loads(unit.result_path.read_text())
        except ValueError:
            result = {}
        if result.get("complete") and result.get("plan_digest") == plan_digest(cfg, unit, overrides):
            return {"state": "done", "steps": steps}
    if plan["steps"] is not None and steps >= plan["steps"]:
        return {"state": "trained", "steps": steps}
    if plan["steps"] is None and (unit.run_dir / "summary.json").is_file():
        return {"state": "trained", "steps": steps}
    return {"state": "partial" if steps else "new", "steps": steps}


def describe_plan(cfg: StudyConfig, units: Sequence[Unit], plan: dict[str, int | None]) -> str:
    lines = [f"study '{cfg.name}': {len(units)} units ({len({u.arm.name for u in units})} arms x "
             f"{len({u.seed for u in units})} seeds), recipe {cfg.recipe}"
             + (f" {' '.join(cfg.overrides)}" if cfg.overrides else ""),
             f"  budget: {str(plan['steps']) + ' steps' if plan['steps'] else 'the recipe epochs'} per unit"
             + (f" ({plan['epochs']} recipe epochs)" if plan["epochs"] else "")
             + f", a k-NN point every {plan['every']} steps",
             f"  k-NN: {cfg.knn.path} {cfg.knn.reference_split} -> {cfg.knn.held_out_split} at {cfg.knn.resolution} px"
             + (f"; transfer: {cfg.transfer.path} at {cfg.transfer.resolution} px" if cfg.transfer else "")
             + (f"; detection for {', '.join(cfg.detection.arms)} (fine-tuning seeds {cfg.detection.seeds})"
                if cfg.detection.arms else ""),
             f"  output: {cfg.out}/study.json, study.md, study.png"]
    for u in units:
        o = train_overrides(cfg, u, plan)
        st = unit_status(cfg, u, plan, o)
        what = {"done": "done, kept", "trained": f"trained ({st['steps']} steps), to evaluate",
                "partial": f"resumes from step {st['steps']}", "new": "to train"}[st["state"]]
        lines.append(f"  {u.key:<28} {u.arm.model:<24} {what}")
        if u.arm.overrides:
            lines.append(f"  {'':<28} arm overrides: {' '.join(u.arm.overrides)}")
    return "\n".join(lines)
