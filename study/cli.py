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
               "  ssl-container study --config configs/studies/imagenet.yaml     (after the array: evaluate, report)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="study YAML (configs/study_*.yaml)")
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
        print("when the array has finished, the same command without --slurm evaluates every trained unit "
              "and writes the report")
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
    except (StudyConfigError, ConfigError, ValueError) as err:
        print(f"ssl-container study: {err}", file=sys.stderr)
        return 2
    from study.report import write_report
    from study.runner import StudyError, run_units

    print(describe_plan(cfg, units, plan), flush=True)
    try:
        run_units(cfg, units, plan, log=lambda m: print(m, flush=True), train=not args.no_train)
    except StudyError as err:
        print(f"ssl-container study: {err}", file=sys.stderr)
        return 1
    # The report covers every unit of the study that has a complete result, not only those run now.
    import json

    from study.plan import plan_units as all_units

    results = [json.loads(u.result_path.read_text()) for u in all_units(cfg) if u.result_path.is_file()]
    files = write_report(cfg, [r for r in results if r.get("complete")])
    print(f"study: {files['json']}, {files['md']}, {files['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
