"""Results files: results/runs.csv (one row per run) and results/curves.csv (one row per run and epoch).

Both files accumulate across invocations. A row is keyed by ``config_hash`` (a hash of everything
that determines the run); re-running the same run replaces its row. Every write rewrites the
whole file to a temporary name and renames it over the old one, so an interrupted sweep never
leaves a half-written file and never loses a finished run.

Several processes may write one results folder at once (worker pools, two invocations): every
read-modify-write of the two files holds an exclusive lock on ``<results_dir>/.results.lock``
(``filelock``, an OS file lock: released by the kernel when its holder dies, so a killed writer
never leaves the folder locked). runs.csv is the commit record: a run has landed when its row is
there, and readers take only the curve rows of runs that have landed, so a run's row and its curve
rows are seen together or not at all.
"""
from __future__ import annotations

import csv
import math
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from statistics import mean, stdev

from engine.provenance import PROVENANCE_COLUMNS
from raclora.methods import display_order
from raclora.files import atomic_path
from raclora.errors import DIVERGED, ResultsError

# A study declares its columns as {name: type} (str, int, float or bool; sweep.RUN_COLUMNS, ...): the order is the
# files' column order, the types are how read_rows parses them back. Every study's runs rows end with these.
Columns = dict
RECORD_COLUMNS: Columns = {"wall_s": float, "config_hash": str, "settings_hash": str, "git_commit": str,
                           "code_fingerprint": str, "device": str, **PROVENANCE_COLUMNS, "finished_at": str,
                           "config": str}

LOCK_NAME = ".results.lock"
LOCK_TIMEOUT_S = 600  # a write holds the lock for milliseconds; this long means something is wrong


def read_rows(path: str | os.PathLike, columns: Columns) -> list[dict]:
    """Rows of a results CSV, each cell parsed by the type its study declares in ``columns`` (a column the
    declaration does not name stays a string); [] if the file does not exist. Empty cells become None.

    A UTF-8 byte-order mark (a spreadsheet's re-save) is skipped.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [{k: _parse(v, columns.get(k, str)) for k, v in row.items()} for row in csv.DictReader(f)]
        if rows and "config_hash" not in rows[0]:
            raise KeyError("config_hash")
        return rows
    except (ValueError, KeyError, TypeError, csv.Error, UnicodeDecodeError) as e:
        raise ResultsError(f"results file {path} is unreadable ({type(e).__name__}: {e}); "
                           f"move it aside to start a fresh one") from None


def landed_runs(rows: list[dict]) -> list[dict]:
    """The runs of a runs.csv that count as done: each config_hash once (its last row), and only rows
    whose numbers are all finite, or that record a divergence (status "diverged"). A row with a nan
    or inf result that does not say it diverged is not finished: resume trains it again."""
    last = {}
    for r in rows:
        if r.get("status") == DIVERGED or all(_finite(v) for v in r.values()):
            last[r["config_hash"]] = r
    return list(last.values())


def read_runs(path: str | os.PathLike, columns: Columns) -> list[dict]:
    """landed_runs of the runs CSV at ``path``."""
    return landed_runs(read_rows(path, columns))


@contextmanager
def results_lock(results_dir: str | os.PathLike):
    """Hold the folder's exclusive write lock; ResultsError after LOCK_TIMEOUT_S."""
    from filelock import FileLock, Timeout

    Path(results_dir).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(Path(results_dir) / LOCK_NAME), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise ResultsError(f"could not lock {lock.lock_file} in {LOCK_TIMEOUT_S} s: another process is "
                           f"writing this results folder; wait for it or use another --results_dir") from None
    try:
        yield
    finally:
        lock.release()


def read_results(results_dir: str | os.PathLike, prefix: str, run_columns: Columns,
                 curve_columns: Columns) -> tuple[list[dict], list[dict]]:
    """(runs, curves) of a results folder, read under its lock: the runs that landed (landed_runs)
    and the curve rows of exactly those runs."""
    results_dir = Path(results_dir)
    with results_lock(results_dir):
        runs = read_runs(results_dir / f"{prefix}runs.csv", run_columns)
        curves = read_rows(results_dir / f"{prefix}curves.csv", curve_columns)
    keys = {r["config_hash"] for r in runs}
    return runs, [c for c in curves if c["config_hash"] in keys]


def write_rows(path: str | os.PathLike, rows: list[dict], columns) -> None:
    """Write ``rows`` to the CSV ``path`` atomically (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def upsert_runs(results_dir: str | os.PathLike, run_rows: list[dict], curve_rows: list[dict], prefix: str,
                run_columns: Columns, curve_columns: Columns) -> None:
    """Add finished runs (replacing earlier rows with the same config_hash) to both CSVs, under the
    folder's lock, so that concurrent writers never lose each other's rows.

    runs.csv is the commit record (see the module's docstring): a run being replaced first leaves
    runs.csv, then its curve rows are written, then its new runs.csv row; so at every moment a run
    that has a row has exactly its own curve rows, whatever interrupts the writes. Curve rows of
    runs that never landed (a writer killed between the writes) are dropped here.
    """
    results_dir = Path(results_dir)
    keys = {r["config_hash"] for r in run_rows}
    curves_csv, runs_csv = results_dir / f"{prefix}curves.csv", results_dir / f"{prefix}runs.csv"
    with results_lock(results_dir):
        all_runs = read_rows(runs_csv, run_columns)
        runs = [r for r in all_runs if r["config_hash"] not in keys]
        if len(runs) < len(all_runs):  # replacing: take the old rows out before their curves change
            write_rows(runs_csv, runs, run_columns)
        landed = {r["config_hash"] for r in runs}
        curves = [r for r in read_rows(curves_csv, curve_columns) if r["config_hash"] in landed]
        write_rows(curves_csv, curves + curve_rows, curve_columns)
        write_rows(runs_csv, runs + run_rows, run_columns)


def same_code(row: dict, fingerprint: str, any_code: bool) -> bool:
    """Whether a recorded row may stand for a run of the current code: its fingerprint is ``fingerprint``,
    or ``any_code`` (rows from older versions have none)."""
    return any_code or row.get("code_fingerprint") == fingerprint


def mixed_code_note(rows: list[dict]) -> str | None:
    """One line when ``rows`` come from more than one version of the code (code_fingerprint), else None."""
    counts: dict[str, int] = {}
    for r in rows:
        fp = r.get("code_fingerprint") or "none (older rows)"
        counts[fp] = counts.get(fp, 0) + 1
    if len(counts) < 2:
        return None
    parts = ", ".join(f"{fp}: {n} run{'s' if n > 1 else ''}" for fp, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return (f"note: these results combine {len(counts)} versions of the code ({parts}); a run recorded by "
            f"other code is trained again when a command asks for it (unless --resume_any_code true)")


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
    """The end-of-sweep table: one line per (method, sketch, rank), mean ± std over the seeds that
    finished; diverged runs are counted in the seeds column ("2 +1 diverged") and left out of the rest."""
    header = ["method", "sketch", "rank", "trainable", "seeds", "test acc B %", "test acc A %", "epochs",
              "wall s/run"]
    lines = []
    groups = group(rows, ("method", "sketch", "rank"))
    for (method, sketch, rank), rs in sorted(groups.items(), key=lambda kv: (
            display_order(kv[0][0]), kv[0][0], str(kv[0][1]), kv[0][2] or 0)):
        ok, diverged = split_diverged(rs)
        b = mean_std([r["test_acc_b"] for r in ok])
        a = mean_std([r["test_acc_a"] for r in ok])
        lines.append([method, sketch or "-", "-" if rank is None else str(rank), str(rs[0]["trainable_params"]),
                      seeds_cell(ok, diverged), pct(*b), pct(*a),
                      f"{mean(r['epochs'] for r in ok):.1f}" if ok else "-",
                      f"{mean(r['wall_s'] for r in rs):.1f}"])
    return format_table(header, lines)


def split_diverged(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(runs that finished, runs that diverged)."""
    return [r for r in rows if r.get("status") != DIVERGED], [r for r in rows if r.get("status") == DIVERGED]


def seeds_cell(ok: list[dict], diverged: list[dict]) -> str:
    """How many seeds a table row averages, and how many diverged and are left out: "3" or "2 +1 diverged"."""
    return f"{len(ok)}" + (f" +{len(diverged)} diverged" if diverged else "")


def format_table(header: list[str], lines: list[list[str]]) -> str:
    """Left-aligned columns under a dashed rule, as the end-of-run tables print them."""
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*l) for l in lines]
    return "\n".join(out)


def _finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _parse(value: str, kind: type):
    if value == "":
        return None
    if kind is bool:
        return value == "True"
    return kind(value)
