"""Results files: results/runs.csv (one row per run) and results/curves.csv (one row per run and epoch).

Both files accumulate across invocations. A row is keyed by ``config_hash`` (a hash of everything
that determines the run); re-running the same run replaces its row. Every write rewrites the
whole file to a temporary name and renames it over the old one, so an interrupted sweep never
leaves a half-written file and never loses a finished run.
"""
from __future__ import annotations

import csv
import math
import os
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from statistics import mean, stdev

from methods import display_order

RUN_COLUMNS = [
    "method", "sketch", "rank", "seed", "trainable_params", "epochs", "best_epoch", "best_val_loss",
    "test_acc_b", "test_acc_a", "merges", "wall_s", "config_hash", "settings_hash", "git_commit", "device",
    "scaling", "lora_alpha", "random_init", "merge_every", "reset_optimizer_on_merge", "lr", "weight_decay",
    "batch_size", "max_epochs", "patience", "finished_at", "config",
]
CURVE_COLUMNS = ["config_hash", "method", "sketch", "rank", "seed", "epoch", "train_loss", "val_loss",
                 "val_acc", "test_acc_b", "merged"]
_INT = {"rank", "seed", "trainable_params", "epochs", "best_epoch", "merges", "epoch", "merge_every",
        "batch_size", "max_epochs", "patience", "optimizer_state"}
_FLOAT = {"best_val_loss", "test_acc_b", "test_acc_a", "wall_s", "train_loss", "val_loss", "val_acc",
          "test_acc", "final_test_acc", "best_test_acc",
          "lora_alpha", "lr", "weight_decay"}


class ResultsError(RuntimeError):
    """A results file that cannot be read back; the message says which and what to do."""


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a results CSV with numbers parsed; [] if the file does not exist. Empty cells become None."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        with path.open(newline="") as f:
            rows = [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]
        if rows and "config_hash" not in rows[0]:
            raise KeyError("config_hash")
        return rows
    except (ValueError, KeyError, TypeError, csv.Error) as e:
        raise ResultsError(f"results file {path} is unreadable ({type(e).__name__}: {e}); "
                           f"move it aside to start a fresh one") from None


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure delete it.

    The one way this project writes files (CSVs, checkpoints, figures): a reader sees the old file
    or the new one, never half of one, whatever interrupts the write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a normal file's mode
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_rows(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> None:
    """Write ``rows`` to the CSV ``path`` atomically (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def upsert_runs(results_dir: str | os.PathLike, run_rows: list[dict], curve_rows: list[dict], prefix: str = "",
                run_columns: list[str] | None = None, curve_columns: list[str] | None = None) -> None:
    """Add finished runs (replacing earlier rows with the same config_hash) to both CSVs.

    curves.csv is written first: a run is only "finished" once its runs.csv row exists, so an
    interruption between the two writes leaves at worst orphan curves that the re-run replaces.
    """
    results_dir = Path(results_dir)
    keys = {r["config_hash"] for r in run_rows}
    curves_csv, runs_csv = results_dir / f"{prefix}curves.csv", results_dir / f"{prefix}runs.csv"
    curves = [r for r in read_rows(curves_csv) if r["config_hash"] not in keys]
    write_rows(curves_csv, curves + curve_rows, curve_columns or CURVE_COLUMNS)
    runs = [r for r in read_rows(runs_csv) if r["config_hash"] not in keys]
    write_rows(runs_csv, runs + run_rows, run_columns or RUN_COLUMNS)


def git_commit() -> str:
    """HEAD's hash of the code's repository, "+dirty" when it has uncommitted changes; "unknown" outside git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; nan for a single value)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return mean(values), (stdev(values) if len(values) > 1 else math.nan)


def group(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def pct(m: float, s: float) -> str:
    """'87.31 ± 0.42' from fractions; the ± part is '-' when there is a single seed."""
    if math.isnan(m):
        return "-"
    return f"{100 * m:.2f} ± {100 * s:.2f}" if not math.isnan(s) else f"{100 * m:.2f} ± -"


def summary_table(rows: list[dict]) -> str:
    """The end-of-sweep table: one line per (method, sketch, rank), mean ± std over seeds."""
    header = ["method", "sketch", "rank", "trainable", "seeds", "test acc B %", "test acc A %", "epochs",
              "wall s/run"]
    lines = []
    groups = group(rows, ("method", "sketch", "rank"))
    for (method, sketch, rank), rs in sorted(groups.items(), key=lambda kv: (
            display_order(kv[0][0]), kv[0][0], str(kv[0][1]), kv[0][2] or 0)):
        b = mean_std([r["test_acc_b"] for r in rs])
        a = mean_std([r["test_acc_a"] for r in rs])
        lines.append([method, sketch or "-", "-" if rank is None else str(rank), str(rs[0]["trainable_params"]),
                      str(len(rs)), pct(*b), pct(*a), f"{mean(r['epochs'] for r in rs):.1f}",
                      f"{mean(r['wall_s'] for r in rs):.1f}"])
    return format_table(header, lines)


def format_table(header: list[str], lines: list[list[str]]) -> str:
    """Left-aligned columns under a dashed rule, as the end-of-run tables print them."""
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*l) for l in lines]
    return "\n".join(out)


def _parse(key: str, value: str):
    if value == "":
        return None
    if key in _INT:
        return int(value)
    if key in _FLOAT:
        return float(value)
    if key in ("merged", "reset_optimizer_on_merge"):
        return value == "True"
    return value
