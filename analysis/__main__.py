"""python -m analysis DIR: regenerate every figure of a study from its Parquet records."""
from __future__ import annotations

import argparse
import sys

from .report import make_figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis",
                                 description="Write the thesis's and the study's figures (PNG + PDF) and an "
                                             "index.html report into DIR/figures/, from DIR's Parquet tables only.")
    ap.add_argument("study_dir", help="the study folder a launch wrote (e.g. runs/quickstart)")
    args = ap.parse_args(argv)
    try:
        figs, report, missing = make_figures(args.study_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(figs.written)} figures (PNG + PDF) and {report}")
    for tid, status, err in missing:
        print(f"  incomplete trial {tid}: {status}{' — ' + err if err else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
