"""Results files: results/runs.csv (one row per run) and results/curves.csv (one row per run and epoch).

Both files accumulate across invocations. A row is keyed by ``config_hash`` (a hash of everything
that determines the run); re-running the same run replaces its row. Every write makes the whole
file in memory and writes it to a temporary name renamed over the old one (raclora.files.atomic_write),
so an interrupted sweep never leaves a half-written file and never loses a finished run, and a full
disk is one line that keeps the old file.

Several processes may write one results folder at once (worker pools, two invocations): every
read-modify-write of the two files holds an exclusive lock on ``<results_dir>/.results.lock``
(``filelock``, an OS file lock: released by the kernel when its holder dies, so a killed writer
never leaves the folder locked). runs.csv is the commit record: a run has landed when its row is
there, and readers take only the curve rows of runs that have landed, so a run's row and its curve
rows are seen together or not at all.

Nothing damaged is used as done. Every row the store writes ends with its ``row_check`` (row_check()), and
a row is refused when it is not whole (fewer or more cells than the header, a config that is not JSON, a
cell that does not parse as its declared type, the file ending inside it), when its cells do not match its
row_check, when another row has its config_hash with other cells, or when its run's curve rows are not
exactly its epochs (rounds) 1..n (the study's ``Index`` column). A refused row is said in one line on stderr
(file, line, why), once per process, and its run is not done: resume trains it again and reports leave it
out. The next write moves the refused rows' text, byte for byte, to ``<file>.damaged`` beside the file, so
nothing is lost. A row with an empty row_check (added by hand, or a file from before the check) is read
after the other checks. Only a file none of whose rows can be read (or one without a config_hash column) is
a ResultsError. A text cell that a spreadsheet would run as a formula (=, +, -, @, tab, CR) is written with
a leading ``'``, which the reader takes off again.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from statistics import mean, stdev

from tqdm.auto import tqdm

from engine.provenance import PROVENANCE_COLUMNS
from engine.settings import StudyConfig
from raclora.methods import display_order
from raclora.files import atomic_write
from raclora.errors import DIVERGED, ResultsError, one_line


@dataclass(frozen=True)
class Index:
    """The type of a curves file's index column, declared by the study in its curve columns ("epoch":
    Index("epochs")): an int that counts each run's curve rows 1, 2, ..., n, no gap and none twice, n being the
    run's cell in the runs column ``count`` (the epochs it ran: early stopping and divergence included). A
    study that records a diverged run's count elsewhere names that runs column ``diverged_at``: such a run
    has the rows before it (fed's Index("rounds", "diverged_round"): the rounds before the one it diverged in)."""
    count: str
    diverged_at: str | None = None

    def __call__(self, text: str) -> int:
        return _int(text)


def json_object(text: str) -> str:
    """The type of the runs' config column: the text of a JSON object (one cut or edited short does not parse)."""
    if not isinstance(json.loads(text), dict):
        raise ValueError("not a JSON object")
    return text


# A study declares its columns as {name: type} (str, int, float, bool, or the store's Index and json_object;
# sweep.RUN_COLUMNS, ...): the order is the files' column order, the types are how the store parses them back
# and what a cell must parse as. Every study's runs rows end with these; the store adds CHECK after them.
Columns = dict
RECORD_COLUMNS: Columns = {"wall_s": float, "config_hash": str, "settings_hash": str, "git_commit": str,
                           "code_fingerprint": str, "device": str, **PROVENANCE_COLUMNS, "finished_at": str,
                           "config": json_object}
CHECK = "row_check"  # the store's last column in every file it writes: row_check() of the row's cells

LOCK_NAME = ".results.lock"
LOCK_TIMEOUT_S = 600  # a write holds the lock for milliseconds; this long means something is wrong
SHOWN = 3  # refused rows said one line each per file and read; the rest in one more line
_FORMULA = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet runs as a formula (OWASP, CSV injection)
_LETTERS = str.maketrans("0123456789abcdef", "abcdefghijklmnop")
_CHECK_CELL = re.compile(r"[a-p]{12}")  # what row_check writes
_SAID: set[str] = set()  # the lines said in this process (each is said once)


def row_check(cells, columns) -> str:
    """The check of a row: 12 letters a-p (hex digits as letters, so that no spreadsheet takes it for a
    number or a date) of a SHA-256 over its non-empty cells ((column, text) pairs, CHECK left out), sorted by
    column and each in canonical form by its declared type: a number by its value (1e-08, 1E-08, 0.00000001
    and 1.0000e-8 are one; 8.33 is not 8.337e-08), True/False in any case, any other text as it is. So a
    spreadsheet's re-save (reformatted numbers, a byte-order mark, CRLF, other quoting, other column order, an
    added empty column) still matches, and a cut or edited cell does not."""
    kinds = _kinds(columns)
    canon = sorted((name, c) for name, text in cells if name != CHECK and (c := _canonical(text, kinds.get(name, str))))
    return hashlib.sha256(json.dumps(canon).encode()).hexdigest()[:12].translate(_LETTERS)


def read_rows(path: str | os.PathLike, columns: Columns) -> list[dict]:
    """The rows of a results CSV that are whole (see the module's docstring), each cell parsed by the type its
    study declares in ``columns`` (a column the declaration does not name stays a string; empty cells become
    None; the CHECK column is left out); [] if the file does not exist. A refused row is said in one line and
    left out; ResultsError if the file has rows and none can be read, or no config_hash column."""
    path = Path(path)
    table = _Table.read(path, columns)
    table.strict()
    _say_refused(path, table.rows, "left out")
    return [r.cells for r in table.rows if r.cells is not None]


def landed_runs(rows: list[dict]) -> list[dict]:
    """The runs of a runs.csv that count as done: each config_hash once (its last row), and only rows
    whose numbers are all finite, or that record a divergence (status "diverged"). A row with a nan
    or inf result that does not say it diverged is not finished: resume trains it again."""
    last = {}
    for r in rows:
        if _done(r):
            last[r["config_hash"]] = r
    return list(last.values())


def read_runs(path: str | os.PathLike, columns: Columns, curve_columns: Columns | None = None) -> list[dict]:
    """The runs of the runs CSV at ``path`` that count as done (landed_runs), none of them refused (see the
    module's docstring); with ``curve_columns``, also read the curves file beside it (``<prefix>curves.csv``,
    under the folder's lock) and leave out every run whose curve rows are not its own. What resume skips."""
    path = Path(path)
    if curve_columns is None:
        store = _Store(path, _Table.read(path, columns), None, None)
    else:
        curves = path.with_name(path.name[:-len("runs.csv")] + "curves.csv")
        with results_lock(path.parent):
            store = _Store(path, _Table.read(path, columns), curves, _Table.read(curves, curve_columns),
                           _index(curve_columns))
    store.say(strict=True)
    return [r.cells for r in store.landed]


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
    """(runs, curves) of a results folder, read under its lock: the runs that landed (landed_runs), none of
    them refused (see the module's docstring), and the curve rows of exactly those runs."""
    with results_lock(results_dir):
        store = _Store.read(results_dir, prefix, run_columns, curve_columns)
    store.say(strict=True)
    keys = {r.key for r in store.landed}
    return [r.cells for r in store.landed], [c.cells for c in store.curves.whole() if c.key in keys]


def write_rows(path: str | os.PathLike, rows: list[dict], columns) -> None:
    """Write ``rows`` to the CSV ``path`` atomically (raclora.files.atomic_write): the columns of ``columns``
    (a declaration, or a list of names: every cell text), then CHECK, each row's row_check. A cell whose text
    a spreadsheet would run as a formula, or that begins with ``'``, gets a leading ``'`` (read_rows takes it off)."""
    kinds = _kinds(columns)
    names = [c for c in kinds if c != CHECK]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=names + [CHECK], extrasaction="ignore")
    w.writeheader()
    for row in rows:
        texts = {k: "" if row.get(k) is None else str(row.get(k)) for k in names}
        w.writerow({**{k: _neutral(t) for k, t in texts.items()}, CHECK: row_check(texts.items(), kinds)})
    atomic_write(path, out.getvalue())


def upsert_runs(results_dir: str | os.PathLike, run_rows: list[dict], curve_rows: list[dict], prefix: str,
                run_columns: Columns, curve_columns: Columns) -> None:
    """Add finished runs (replacing earlier rows with the same config_hash) to both CSVs, under the
    folder's lock, so that concurrent writers never lose each other's rows.

    runs.csv is the commit record (see the module's docstring): a run being replaced first leaves
    runs.csv, then its curve rows are written, then its new runs.csv row; so at every moment a run
    that has a row has exactly its own curve rows, whatever interrupts the writes. Curve rows of
    runs that never landed (a writer killed between the writes) are dropped here. Refused rows (and the
    rows of a refused run) are first added to ``<file>.damaged``, then leave the files; a row repeated
    with the same cells is kept once.
    """
    results_dir = Path(results_dir)
    keys = {r["config_hash"] for r in run_rows}
    with results_lock(results_dir):
        store = _Store.read(results_dir, prefix, run_columns, curve_columns)
        store.say(strict=False)
        runs_csv, curves_csv = store.runs_path, store.curves_path
        refused = [r for r in store.runs.rows if r.why]
        kept = [r for r in store.runs.whole() if r.key not in keys]
        landed = {r.key for r in kept}
        gone = {r.key for r in refused} - landed  # refused runs: their curve rows go with them
        moved_curves = [c for c in store.curves.rows if c.why or (c.cells is not None and c.key in gone)]
        _keep_aside(runs_csv, store.runs, refused)
        _keep_aside(curves_csv, store.curves, moved_curves)
        if len(kept) < len(store.runs.rows):  # replacing (or setting rows aside): out before their curves change
            write_rows(runs_csv, [r.cells for r in kept], run_columns)
        curves = [c.cells for c in store.curves.whole() if c.key in landed]
        write_rows(curves_csv, curves + curve_rows, curve_columns)
        write_rows(runs_csv, [r.cells for r in kept] + run_rows, run_columns)


@dataclass(eq=False)
class _Row:
    """One row of a results file as read: where it starts, its text, its cells; why it is refused, if it is."""
    line: int  # the file's line it starts on (the header is line 1)
    text: str  # its text as in the file, line end included (bytes that are not UTF-8 kept as surrogate escapes)
    key: str | None = None  # its config_hash cell, when it has one (refused rows too)
    cells: dict | None = None  # its cells parsed by their declared types, CHECK left out; None when refused as a row
    why: str | None = None  # why it is refused (as a row, or its run); None when it is not
    hint: str = ""  # what to do about it, when there is something
    repeats: int | None = None  # the line of an earlier row with the same cells: read once


class _Table:
    """The rows of one results file, each judged as a row: whole, parsed, checked (_Table.read)."""

    def __init__(self, path: Path, header: list[str], header_text: str, rows: list[_Row]):
        self.path, self.header, self.header_text, self.rows = path, header, header_text, rows

    @classmethod
    def read(cls, path: Path, columns) -> _Table:
        """The file's rows ([] if it does not exist or is empty); ResultsError only if it cannot be read at all, or
        its first line is not a header with a config_hash column (then it is no results file: never rewritten)."""
        kinds = _kinds(columns)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls(path, [], "", [])
        except OSError as e:
            raise ResultsError(f"results file {path} cannot be read ({e.strerror or type(e).__name__}); "
                               f"check its permissions, or move it aside to start a fresh one") from None
        text = data.removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")
        src, taken = io.StringIO(text, newline=""), []

        def lines():
            for line in src:
                taken.append(line)
                yield line
        reader = csv.reader(lines())
        header, header_text, rows, start = None, "", [], 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # the rest cannot be cut into rows: one refused row, kept whole
                rows.append(_Row(start, "".join(taken) + src.read(), why=f"the file from here on is not CSV ({e})"))
                break
            raw, line, start = "".join(taken), start, reader.line_num + 1
            taken.clear()
            if header is None:
                header, header_text = cells, raw
            elif cells:  # (a blank line holds nothing)
                rows.append((line, raw, cells))
        header = header or []
        if (rows or any(c.strip() for c in header)) and "config_hash" not in header:
            raise ResultsError(f"results file {path} is unreadable (its header has no config_hash column); "
                               f"move it aside to start a fresh one")
        # a header that lost the name of the store's last column would pass every row unchecked
        renamed = CHECK not in header and any(isinstance(r, tuple) and _CHECK_CELL.fullmatch(r[2][-1]) for r in rows)
        judged = []
        for r in rows:
            if isinstance(r, tuple):
                r = (_Row(*r[:2], why=f"the header names no {CHECK} column, yet the rows end with one (a damaged "
                                      f"header?)", hint=f"name the header's last column {CHECK}") if renamed else
                     _judge_row(*r, header, kinds))
            judged.append(r)
        return cls(path, header, header_text, judged)

    def whole(self) -> list[_Row]:
        """The rows that are not refused, each once."""
        return [r for r in self.rows if r.cells is not None and r.why is None and r.repeats is None]

    def strict(self) -> None:
        """ResultsError if the file has rows and none of them can be read (not a results file, or its header
        damaged): in one line, with the first row's reason."""
        if self.rows and all(r.cells is None for r in self.rows):
            first = self.rows[0]
            raise ResultsError(one_line(f"results file {self.path} is unreadable: none of its {len(self.rows)} "
                                        f"rows can be read (line {first.line}: {first.why}); move it aside to "
                                        f"start a fresh one"))


class _Store:
    """A results folder's runs and curves files as read, every run judged: a runs row is refused when another
    row has its config_hash with other cells, or when its curve rows are not those its Index column says."""

    def __init__(self, runs_path: Path, runs: _Table, curves_path: Path | None, curves: _Table | None,
                 index: tuple[str, Index] | None = None):
        self.runs_path, self.runs, self.curves_path = runs_path, runs, curves_path
        self.curves = curves if curves is not None else _Table(curves_path, [], "", [])
        _same_key(self.runs.rows, lambda r: r.key,
                  lambda o, r: f"line {o.line} has its config_hash {r.key} with other cells (two results for one run)")
        done = [r for r in self.runs.whole() if _done(r.cells)]
        if curves is not None and index is not None:
            self._judge_curves(done, *index)
        self.landed = [r for r in done if r.why is None]

    def _judge_curves(self, done: list[_Row], name: str, idx: Index) -> None:
        """Refuse each run of ``done`` whose curve rows are not exactly what its Index column says (``name``:
        the curves' index column): two different rows for one index, a gap, too few or too many."""
        curves_path = self.curves_path
        for c in self.curves.rows:
            if c.cells is not None and c.cells.get(name) is None:
                c.cells, c.why = None, f"its {name} cell is empty"
        clashes = _same_key(self.curves.rows, lambda c: (c.key, c.cells[name]), None)
        seen: dict[str, list[int]] = {}
        for c in self.curves.rows:
            if c.cells is not None and c.repeats is None:
                seen.setdefault(c.key, []).append(c.cells[name])
        for r in done:
            if r.key in clashes:
                (_, i), a, b = clashes[r.key]
                r.why = f"its curves in {curves_path} have two different rows for {name} {i} (lines {a}, {b})"
                continue
            got, (n, why) = sorted(seen.get(r.key, [])), _expected(r.cells, idx)
            if got != list(range(1, (len(got) if n is None else n) + 1)):
                want = f"{name} 1-{len(got)} with no gap" if n is None else \
                    f"{f'{name} 1-{n}' if n else 'none'} ({why})"
                r.why = (f"its curve rows in {curves_path} are {name} {_spans(got)}" if got else
                         f"it has no curve rows in {curves_path}") + f", not {want}; rows cut, dropped or added?"

    @classmethod
    def read(cls, results_dir, prefix: str, run_columns: Columns, curve_columns: Columns) -> _Store:
        """Both files of ``results_dir`` (the caller holds its lock)."""
        results_dir = Path(results_dir)
        runs_csv, curves_csv = results_dir / f"{prefix}runs.csv", results_dir / f"{prefix}curves.csv"
        return cls(runs_csv, _Table.read(runs_csv, run_columns), curves_csv, _Table.read(curves_csv, curve_columns),
                   _index(curve_columns))

    def say(self, strict: bool) -> None:
        """Say every refused row in one line (once per process); ``strict``: first, ResultsError if a file has
        rows and none can be read."""
        if strict:
            self.runs.strict()
            self.curves.strict()
        _say_refused(self.runs_path, self.runs.rows, "not counted as done, so a resume trains the run again")
        _say_refused(self.curves_path, self.curves.rows, "left out")


def _judge_row(line: int, raw: str, cells: list[str], header: list[str], kinds: dict) -> _Row:
    """The row of ``cells`` (its text ``raw``, from ``line``) parsed and checked: refused (``why``) when its
    text is not UTF-8 or holds a NUL, it has another number of cells than the header, a cell does not parse
    as its type, its cells do not match its row_check, or, without a row_check, it is the file's last row and
    has no line end."""
    texts = [(name, c[1:] if c.startswith("'") else c) for name, c in zip(header, cells)]  # the formula guard off
    named = dict(texts)
    row = _Row(line, raw, key=named.get("config_hash") or None)
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        row.why = "it holds bytes that are not UTF-8 text"
        return row
    if "\x00" in raw:
        row.why = "it holds a NUL byte"
    elif len(cells) < len(header):
        row.why = f"it has {len(cells)} of the header's {len(header)} cells (cut?)"
    elif len(cells) > len(header):
        row.why = f"it has {len(cells)} cells, the header {len(header)} (a stray comma or quote?)"
    elif not row.key:
        row.why = "its config_hash cell is empty"
    if row.why:
        return row
    parsed = {}
    for name, text in named.items():
        if name != CHECK:
            kind = kinds.get(name, str)
            try:
                parsed[name] = _parse(text, kind)
            except (ValueError, TypeError, ArithmeticError, RecursionError):
                row.why = f"its {name} cell {_short(text)} is not {_kind_name(kind)}"
                return row
    check = named.get(CHECK, "")
    if check and check != row_check(texts, kinds):
        row.why, row.hint = (f"its cells do not match its {CHECK} (cut or edited)",
                             f"to keep a hand edit, clear its {CHECK} cell")
    elif not check and not raw.endswith(("\n", "\r")):
        row.why, row.hint = ("the file ends inside it, with no line end (cut?)",
                             "if it is whole, end the file with a line break")
    else:
        row.cells = parsed
    return row


def _same_key(rows: list[_Row], key, conflict) -> dict:
    """Mark rows whose ``key(row)`` an earlier whole row has: with the same cells, a repeat (read once); with
    other cells, both refused (``conflict(other, row)`` says why ``row`` is; None: neither, only returned).
    Returns {config_hash: (key, earlier line, later line)} of the conflicts."""
    first, clashes = {}, {}
    for r in rows:
        if r.cells is None:
            continue
        k = key(r)
        o = first.setdefault(k, r)
        if o is r:
            continue
        if o.cells == r.cells:
            r.repeats = o.line
            continue
        clashes.setdefault(r.key, (k, o.line, r.line))
        if conflict is not None:
            r.why = r.why or conflict(o, r)
            o.why = o.why or conflict(r, o)
    return clashes


def _expected(cells: dict, idx: Index) -> tuple[int | None, str]:
    """(how many curve rows the run of ``cells`` has by its Index, None when its row does not say (older rows);
    what says it)."""
    if cells.get("status") == DIVERGED and idx.diverged_at and isinstance(cells.get(idx.diverged_at), int):
        return cells[idx.diverged_at] - 1, f"before its {idx.diverged_at} {cells[idx.diverged_at]}"
    n = cells.get(idx.count)
    return (n if isinstance(n, int) else None), f"its {idx.count} cell"


def _say_refused(path: Path, rows: list[_Row], fate: str) -> None:
    """One line per refused row (SHOWN of them; then one line for the rest), one per repeated row."""
    refused = [r for r in rows if r.why]
    for r in refused[:SHOWN]:
        _say(f"warning: {path} line {r.line}: {r.why}; {fate}" + (f"; {r.hint}" if r.hint else ""))
    if len(refused) > SHOWN:
        _say(f"warning: {path}: {len(refused) - SHOWN} more rows refused likewise "
             f"({_lines(refused[SHOWN:])}); {fate}")
    repeats = [r for r in rows if r.repeats]
    for r in repeats[:SHOWN]:
        _say(f"warning: {path} line {r.line} repeats line {r.repeats} (the same row twice); read once")
    if len(repeats) > SHOWN:
        _say(f"warning: {path}: {len(repeats) - SHOWN} more rows repeat an earlier one ({_lines(repeats[SHOWN:])}); "
             f"read once")


def _keep_aside(path: Path, table: _Table, rows: list[_Row]) -> None:
    """Add the text of ``rows`` (refused rows of the file at ``path``), byte for byte, to ``<path>.damaged``
    (started with the file's header), and say so in one line."""
    if not rows:
        return
    aside = path.with_name(path.name + ".damaged")
    try:
        before = aside.read_bytes()
    except FileNotFoundError:
        before = _ended(table.header_text).encode("utf-8", "surrogateescape")
    text = "".join(_ended(r.text) for r in rows)
    atomic_write(aside, before + text.encode("utf-8", "surrogateescape"))
    _say(f"warning: {path}: {len(rows)} refused row{'s' if len(rows) > 1 else ''} ({_lines(rows)}) moved to "
         f"{aside}, byte for byte")


def _say(line: str) -> None:
    line = one_line(line)
    if line not in _SAID:
        _SAID.add(line)
        tqdm.write(line, file=sys.stderr)


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


def figure_prefix(results_dir: str | os.PathLike, prefix: str) -> str:
    """The start of the names of the figures drawn from a study's results in ``results_dir``: the study's prefix
    (that of its results files, ``<prefix>runs.csv``: "fed_", "scratch_", "glue_"; main.py's is ""), then the
    results folder's name unless it is the default's ("results"): ``--results_dir results/table3`` draws
    table3_mlp_rank_vs_accuracy.png, ``scratch.py --results_dir e100`` scratch_e100_mnist_sgd_final.png. Studies that
    share a results folder have distinct prefixes (or their files would clash), so no two studies write one
    figure; nor do two results folders of one study, unless they have the same name."""
    name = Path(results_dir).resolve().name
    default = Path(StudyConfig.__dataclass_fields__["results_dir"].default).name
    return prefix + ("" if name == default else f"{safe_name(name)}_")


def safe_name(text: str) -> str:
    """``text`` as part of a file name: only letters, digits and . _ + - (other runs of characters: one -)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "runs"


def _done(row: dict) -> bool:
    return row.get("status") == DIVERGED or all(_finite(v) for v in row.values())


def _finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _kinds(columns) -> dict:
    """{column: type} of a declaration, or of a list of names (every cell text)."""
    return columns if isinstance(columns, dict) else dict.fromkeys(columns, str)


def _index(columns: Columns) -> tuple[str, Index] | None:
    """(name, Index) of the curve columns' index column, if they declare one."""
    return next(((name, kind) for name, kind in columns.items() if isinstance(kind, Index)), None)


def _parse(text: str, kind):
    """A cell's value by its declared type; None for an empty cell; ValueError (or ArithmeticError) if it does
    not parse as one."""
    if text == "":
        return None
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(text)
        return text.lower() == "true"
    if kind is int:
        return _int(text)
    return text if kind is str else kind(text)


def _int(text: str) -> int:
    """An int, also as a spreadsheet may write it (3.0, 3E0)."""
    try:
        return int(text)
    except ValueError:
        d = Decimal(text)
        if not d.is_finite() or d != d.to_integral_value() or abs(d.adjusted()) > 30:
            raise ValueError(text) from None
        return int(d)


def _canonical(text: str, kind) -> str:
    """A cell's text in the form row_check hashes: numbers by value, True/False in lower case, the rest as it is."""
    if kind in (int, float) or isinstance(kind, Index):
        try:
            d = Decimal(text)
            if d.is_nan():
                return "nan"
            if d.is_infinite():
                return "-inf" if d < 0 else "inf"
            return "0" if d.is_zero() else str(d.normalize())
        except ArithmeticError:  # not a number (the row is refused for it)
            return text
    if kind is bool and text.lower() in ("true", "false"):
        return text.lower()
    return text


def _neutral(text: str) -> str:
    """A cell's text as written: with a leading ' if a spreadsheet would run it as a formula (it begins with
    =, +, -, @, tab or CR and is not a number) or it begins with ' (the reader takes one ' off)."""
    if text.startswith("'") or (text.startswith(_FORMULA) and not _number(text)):
        return "'" + text
    return text


def _number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _kind_name(kind) -> str:
    if kind is bool:
        return "True or False"
    if kind is int or isinstance(kind, Index):
        return "a whole number"
    if kind is float:
        return "a number"
    return "a JSON object (cut or edited?)" if kind is json_object else f"a {getattr(kind, '__name__', 'value')}"


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _spans(values: list[int]) -> str:
    """1-3, 5, 7-9."""
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(f"{values[i]}" if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(out)


def _lines(rows: list[_Row], shown: int = 10) -> str:
    """"line 4" or "lines 4, 9, 12, ..."."""
    lines = [str(r.line) for r in rows[:shown]] + (["..."] if len(rows) > shown else [])
    return f"line{'s' if len(rows) > 1 else ''} {', '.join(lines)}"


def _ended(text: str) -> str:
    return text if text.endswith(("\n", "\r")) else text + "\r\n"
