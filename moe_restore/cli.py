"""The ``moe-restore`` command line: argument parsing only; the work happens in the modules.

A user's mistake ends the command with one line on stderr naming the problem and a non-zero exit
status: 2 for arguments that argparse refuses (every numeric option is range-checked as it is
parsed), 1 for a ``UserError`` raised by the modules (a missing or corrupt checkpoint, an empty
data folder, a run folder in use, ...) or an ``OSError`` (a file that cannot be read or written),
130 for Ctrl-C. Any other exception is a bug and keeps its traceback; ``--debug`` (or the
environment variable ``MOE_RESTORE_DEBUG=1``) shows the traceback of every error.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Callable

from moe_restore.errors import UserError
from moe_restore.kernels import settings

TIMED_SUITES = ("moe", "nested", "scan")
# traffic: bytes and FLOPs counted under the interpreter (moe_restore.benchmarks.traffic); run when named
BENCH_SUITES = (*TIMED_SUITES, "traffic")


def _bench(args: argparse.Namespace) -> int:
    if args.plot:
        from moe_restore.benchmarks.plots import write_plots

        for path in args.plot:
            if not Path(path).is_file():
                raise SystemExit(f"moe-restore bench --plot: no results file {path}")
            write_plots(path)
        return 0
    unknown = sorted(set(args.suites) - set(BENCH_SUITES))
    if unknown:
        raise SystemExit(f"moe-restore bench: unknown suite(s) {unknown}; choose from {list(BENCH_SUITES)}")
    status = 0
    for name in args.suites or TIMED_SUITES:
        suite = importlib.import_module(f"moe_restore.benchmarks.{name}")
        status |= suite.main(["--quick"] if args.quick else [])
    return status


def _tasks(text: str) -> tuple[str, ...]:
    from moe_restore.data import check_tasks

    try:
        return check_tasks(t.strip() for t in text.split(",") if t.strip())
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _int_at_least(low: int, *, multiple_of: int = 1) -> Callable[[str], int]:
    """An argparse type: an int >= ``low`` (and a multiple of ``multiple_of``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple_of}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _device(text: str) -> str:
    """An argparse type: a torch device that this machine has."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def _train(args: argparse.Namespace) -> int:
    from moe_restore.train.trainer import TrainConfig, train

    # Options left out keep TrainConfig's defaults (the parser sets only what was given).
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.no_amp:
        given["amp"] = False
    train(TrainConfig(**given), resume=args.resume, overwrite=args.overwrite, strict=args.strict)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from moe_restore.data.sources import evaluation_set
    from moe_restore.train.evaluate import comparison_table, evaluate, markdown_table, results_folder, write_results
    from moe_restore.train.inference import load_model

    by_name = {}
    for index, checkpoint in enumerate(args.checkpoint):
        model, run = load_model(checkpoint, device=args.device or _default_device(), backend=args.backend,
                                sample_steps=args.sample_steps)
        tasks = args.tasks or tuple(run["tasks"])
        results = evaluate(model, evaluation_set(args.data, tasks), tile=args.tile)
        json_path, md_path = write_results(results, results_folder(args.out, index, len(args.checkpoint),
                                                                   run["model"]))
        print(f"{checkpoint} ({run['model']}):\n" + markdown_table(results), end="")
        print(f"written: {json_path}, {md_path}")
        by_name[f"{run['model']} ({Path(checkpoint).parent.name or checkpoint})"] = results
    if len(by_name) > 1:
        print("\nside by side (PSNR dB / SSIM):\n" + comparison_table(by_name), end="")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from moe_restore.data.image_io import read_image, write_image
    from moe_restore.train.inference import load_model, restore_image, restore_targets

    if args.overlap >= args.tile:
        raise UserError(f"--overlap ({args.overlap}) must be smaller than --tile ({args.tile})")
    targets = restore_targets(list(map(Path, args.inputs)), args.out, args.format)
    model, _ = load_model(args.checkpoint, device=args.device or _default_device(), backend=args.backend,
                          sample_steps=args.sample_steps)
    for source, target in targets.items():
        write_image(target, restore_image(model, read_image(source), tile=args.tile, overlap=args.overlap))
        print(f"{source} -> {target}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from moe_restore.train.demo import run_demo
    from moe_restore.train.evaluate import markdown_table, tasks_not_beating_identity

    results = run_demo(args.out, model=args.model, steps=args.steps)
    print(markdown_table(results), end="")
    print(f"written: {args.out}/grid.png, {args.out}/results.md, {args.out}/results.json")
    behind = tasks_not_beating_identity(results)
    if behind:
        print(f"the model does not beat the identity baseline on: {', '.join(behind)}", file=sys.stderr)
        return 1
    return 0


def _version() -> str:
    from moe_restore import __version__

    return __version__


def _model_names() -> list[str]:
    from moe_restore.models import names

    return names()


def _train_defaults():
    from moe_restore.train.trainer import TrainConfig

    return TrainConfig()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample-steps", type=_positive, default=None,
                        help="sampling steps of a MiM-DiT checkpoint (default: its own, 8); M2IR ignores it")
    parser.add_argument("--device", type=_device, default=None,
                        help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--backend", choices=("triton", "torch"), default=None,
                        help="kernel backend (default: Triton on CUDA, torch on the CPU)")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose refusals are one line (``prog: error: ...``), without the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moe-restore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of every error (also: MOE_RESTORE_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="time the kernels against eager PyTorch (GPU for kernel speeds)")
    bench.add_argument("suites", nargs="*", metavar="SUITE",
                       help=f"which suites to run, of {', '.join(BENCH_SUITES)} (default: {', '.join(TIMED_SUITES)})")
    bench.add_argument("--quick", action="store_true", help="small shapes only")
    bench.add_argument("--plot", nargs="+", metavar="RESULTS.json", default=None,
                       help="redraw the PNG charts of saved results (runs no suite)")
    bench.set_defaults(run=_bench)

    demo = commands.add_parser("demo", help="train a tiny restorer on the built-in images, evaluate, write demo_out/")
    demo.add_argument("--model", default="m2ir-tiny", choices=("m2ir-tiny", "mim-dit-tiny"),
                      help="which restorer to train (default: m2ir-tiny; mim-dit-tiny is the diffusion one)")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--steps", type=_positive, default=None, help="training steps (default: the demo's fixed budget)")
    demo.set_defaults(run=_demo)

    train = commands.add_parser("train", help="train a restorer (under torchrun: DistributedDataParallel)",
                                argument_default=argparse.SUPPRESS)
    defaults = _train_defaults()
    train.add_argument("--model", help=f"configuration name, one of {', '.join(_model_names())} "
                       f"(default: {defaults.model})")
    train.add_argument("--data", help=f"'builtin' or a folder (see moe_restore.data.sources; default: {defaults.data})")
    train.add_argument("--tasks", type=_tasks, help="comma-separated degradations, composites with '+' "
                                                   f"(default: {','.join(defaults.tasks)})")
    train.add_argument("--steps", type=_positive, help=f"optimizer steps of the whole run (default: {defaults.steps}; "
                       "with --resume, the new total)")
    train.add_argument("--batch", type=_positive, help=f"images per step and process (default: {defaults.batch})")
    train.add_argument("--patch", type=_int_at_least(8, multiple_of=8),
                       help=f"training crop size, a multiple of 8 (default: {defaults.patch})")
    train.add_argument("--lr", type=_positive_float,
                       help=f"peak learning rate, after warm-up and before cosine decay (default: {defaults.lr})")
    train.add_argument("--eval-every", type=_non_negative,
                       help=f"steps between evaluations (0: none; default: {defaults.eval_every})")
    train.add_argument("--checkpoint-every", type=_non_negative,
                       help=f"steps between checkpoints (0: only at the end; default: {defaults.checkpoint_every})")
    train.add_argument("--seed", type=_non_negative,
                       help=f"seed of the initial weights and of the data draws (default: {defaults.seed})")
    train.add_argument("--out", required=True, help="run folder (checkpoint.pt, log.jsonl, evaluations)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", default=False, help="continue from <out>/checkpoint.pt")
    start.add_argument("--overwrite", action="store_true", default=False,
                       help="start a new run in a folder that holds another one (its checkpoint and log are "
                            "replaced when the new run has written its first checkpoint)")
    train.add_argument("--strict", action="store_true", default=False,
                       help="exit with status 1 when the final evaluation finds the model worse than its input")
    train.add_argument("--no-amp", action="store_true", default=False, help="no bfloat16 autocast on CUDA")
    train.add_argument("--workers", type=_non_negative, help=f"data-loading processes (default: {defaults.workers})")
    _add_runtime_options(train)
    train.set_defaults(run=_train)

    evaluation = commands.add_parser("eval", help="PSNR/SSIM per task beside the identity baseline")
    evaluation.add_argument("--checkpoint", required=True, nargs="+",
                            help="one checkpoint, or several to compare side by side (e.g. M2IR and MiM-DiT)")
    evaluation.add_argument("--data", default="builtin", help="'builtin' or a folder")
    evaluation.add_argument("--tasks", type=_tasks, default=None, help="default: the checkpoint's tasks")
    evaluation.add_argument("--out", default="eval_out", help="folder for results.json and results.md")
    evaluation.add_argument("--tile", type=_positive, default=256, help="tile size for large images")
    _add_runtime_options(evaluation)
    evaluation.set_defaults(run=_eval)

    from moe_restore.kernels import compile_check

    check = commands.add_parser("compile-check", help="compile every Triton kernel for sm_90a/sm_80 (no GPU needed)")
    compile_check.add_arguments(check)
    check.set_defaults(run=compile_check.run_from_args)

    restore = commands.add_parser("restore", help="restore images of any size (PNG/JPEG in and out)")
    restore.add_argument("--checkpoint", required=True, help="checkpoint.pt of a run (written by train)")
    restore.add_argument("inputs", nargs="+", metavar="IN", help="input images")
    restore.add_argument("--out", required=True, help="output folder")
    restore.add_argument("--format", choices=("png", "jpg"), default=None, help="default: the input's format")
    restore.add_argument("--tile", type=_positive, default=256, help="tile size (tiles overlap by --overlap)")
    restore.add_argument("--overlap", type=_non_negative, default=32, help="less than --tile")
    _add_runtime_options(restore)
    restore.set_defaults(run=_restore)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; a user's mistake raises ``SystemExit`` after one line on stderr."""
    args = build_parser().parse_args(argv)
    debug = args.debug or settings.debug()
    try:
        return args.run(args)
    except (UserError, OSError, KeyboardInterrupt) as error:
        if debug:
            raise
        if isinstance(error, KeyboardInterrupt):
            print(f"moe-restore {args.command}: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        message = " ".join(str(error).split())  # one line, whatever the message holds
        print(f"moe-restore {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    sys.exit(main())
