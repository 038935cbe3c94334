"""Experiment tracking: every recorded run as a TensorBoard run (``--report_to tensorboard``).

The runner calls this where it records finished runs (runner.record_results) and, before training, for the runs
already recorded (runner.run_study), so every study that records through the runner (main.py, federated.py,
scratch.py, glue.py) is tracked the same way, from the very rows it writes to its CSVs: one TensorBoard run per
config hash in ``<results_dir>/tensorboard/<study>/<config_hash>/``, beside the CSVs (``<study>``: the CSVs'
prefix, ``main`` for main.py's runs.csv). A stack is recorded one row per run, so each run of a stack is a run of
its own here. ``tensorboard --logdir <results_dir>/tensorboard`` shows them.

A run holds
- its curves: each numeric column of its curve rows after the index column (a study declares its curve columns
  as what names the run, then the index, then what was measured), one scalar per column, tagged by the column's
  name, the epoch (round) as the step (a bool, ``merged``, as 0 or 1; an empty cell is left out);
- its final metrics: its numeric runs columns that are neither settings nor the record's own (RECORD_COLUMNS;
  ``wall_s`` is kept), each as the scalar ``final/<column>`` at the run's last step;
- its settings, as the HParams dashboard's hyperparameters (runs compared and filtered by them, the final metrics
  as the columns): the fields of its config (a list as its JSON text) and what names the run (the curve columns
  before the index: method, sketch, rank, seed, ...).

Nothing is half-written and no run is there twice, whoever writes: a run is written into a temporary folder of the
results folder, then renamed into place under the results folder's lock (results.results_lock), replacing an
earlier recording of its config hash. ``run.json`` in it says which recording it holds (finished_at and the code
fingerprint), so a run recorded again is replaced and a run already tracked is skipped (a resumed sweep adds
nothing). A killed writer's temporary folder is removed by the next command (raclora.files.clean_stale_tmp).
Importing this module imports no tensorboard: ``report_to="tensorboard"`` does, when it first writes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from engine.results import RECORD_COLUMNS, Columns, Index, read_results, results_lock
from raclora.errors import ConfigError
from raclora.files import atomic_write, write_error

FOLDER = "tensorboard"  # <results_dir>/tensorboard/<study>/<config_hash>/
MARK = "run.json"  # in a run's folder: which recording of the run its events are (_recording)
NUMERIC = (int, float, bool)  # the column types that become scalars
FINAL = "final/"  # the tag prefix of a run's final metrics


def require(report_to: str) -> None:
    """ConfigError in one line when ``report_to`` needs a package that is not installed; a command calls it before
    any compute (engine.cli.run_command)."""
    if report_to == "tensorboard":
        _summary_writer()


def study_folder(results_dir, prefix: str) -> Path:
    """``<results_dir>/tensorboard/<study>``: the folder of a study's runs (prefix "fed_" -> fed, "" -> main)."""
    return Path(results_dir) / FOLDER / (prefix.rstrip("_") or "main")


def track(results_dir, prefix: str, results: list[tuple[dict, list[dict]]], run_columns: Columns,
          curve_columns: Columns, report_to: str) -> None:
    """Each finished run of ``results`` ((runs row, its curve rows), as recorded) as its TensorBoard run, replacing
    an earlier recording of its config hash. Nothing with ``report_to`` "none"."""
    if report_to == "none":
        return
    for row, curves in results:
        write_run(results_dir, prefix, row, curves, run_columns, curve_columns)


def catch_up(results_dir, prefix: str, run_columns: Columns, curve_columns: Columns, report_to: str) -> int:
    """Track every run of the results folder's CSVs whose events are not there or are of another recording of it
    (recorded before --report_to was given, or by a writer stopped between its rows and its events); returns how
    many were written. Nothing with ``report_to`` "none"."""
    if report_to == "none":
        return 0
    runs, curves = read_results(results_dir, prefix, run_columns, curve_columns)
    by_run: dict[str, list[dict]] = {}
    for c in curves:
        by_run.setdefault(c["config_hash"], []).append(c)
    folder = study_folder(results_dir, prefix)
    todo = [r for r in runs if _mark(folder / r["config_hash"]) != _recording(r)]
    for row in todo:
        write_run(results_dir, prefix, row, by_run.get(row["config_hash"], []), run_columns, curve_columns)
    return len(todo)


def write_run(results_dir, prefix: str, row: dict, curves: list[dict], run_columns: Columns,
              curve_columns: Columns) -> Path:
    """Write one run's events into a temporary folder, then put it in place of the run's folder (see the module's
    docstring); returns the run's folder. OutputError in one line when the disk refuses."""
    writer = _summary_writer()
    from torch.utils.tensorboard.summary import hparams  # with the writer: tensorboard is imported by then

    results_dir = Path(results_dir)
    key = row["config_hash"]
    final = study_folder(results_dir, prefix) / key
    names, index, measured = curve_parts(curve_columns)
    settings = run_settings(row, names)
    metrics = final_metrics(row, run_columns, settings)
    steps = sorted(curves, key=lambda c: c[index]) if index else []
    last = steps[-1][index] if steps else 0
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.{key}.{os.getpid()}.", suffix=".tmp", dir=results_dir))
    try:
        with writer(log_dir=str(tmp)) as w:
            for c in steps:
                for name in measured:
                    if c.get(name) is not None:
                        w.add_scalar(name, float(c[name]), c[index])
            for summary in hparams(settings, metrics):
                w.file_writer.add_summary(summary, last)
            for tag, value in metrics.items():
                w.add_scalar(tag, value, last)
        atomic_write(tmp / MARK, json.dumps(_recording(row), sort_keys=True))
        _put_in_place(results_dir, tmp, final, _recording(row))
    except OSError as e:
        raise write_error(final, e, None) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was put in place
    return final


def curve_parts(curve_columns: Columns) -> tuple[list[str], str | None, list[str]]:
    """(the columns that name a run, the index column, the numeric columns measured) of a study's curve columns:
    those before the index (config_hash left out), the index, the numeric ones after it."""
    names = list(curve_columns)
    at = next((i for i, kind in enumerate(curve_columns.values()) if isinstance(kind, Index)), None)
    if at is None:
        return [n for n in names if n != "config_hash"], None, []
    return ([n for n in names[:at] if n != "config_hash"], names[at],
            [n for n in names[at + 1:] if curve_columns[n] in NUMERIC])


def run_settings(row: dict, names: list[str]) -> dict:
    """The hyperparameters of a run: its config's fields and what names it (``names``, read from its runs row),
    each a number, a bool, a string or None (lists and objects as their JSON text)."""
    config = json.loads(row["config"]) if row.get("config") else {}
    out = {**config, **{n: row.get(n) for n in names}}
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v for k, v in out.items()}


def final_metrics(row: dict, run_columns: Columns, settings: dict) -> dict[str, float]:
    """{final/<column>: value} of a run's numeric runs columns that are not settings and not the record's own
    (wall_s kept); empty cells left out."""
    return {FINAL + name: float(row[name]) for name, kind in run_columns.items()
            if kind in NUMERIC and name not in settings and (name not in RECORD_COLUMNS or name == "wall_s")
            and row.get(name) is not None}


def _put_in_place(results_dir: Path, tmp: Path, final: Path, recording: dict) -> None:
    """Rename ``tmp`` to ``final`` under the folder's lock; an earlier folder there is moved aside first (and then
    deleted), unless it holds this very recording (another writer was first: ``tmp`` is dropped)."""
    old = None
    with results_lock(results_dir):
        if _mark(final) == recording:
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.{final.name}.{os.getpid()}.", suffix=".tmp",
                                        dir=results_dir))
            os.rename(final, old / final.name)
        os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _recording(row: dict) -> dict:
    """What tells one recording of a run from another: its config hash, when it finished, the code that made it."""
    return {k: row.get(k) for k in ("config_hash", "finished_at", "code_fingerprint")}


def _mark(folder: Path) -> dict | None:
    """The recording a run's folder holds (its MARK), or None when there is none to read."""
    try:
        return json.loads((folder / MARK).read_text())
    except (OSError, ValueError):
        return None


def _summary_writer():
    """torch's SummaryWriter; imported here, not at the top: tensorboard is a heavy optional import that only
    --report_to tensorboard needs. ConfigError in one line when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--report_to tensorboard needs the tensorboard package, which is not installed here; "
                          "pip install tensorboard (it is in requirements.txt), or give --report_to none") from None
    return SummaryWriter
