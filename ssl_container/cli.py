"""The ``ssl-container`` command line: one subcommand per job, each a thin shim over library calls.

Argument parsing lives here and nowhere below it in the library, so every job is also callable from
Python with plain arguments.
"""
from __future__ import annotations

import argparse
import sys


def _cmd_models(args: argparse.Namespace) -> int:
    from ssl_container.models.info import describe_models

    describe_models(sizes=args.sizes, as_json=args.json)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ssl_container.demo import run_demo

    return run_demo(data_root=args.data, batch_size=args.batch_size, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-container",
        description="DINO pretraining of Container backbones: data, training, evaluation, export.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("models", help="parameters and GMACs of the Container family")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 96], help="square input sizes")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("demo", help="the end-to-end demo on the embedded default data")
    p.add_argument("--data", default=None, help="data root (default: ../shared/data, or $SSL_CONTAINER_DATA)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    # --- shards (data pipeline) ---------------------------------------------------------------
    # (filled in by the data issue: `ssl-container shards write|verify`)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
