"""RAC-LoRA MNIST suite: `python main.py [--field value ...]` (see `python main.py --help`).

Trains the base MLP on digits 0-4 (cached), the full fine-tuning reference on digits 5-9, and the
chosen adapter method over ranks and seeds; writes results/runs.csv, results/curves.csv and the
plots in plots/, and prints a summary table.
"""
from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from cli import run_command
    from config import from_argv

    return run_command(lambda: from_argv(argv), run, lambda cfg: Path(cfg.results_dir) / "runs.csv")


def run(cfg) -> None:
    """Train what the config asks for (unless --plots-only), print the table, draw the figures."""
    from config import METHODS, settings_hash
    from data import DataError
    from plots import draw_all
    from results import git_commit, mixed_code_note, read_results, summary_table
    from runner import resolve_device
    from sweep import run_sweep

    runs_csv = Path(cfg.results_dir) / "runs.csv"
    sweep_rows = None if cfg.plots_only else run_sweep(cfg, git_commit())
    # The plots show every run recorded under the current settings (earlier sweeps of other
    # methods included), so comparisons accumulate; the table shows this sweep's runs.
    device = resolve_device(cfg.device).type
    wanted = {settings_hash(cfg, device, k, m) for k in ("base", "fpft", "adapter") for m in (None, *METHODS)}
    runs, curves = read_results(cfg.results_dir)
    plot_rows = [r for r in runs if r["settings_hash"] in wanted]
    if not plot_rows:
        raise DataError(f"no runs in {runs_csv} were made with these settings; run the sweep first, "
                        f"or give --plots-only the same overrides the sweep was run with")
    print()
    print(summary_table(sweep_rows if sweep_rows is not None else plot_rows))
    note = mixed_code_note(plot_rows)  # the plots draw every run recorded under these settings
    if note:
        print(note)
    for path in draw_all(plot_rows, curves, cfg.plots_dir):
        print(f"wrote {path}")
    print(f"results in {runs_csv} and {Path(cfg.results_dir) / 'curves.csv'}")


if __name__ == "__main__":
    sys.exit(main())
