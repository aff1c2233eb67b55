#!/usr/bin/env python
"""Regenerate the paper's tables (and the per-family tables and plots) from result records.

    python evaluate/report.py                                  # records under results/ -> results/tables/
    python evaluate/report.py --records /tmp/myresults --runs runs/

Exit codes: 0 done; 2 a mistake in the command (one sentence says which); 1 a bug.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cli import run_cli  # noqa: E402
from results.report import main  # noqa: E402


def cli(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
