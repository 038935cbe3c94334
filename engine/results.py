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
import hashlib
import math
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from statistics import mean, stdev

from methods import display_order

RUN_COLUMNS = [
    "method", "sketch", "rank", "seed", "status", "trainable_params", "epochs", "best_epoch", "best_val_loss",
    "test_acc_b", "test_acc_a", "merges", "diverged_step", "wall_s", "config_hash", "settings_hash", "git_commit",
    "code_fingerprint", "device",
    "scaling", "lora_alpha", "random_init", "merge_every", "reset_optimizer_on_merge", "lr", "weight_decay",
    "batch_size", "max_epochs", "patience", "finished_at", "config",
]
CURVE_COLUMNS = ["config_hash", "method", "sketch", "rank", "seed", "epoch", "train_loss", "val_loss",
                 "val_acc", "test_acc_b", "merged"]
_INT = {"rank", "seed", "trainable_params", "epochs", "best_epoch", "merges", "epoch", "merge_every", "diverged_step",
        "batch_size", "max_epochs", "patience", "optimizer_state",
        "clients", "rounds", "local_epochs", "up_numbers", "down_numbers", "rounds_to_target", "round", "participants",
        "train_examples", "dev_examples"}
_FLOAT = {"best_val_loss", "test_acc_b", "test_acc_a", "wall_s", "train_loss", "val_loss", "val_acc",
          "test_acc", "final_test_acc", "best_test_acc",
          "lora_alpha", "lr", "weight_decay",
          "dirichlet_alpha", "participation", "final_test_acc_b", "final_test_acc_a", "best_test_acc_b",
          "target_accuracy", "mb_to_target", "total_mb", "max_aggregation_error", "communicated_mb", "aggregation_error",
          "sent_up_numbers", "sent_down_numbers", "final_dev", "best_dev", "dev_loss", "dev_metric"}


class ResultsError(RuntimeError):
    """A results file that cannot be read back; the message says which and what to do."""


DIVERGED = "diverged"  # status of a run whose training loss became non-finite (see train.train)
LOCK_NAME = ".results.lock"
LOCK_TIMEOUT_S = 600  # a write holds the lock for milliseconds; this long means something is wrong


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a results CSV with numbers parsed; [] if the file does not exist. Empty cells become None.

    A UTF-8 byte-order mark (a spreadsheet's re-save) is skipped.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]
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


def read_runs(path: str | os.PathLike) -> list[dict]:
    """landed_runs of the runs CSV at ``path``."""
    return landed_runs(read_rows(path))


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


def read_results(results_dir: str | os.PathLike, prefix: str = "") -> tuple[list[dict], list[dict]]:
    """(runs, curves) of a results folder, read under its lock: the runs that landed (landed_runs)
    and the curve rows of exactly those runs."""
    results_dir = Path(results_dir)
    with results_lock(results_dir):
        runs = read_runs(results_dir / f"{prefix}runs.csv")
        curves = read_rows(results_dir / f"{prefix}curves.csv")
    keys = {r["config_hash"] for r in runs}
    return runs, [c for c in curves if c["config_hash"] in keys]


_TMP = re.compile(r"^.+\.(\d+)\.[A-Za-z0-9_]+\.tmp$")  # <name>.<pid of the writer>.<random>.tmp


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure delete it.

    The one way this project writes files (CSVs, checkpoints, figures): a reader sees the old file
    or the new one, never half of one, whatever interrupts the write. The temporary name carries
    the writer's process id, so that clean_stale_tmp can tell a killed writer's leftover from a
    file another live process is writing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
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


def clean_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writers killed mid-write (SIGKILL, power loss) left in ``folder``:
    those whose writer process no longer exists, and untagged ones (older versions' names). Returns them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for f in folder.glob("*.tmp"):
        m = _TMP.match(f.name)
        if m and _alive(int(m.group(1))):
            continue
        try:
            f.unlink()
            removed.append(f)
        except FileNotFoundError:  # its writer finished and renamed it meanwhile
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # a process we may not signal is alive; an absurd pid is not ours to judge
    return True


_SYSTEM_DIRS = ("/proc", "/sys", "/dev")


def prepare_output_dir(field: str, path: str) -> Path:
    """Check an output folder setting before any compute: not empty, not a system folder, not a file,
    creatable and writable. Creates it; returns it. ConfigError in one line otherwise."""
    from config import ConfigError

    if not str(path).strip():
        raise ConfigError(f"{field} is empty; give a folder to write into, e.g. --{field} ./"
                          f"{'results' if 'results' in field else 'plots'}")
    if "\x00" in str(path):
        raise ConfigError(f"{field} {str(path)!r} holds a NUL byte, which no path may hold")
    p = Path(path).expanduser()
    real = os.path.realpath(p)
    system = next((d for d in _SYSTEM_DIRS if real == d or real.startswith(d + "/")), None)
    if system:
        raise ConfigError(f"{field} {str(path)!r} is under {system}, a system folder; give a folder of your own")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{field} {str(path)!r} is a file, not a folder; give a folder (it is created if missing)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{field} {str(path)!r} cannot be written ({type(e).__name__}: {e.strerror or e}); "
                          f"give a writable folder") from None
    return p


def write_rows(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> None:
    """Write ``rows`` to the CSV ``path`` atomically (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def upsert_runs(results_dir: str | os.PathLike, run_rows: list[dict], curve_rows: list[dict], prefix: str = "",
                run_columns: list[str] | None = None, curve_columns: list[str] | None = None) -> None:
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
    run_columns, curve_columns = run_columns or RUN_COLUMNS, curve_columns or CURVE_COLUMNS
    with results_lock(results_dir):
        all_runs = read_rows(runs_csv)
        runs = [r for r in all_runs if r["config_hash"] not in keys]
        if len(runs) < len(all_runs):  # replacing: take the old rows out before their curves change
            write_rows(runs_csv, runs, run_columns)
        landed = {r["config_hash"] for r in runs}
        curves = [r for r in read_rows(curves_csv) if r["config_hash"] in landed]
        write_rows(curves_csv, curves + curve_rows, curve_columns)
        write_rows(runs_csv, runs + run_rows, run_columns)


def code_fingerprint(modules: list[str]) -> str:
    """First 12 hex digits of the SHA-256 of the source files of ``modules`` (names as imported, e.g.
    "engine.stack"), in the given order: what identifies the code that determines a study's numbers."""
    import importlib.util

    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"no source file for module {name!r}")
        h.update(name.encode() + b"\0" + Path(spec.origin).read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return h.hexdigest()[:12]


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
