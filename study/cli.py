"""The ``ssl-container study`` command line (also ``python -m study``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ssl_container.signals import stoppable
from study.config import StudyConfigError, load_study_config

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssl-container study",
        description="Pretrain every arm (a backbone) of a study with the same DINO recipe, step budget and seeds, "
                    "evaluate each (k-NN on the pretraining data's held-out split next to random init and raw "
                    "pixels, k-NN transfer to a second dataset, detection where asked) and write OUT/study.json, "
                    "OUT/study.md and OUT/study.png. Every arm is an ordinary run folder (OUT/runs/ARM_seedS): a "
                    "stopped study resumes where it stopped, finished arms are kept.",
        epilog="examples:\n"
               "  ssl-container study --config configs/studies/imagenette.yaml --dry-run\n"
               "  ssl-container study --config configs/studies/imagenette.yaml --arms container_light,vit --seeds 0\n"
               "  ssl-container study --config configs/studies/imagenet.yaml --slurm slurm.options.partition=gpu\n"
               "  ssl-container study --config configs/studies/imagenet.yaml --no-train   (after the array: evaluate, report)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="study YAML (configs/studies/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the study config (steps=100, out=DIR, ...)")
    p.add_argument("--arms", default=None, help="comma-separated arm names: run only these (default: all)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: run only these (default: the study's)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (with --slurm: the sbatch script); run nothing")
    p.add_argument("--slurm", action="store_true",
                   help="submit the units' training as one Slurm job array through the launcher (slurm.options); "
                        "run the command again without --slurm once it is done to evaluate and report")
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: evaluate the units already trained and rewrite study.json/md/png")
    return p


def _slurm(cfg, units, dry_run: bool) -> int:
    from launch.options import JobOptions, LaunchError
    from launch.submit import submit_sweep
    from study.plan import schedule, train_overrides

    try:
        opts = JobOptions(**{"job_name": f"study-{Path(cfg.out).name}", **cfg.slurm.options})
        opts.validate()
        plan = schedule(cfg, opts.world_size)
        members = [train_overrides(cfg, u, plan) for u in units]
        sub = submit_sweep(cfg.recipe, [f"run_dir={Path(cfg.out) / 'runs'}"], members, opts,
                           mode="dry-run" if dry_run else "slurm")
    except (LaunchError, TypeError) as err:
        print(f"ssl-container study: {err}", file=sys.stderr)
        return 2
    print(sub.describe())
    if not dry_run:
        print("when the array has finished: the same command without --slurm and with --no-train evaluates every "
              "trained unit and writes the report (without --no-train, an unfinished unit would train here)")
    return 0


@stoppable("ssl-container study")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ssl_container.config import ConfigError

    try:
        cfg = load_study_config(args.config, args.overrides)
        from study.plan import describe_plan, plan_units, schedule

        units = plan_units(cfg, args.arms.split(",") if args.arms else None,
                           [int(s) for s in args.seeds.split(",")] if args.seeds else None)
        if args.slurm:
            return _slurm(cfg, units, args.dry_run)
        plan = schedule(cfg)
        if args.dry_run:
            print(describe_plan(cfg, units, plan))
            return 0
        _check_eval_data(cfg)  # a wrong path or split is refused now, not after the first unit trained
    except (StudyConfigError, ConfigError, ValueError, FileNotFoundError) as err:
        print(f"ssl-container study: {err}", file=sys.stderr)
        return 2
    from study.report import write_report
    from study.runner import StudyError, run_units

    print(describe_plan(cfg, units, plan), flush=True)
    failed = None
    try:
        run_units(cfg, units, plan, log=lambda m: print(m, flush=True), train=not args.no_train)
    except StudyError as err:
        failed = err
    files = write_report(cfg, _current_results(cfg, plan))
    print(f"study: {files['json']}, {files['md']}, {files['png']}")
    if failed is not None:
        print(f"ssl-container study: {failed}", file=sys.stderr)
        return 1
    return 0


def _check_eval_data(cfg) -> None:
    from eval.features import resolve_data

    for data in (cfg.knn, cfg.transfer):
        if data is not None:
            for split in (data.reference_split, data.held_out_split):
                resolve_data(data.path, split)


def _current_results(cfg, plan) -> list[dict]:
    """Every unit of the study with a complete result made under the current plan (not only the units run
    now; a result of an earlier plan, other steps or another recipe, is left out of the comparison)."""
    import json

    from study.plan import plan_digest, plan_units, train_overrides

    out = []
    for unit in plan_units(cfg):
        if unit.result_path.is_file():
            result = json.loads(unit.result_path.read_text())
            if result.get("complete") and result.get("plan_digest") == plan_digest(
                    cfg, unit, train_overrides(cfg, unit, plan)):
                out.append(result)
    return out


if __name__ == "__main__":
    sys.exit(main())
