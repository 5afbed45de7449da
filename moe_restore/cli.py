"""The ``moe-restore`` command line: argument parsing only; the work happens in the modules."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCH_SUITES = ("moe", "nested", "scan")
DEFAULT_TASKS = "noise,rain,haze,blur,lowlight"


def _bench(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.suites) - set(BENCH_SUITES))
    if unknown:
        raise SystemExit(f"moe-restore bench: unknown suite(s) {unknown}; choose from {list(BENCH_SUITES)}")
    status = 0
    for name in args.suites or BENCH_SUITES:
        suite = importlib.import_module(f"moe_restore.benchmarks.{name}")
        status |= suite.main(["--quick"] if args.quick else [])
    return status


def _tasks(text: str) -> tuple[str, ...]:
    from moe_restore.data import check_tasks

    try:
        return check_tasks(t.strip() for t in text.split(",") if t.strip())
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _train(args: argparse.Namespace) -> int:
    from moe_restore.train.trainer import TrainConfig, train

    config = TrainConfig(model=args.model, data=args.data, tasks=args.tasks, steps=args.steps, batch=args.batch,
                         patch=args.patch, lr=args.lr, eval_every=args.eval_every,
                         checkpoint_every=args.checkpoint_every, seed=args.seed, out=args.out, amp=not args.no_amp,
                         backend=args.backend, device=args.device, workers=args.workers)
    train(config, resume=args.resume)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from moe_restore.data.sources import evaluation_set
    from moe_restore.train.evaluate import comparison_table, evaluate, markdown_table, write_results
    from moe_restore.train.inference import load_model

    by_name = {}
    for index, checkpoint in enumerate(args.checkpoint):
        model, run = load_model(checkpoint, device=args.device or _default_device(), backend=args.backend,
                                sample_steps=args.sample_steps)
        tasks = args.tasks or tuple(run["tasks"])
        results = evaluate(model, evaluation_set(args.data, tasks), tile=args.tile)
        out = Path(args.out) if len(args.checkpoint) == 1 else Path(args.out) / f"{index}-{run['model']}"
        json_path, md_path = write_results(results, out)
        print(f"{checkpoint} ({run['model']}):\n" + markdown_table(results), end="")
        print(f"written: {json_path}, {md_path}")
        by_name[f"{run['model']} ({Path(checkpoint).parent.name or checkpoint})"] = results
    if len(by_name) > 1:
        print("\nside by side (PSNR dB / SSIM):\n" + comparison_table(by_name), end="")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from moe_restore.data.image_io import read_image, write_image
    from moe_restore.train.inference import load_model, restore_image

    model, _ = load_model(args.checkpoint, device=args.device or _default_device(), backend=args.backend,
                          sample_steps=args.sample_steps)
    out = Path(args.out)
    for source in map(Path, args.inputs):
        target = out / (source.stem + (f".{args.format}" if args.format else source.suffix.lower()))
        if target.suffix not in (".png", ".jpg", ".jpeg"):
            target = target.with_suffix(".png")
        write_image(target, restore_image(model, read_image(source), tile=args.tile, overlap=args.overlap))
        print(f"{source} -> {target}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from moe_restore.train.demo import run_demo, tasks_not_beating_identity
    from moe_restore.train.evaluate import markdown_table

    results = run_demo(args.out, model=args.model, steps=args.steps)
    print(markdown_table(results), end="")
    print(f"written: {args.out}/grid.png, {args.out}/results.md, {args.out}/results.json")
    behind = tasks_not_beating_identity(results)
    if behind:
        print(f"the model does not beat the identity baseline on: {', '.join(behind)}", file=sys.stderr)
        return 1
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample-steps", type=int, default=None,
                        help="sampling steps of a MiM-DiT checkpoint (default: its own, 8); M2IR ignores it")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--backend", choices=("triton", "torch"), default=None,
                        help="kernel backend (default: Triton on CUDA, torch on the CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-restore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="time the kernels against eager PyTorch (GPU for kernel speeds)")
    bench.add_argument("suites", nargs="*", metavar="SUITE",
                       help=f"which suites to run, of {', '.join(BENCH_SUITES)} (default: all)")
    bench.add_argument("--quick", action="store_true", help="small shapes only")
    bench.set_defaults(run=_bench)

    demo = commands.add_parser("demo", help="train a tiny restorer on the built-in images, evaluate, write demo_out/")
    demo.add_argument("--model", default="m2ir-tiny", choices=("m2ir-tiny", "mim-dit-tiny"))
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's fixed budget)")
    demo.set_defaults(run=_demo)

    train = commands.add_parser("train", help="train a restorer (under torchrun: DistributedDataParallel)")
    train.add_argument("--model", default="m2ir-tiny", help="configuration name, e.g. m2ir-tiny, m2ir-base")
    train.add_argument("--data", default="builtin", help="'builtin' or a folder (see moe_restore.data.sources)")
    train.add_argument("--tasks", type=_tasks, default=_tasks(DEFAULT_TASKS),
                       help=f"comma-separated degradations, composites with '+' (default: {DEFAULT_TASKS})")
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--batch", type=int, default=8, help="images per step and process")
    train.add_argument("--patch", type=int, default=64, help="training crop size (a multiple of 8)")
    train.add_argument("--lr", type=float, default=2e-4)
    train.add_argument("--eval-every", type=int, default=500, help="steps between evaluations (0: none)")
    train.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, help="run folder (checkpoint.pt, log.jsonl, evaluations)")
    train.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    train.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast on CUDA")
    train.add_argument("--workers", type=int, default=0, help="data-loading processes")
    _add_runtime_options(train)
    train.set_defaults(run=_train)

    evaluation = commands.add_parser("eval", help="PSNR/SSIM per task beside the identity baseline")
    evaluation.add_argument("--checkpoint", required=True, nargs="+",
                            help="one checkpoint, or several to compare side by side (e.g. M2IR and MiM-DiT)")
    evaluation.add_argument("--data", default="builtin", help="'builtin' or a folder")
    evaluation.add_argument("--tasks", type=_tasks, default=None, help="default: the checkpoint's tasks")
    evaluation.add_argument("--out", default="eval_out", help="folder for results.json and results.md")
    evaluation.add_argument("--tile", type=int, default=256, help="tile size for large images")
    _add_runtime_options(evaluation)
    evaluation.set_defaults(run=_eval)

    from moe_restore.kernels import compile_check

    check = commands.add_parser("compile-check", help="compile every Triton kernel for sm_90a/sm_80 (no GPU needed)")
    compile_check.add_arguments(check)
    check.set_defaults(run=compile_check.run_from_args)

    restore = commands.add_parser("restore", help="restore images of any size (PNG/JPEG in and out)")
    restore.add_argument("--checkpoint", required=True)
    restore.add_argument("inputs", nargs="+", metavar="IN", help="input images")
    restore.add_argument("--out", required=True, help="output folder")
    restore.add_argument("--format", choices=("png", "jpg"), default=None, help="default: the input's format")
    restore.add_argument("--tile", type=int, default=256, help="tile size (tiles overlap by --overlap)")
    restore.add_argument("--overlap", type=int, default=32)
    _add_runtime_options(restore)
    restore.set_defaults(run=_restore)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
