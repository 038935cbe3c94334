"""What main.py and scratch.py share as command lines: one-line errors, exit codes, Ctrl-C."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable


def run_command(parse: Callable[[], object], body: Callable[[object], None], runs_csv: Callable[[object], Path]) -> int:
    """``cfg = parse()``, then ``body(cfg)``; returns the exit status.

    A bad setting, missing or corrupt data, an unreadable checkpoint or results file: "error: ..."
    on one line, exit 2. Ctrl-C: say where the finished runs are kept, exit 130. The heavy modules
    are imported only after parsing, so that --help and bad options answer at once.
    """
    from config import ConfigError

    try:
        cfg = parse()
    except ConfigError as e:
        return fail(e)

    from data import DataError
    from results import ResultsError
    from sweep import CheckpointError

    try:
        body(cfg)
    except (ConfigError, DataError, CheckpointError, ResultsError) as e:
        return fail(e)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are kept in {runs_csv(cfg)}; "
              f"run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    return 0


def fail(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2
