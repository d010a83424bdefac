"""``hippo report RUN_DIR``: write the run's HTML report and Markdown summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from hippocrates.errors import HippoError
from hippocrates.eval.calibration import DEFAULT_BINS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a recipe's output_dir (e.g. runs/demo)")
    parser.add_argument(
        "--output", type=Path, default=None, help="where to write report.html/.md (default RUN_DIR/report)"
    )
    parser.add_argument(
        "--bins", type=int, default=DEFAULT_BINS, help=f"calibration bins (default {DEFAULT_BINS})"
    )


def run(args: argparse.Namespace) -> int:
    from hippocrates.data.io import check_writable
    from hippocrates.lock import hold
    from hippocrates.report.build import build_report

    if args.bins < 1:
        raise HippoError(f"--bins must be >= 1, got {args.bins}")
    if not args.run_dir.is_dir():
        raise HippoError(f"{args.run_dir}: run directory not found")
    out = args.output if args.output is not None else args.run_dir / "report"
    check_writable(out)
    with hold(args.run_dir):
        path = build_report(args.run_dir, args.output, n_bins=args.bins)
    print(path)
    print(path.with_name("report.md"))
    return 0
