"""The `fastpar` command (also `python -m fastpar`).

fastpar info     what this machine offers and which backends and transports are usable
fastpar build    compile (or find cached) the native extension now
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    from fastpar.info import collect, format_report

    print(format_report(collect()))
    return 0


def _build(args: argparse.Namespace) -> int:
    from fastpar import _native

    try:  # load() builds when nothing is cached, and a library that does not load is no success
        module = _native.load(verbose=args.verbose)
    except _native.NativeBuildError as error:  # every failure, compiler logs included
        print(f"fastpar build: {error}", file=sys.stderr)
        return 1
    print(f"native extension: {module.__file__}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from fastpar.training.cli import config_from_args, run

    return run(config_from_args(args, args.parser), debug=args.debug)


def _bench(args: argparse.Namespace) -> int:
    from fastpar.bench_cli import run

    return run(args.suites, args.results)


def build_parser() -> argparse.ArgumentParser:
    from fastpar.training.cli import add_arguments

    parser = argparse.ArgumentParser(prog="fastpar", description="fastpar command line")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a character LSTM language model (dp, pp or dp+pp)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(train)
    train.set_defaults(run=_train, parser=train)
    bench = commands.add_parser("bench", help="run benchmark suites, write CSV and plots")
    bench.add_argument("suites", nargs="*", default=["all"],
                       help="lstm, allreduce, dp, pp, reduce, slicing or all")  # fmt: skip
    bench.add_argument("--results", type=Path, default=Path("results"), help="output folder")
    bench.set_defaults(run=_bench)
    info = commands.add_parser("info", help="report versions, devices and usable backends")
    info.set_defaults(run=_info)
    build = commands.add_parser("build", help="compile the native extension (cached)")
    build.add_argument("--verbose", action="store_true", help="show the compiler's output")
    build.set_defaults(run=_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:  # before a command handles it itself (imports take seconds)
        print(f"\nfastpar {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
