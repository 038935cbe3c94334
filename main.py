"""RAC-LoRA MNIST suite: `python main.py [--field value ...]` (see `python main.py --help`).

Trains the base MLP on digits 0-4 (cached), the full fine-tuning reference on digits 5-9, and the
chosen adapter method over ranks and seeds; writes results/runs.csv, results/curves.csv and the
plots in plots/, and prints a summary table.
"""
from __future__ import annotations

import sys
from pathlib import Path

from config import from_argv
from engine.cli import run_command
from engine.results import git_commit
from engine.runner import report, resolve_device
from engine.settings import settings_hash
from plots import draw_all
from raclora.methods import METHODS
from sweep import CURVE_COLUMNS, RUN_COLUMNS, run_sweep, summary


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: from_argv(argv), run, lambda cfg: Path(cfg.results_dir) / "runs.csv")


def run(cfg) -> None:
    """Train what the config asks for (unless --plots-only), print the table, draw the figures."""
    sweep_rows = None if cfg.plots_only else run_sweep(cfg, git_commit())
    device = resolve_device(cfg.device).type
    wanted = {settings_hash(cfg, device, kind=k, method=m) for k in ("base", "fpft", "adapter")
              for m in (None, *METHODS)}
    report(cfg, sweep_rows, wanted, summary, draw_all, RUN_COLUMNS, CURVE_COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
