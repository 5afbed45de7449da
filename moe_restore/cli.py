"""The ``moe-restore`` command line: argument parsing only; the work happens in the modules."""
from __future__ import annotations

import argparse
import importlib
import sys

BENCH_SUITES = ("moe", "nested", "scan")


def _bench(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.suites) - set(BENCH_SUITES))
    if unknown:
        raise SystemExit(f"moe-restore bench: unknown suite(s) {unknown}; choose from {list(BENCH_SUITES)}")
    status = 0
    for name in args.suites or BENCH_SUITES:
        suite = importlib.import_module(f"moe_restore.benchmarks.{name}")
        status |= suite.main(["--quick"] if args.quick else [])
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-restore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="time the kernels against eager PyTorch (GPU for kernel speeds)")
    bench.add_argument("suites", nargs="*", metavar="SUITE",
                       help=f"which suites to run, of {', '.join(BENCH_SUITES)} (default: all)")
    bench.add_argument("--quick", action="store_true", help="small shapes only")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
