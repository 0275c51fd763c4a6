"""DINO pretraining from the command line, and the names the rest of the project imports.

    ssl-container train --config configs/imagenette.yaml [key=value ...]
    python -m ssl_container.train --config ... [key=value ...]
    torchrun --nproc-per-node 8 -m ssl_container.train --config ...      (or srun / submitit)

The loop itself is ``ssl_container.trainer.loop.train``; this module loads it (and torch) only after
the arguments and the config are good, so ``--help`` and a config refusal answer at once.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any, Sequence

from ssl_container.config import ConfigError, check_shards, load_config, print_resolved, train_argument_parser
from ssl_container.run_folder import CheckpointError
from ssl_container.trainer.run_lock import RunFolderBusy
from ssl_container.signals import StoppedBySignal, exit_code

# and, loaded on first use (see __getattr__): train, NonFiniteLossError, build_student, data_config
__all__ = ["main", "StoppedBySignal", "REFUSALS"]

# Refusals before any work (bad config, crops, model, shards, a busy or unwritable run folder, a
# checkpoint that cannot be resumed): each message names the problem and the fix.
REFUSALS = (ConfigError, CheckpointError, RunFolderBusy)


def __getattr__(name: str) -> Any:
    """``train`` and the run builders, loaded (with torch) on first use."""
    if name in ("train", "NonFiniteLossError"):
        from ssl_container.trainer import loop

        return getattr(loop, name)
    if name in ("build_student", "data_config"):
        from ssl_container.trainer import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _failures() -> tuple[type[BaseException], ...]:
    from ssl_container.trainer.loop import LoaderWorkerDied, NonFiniteLossError

    return (LoaderWorkerDied, NonFiniteLossError)


def _run_ranks(n: int, argv: list[str]) -> int:
    """``--nproc-per-node N``: torchrun's launcher in this process, starting N ranks of the same command.
    A stop signal to the group reaches the ranks, which save at a step boundary and print the one line;
    the launcher then ends with 128 + N and no traceback of its own (plain torchrun prints one and exits 1)."""
    from ssl_container import distributed as D

    if D.resolve_env().world_size > 1:
        print("ssl-container train: --nproc-per-node starts the ranks itself; under torchrun, srun or submitit "
              "leave it out", file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # the ranks speak for the run
    child = [a for i, a in enumerate(argv) if not (a.startswith("--nproc-per-node") or
                                                   (i and argv[i - 1] == "--nproc-per-node"))]
    launch = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={n}", "-m", "ssl_container.train",
                                           *child])
    try:
        run(launch)
    except SignalException as stop:  # the group's signal reached the launcher too: the ranks saved and said so
        return exit_code(stop.sigval)
    except ChildFailedError as err:
        rank, failure = min(err.failures.items())
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        if code <= 128:  # a stop (128 + N) was said by the ranks; a failure is named here once
            print(f"ssl-container train: rank {rank} exited with {code}; its own message is above", file=sys.stderr)
        return code
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``ssl-container train ...`` and ``python -m ssl_container.train ...`` (also under torchrun / srun)."""
    args = train_argument_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.print_config:
        return print_resolved(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        check_shards(cfg)
    except ConfigError as err:
        print(f"ssl-container train: {err}", file=sys.stderr)
        return 2
    if args.nproc_per_node:
        return _run_ranks(args.nproc_per_node, sys.argv[1:] if argv is None else list(argv))
    try:
        from ssl_container.trainer.loop import train

        summary = train(cfg)
    except StoppedBySignal as stop:
        from ssl_container import distributed as D

        if D.resolve_env().is_main:
            print(f"ssl-container train: {stop}", file=sys.stderr)
        return exit_code(stop.signum)
    except _failures() as err:  # a worker died, the loss diverged: one line, exit 1, what was saved said
        from ssl_container import distributed as D

        if D.resolve_env().is_main:
            print(f"ssl-container train: {err}", file=sys.stderr)
        return 1
    except REFUSALS as err:
        from ssl_container import distributed as D

        # Worked out the same way on every rank: one line from rank 0, no traceback.
        if D.resolve_env().is_main:
            print(f"ssl-container train: {err}", file=sys.stderr)
        return 2
    from ssl_container import distributed as D

    if D.resolve_env().is_main:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
