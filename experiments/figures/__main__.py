"""python -m experiments.figures --figure=NAME|all --workdir=DIR [--quick] [--checkpoint_dir=RUN]
[--thumbnails=docs/figures] | --list

Writes DIR/NAME.png and DIR/NAME.json per figure and prints each figure's checks (measured against
exact). Exit status 0 when every check passed, 1 when one failed, 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments.figures import FIGURES, FigureContext, run_figure
from experiments.figures.base import write_thumbnail


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m experiments.figures",
        description="The source texts' worked examples as figures with their exact checks.",
    )
    parser.add_argument("--figure", help="a figure name (see --list) or 'all'")
    parser.add_argument("--workdir", help="directory for NAME.png and NAME.json")
    parser.add_argument("--list", action="store_true", help="list the figures and exit")
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds per figure)")
    parser.add_argument("--seed", type=int, default=0, help="root PRNG seed (default 0)")
    parser.add_argument(
        "--thumbnails",
        default=None,
        help="also write a small copy of each figure to THUMBNAILS/NAME.png (e.g. docs/figures)",
    )
    parser.add_argument(
        "--checkpoint_dir",
        default=None,
        help="working directory of a trained run (experiments.run) for the figures that use one",
    )
    return parser


def _format_check(check: dict) -> str:
    status = "ok  " if check["passed"] else "FAIL"
    if "upper" in check:
        return f"  {status} {check['quantity']}: {check['measured']:.4g} <= {check['upper']:.4g}"
    relative = " (relative)" if check.get("relative") else ""
    return (
        f"  {status} {check['quantity']}: {check['measured']:.6g} vs exact {check['exact']:.6g}"
        f" (tolerance {check['tolerance']:.2g}{relative})"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        width = max(len(name) for name in FIGURES)
        for name, figure in FIGURES.items():
            print(f"{name:<{width}}  {figure.description}")
        return 0
    if args.figure is None or args.workdir is None:
        print("error: --figure and --workdir are required (or --list)", file=sys.stderr)
        return 2
    if args.figure != "all" and args.figure not in FIGURES:
        print(
            f"error: unknown figure {args.figure!r}; known: all, {', '.join(FIGURES)}",
            file=sys.stderr,
        )
        return 2
    if args.checkpoint_dir is not None and not os.path.isdir(args.checkpoint_dir):
        print(
            f"error: --checkpoint_dir={args.checkpoint_dir!r} is not a directory", file=sys.stderr
        )
        return 2
    names = list(FIGURES) if args.figure == "all" else [args.figure]
    context = FigureContext(
        workdir=args.workdir, quick=args.quick, seed=args.seed, checkpoint_dir=args.checkpoint_dir
    )
    failed = []
    for name in names:
        try:
            record = run_figure(FIGURES[name], context)
        except (ValueError, FileNotFoundError) as error:
            print(f"error: figure {name!r}: {error}", file=sys.stderr)
            return 2
        if args.thumbnails is not None:
            write_thumbnail(record["png"], os.path.join(args.thumbnails, f"{name}.png"))
        checks = record.get("checks", [])
        passed = sum(check["passed"] for check in checks)
        print(
            f"{name}: {passed}/{len(checks)} checks passed in {record['seconds']:.1f} s -> "
            f"{record['png']}"
        )
        for check in checks:
            print(_format_check(check))
        for item in record.get("measurements", []):
            value = item["value"]
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            print(f"  --   {item['quantity']}: {shown}")
        if passed < len(checks):
            failed.append(name)
    if failed:
        print(f"checks failed in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
