"""The results store never uses a damaged row as done (issue 20, "nothing silently wrong"): files written by the
store with the studies' own rows and column declarations, then damaged as a disk, a killed copy or a hand in a
spreadsheet damages them: cut, emptied, rows dropped or repeated, numbers reformatted or edited, formula cells.
Each damaged row is said in one line (file, line, why), its run is not done, and its text is kept aside."""
from __future__ import annotations

import csv
import io
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sweep
from config import Config, from_argv
from engine.results import CHECK, Index, read_results, read_rows, read_runs, summary_table, upsert_runs, write_rows
from fed import study as fed
from fed.config import FedConfig
from raclora.errors import DIVERGED, ResultsError
from tests.conftest import ROOT
from train import Record

FED = (fed.PREFIX, fed.RUN_COLUMNS, fed.CURVE_COLUMNS)
SWEEP = ("", sweep.RUN_COLUMNS, sweep.CURVE_COLUMNS)


# --- stores written by the store, with the studies' own rows ----------------------------------------
def fed_results(seeds=(0, 1, 2), rounds: int = 3) -> list[tuple[dict, list[dict]]]:
    """fed.study.run_rows of ``len(seeds)`` runs of ``rounds`` rounds (the first one diverged in round 3: two
    rounds recorded), with aggregation errors such as 8.337e-08."""
    cfg = FedConfig(rounds=rounds, clients=4, progress=False)
    out = []
    for seed in seeds:
        spec = dict(method="fed_rac_lora", sketch="left", rank=1, seed=seed)
        records = [dict(round=t, participants=4, train_loss=1.0 / t, test_acc_b=0.5 + 0.1 * t, test_acc_a=0.4,
                        test_loss_b=2.0 / t, test_loss_a=1.5,
                        up_numbers=912, down_numbers=913, aggregation_error=8.337e-08 if t == rounds else 1e-8 * t)
                   for t in range(1, rounds + 1)]
        diverged = 3 if seed == seeds[0] else None
        out.append(fed.run_rows(cfg, "abc123", "cpu", spec, records[:2] if diverged else records, 1.5, 912, diverged))
    return out


SCORE = dict(test_loss_a=0.2, test_acc_a=0.9, test_loss_b=0.1, test_acc_b=0.95, sample=None)  # sweep.scores' keys


def sweep_results(cfg: Config | None = None) -> list[tuple[dict, list[dict]]]:
    """sweep.result_rows of a base run, an FPFT run stopped early (2 of 3 epochs), a lora run of 3 epochs and a
    lora run that diverged in its second epoch (one epoch recorded)."""
    cfg = cfg or Config(max_epochs=3, progress=False)
    out = []
    for spec, epochs, status in ((dict(method="base", sketch=None, rank=None, seed=0), 3, "finished"),
                                 (dict(method="fpft", sketch=None, rank=None, seed=0), 2, "finished"),
                                 (dict(method="lora", sketch="left", rank=1, seed=0), 3, "finished"),
                                 (dict(method="lora", sketch="left", rank=1, seed=1), 1, DIVERGED)):
        curve = [dict(epoch=e, train_loss=1.0 / e, val_loss=0.5 / e, val_acc=0.9, test_acc=0.8 + e / 100, merged=False)
                 for e in range(1, epochs + 1)]
        record = Record(curve=curve, best_epoch=1, best_val_loss=0.5, epochs=epochs, status=status,
                        diverged_step=300 if status == DIVERGED else None)
        out.append(sweep.result_rows(cfg, "cpu", "abc123", spec, record, SCORE, 1045))
    return out


def store(folder: Path, study, results) -> Path:
    """``results`` (runs row, curve rows) upserted one run at a time into ``folder``, as the runner does."""
    prefix, runs, curves = study
    for row, curve in results:
        upsert_runs(folder, [row], curve, prefix, runs, curves)
    return folder


def paths(folder: Path, study) -> tuple[Path, Path]:
    return folder / f"{study[0]}runs.csv", folder / f"{study[0]}curves.csv"


def read(folder: Path, study) -> tuple[list[dict], list[dict]]:
    return read_results(folder, *study)


def warnings_of(capsys) -> list[str]:
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert all(l.startswith("warning: ") for l in lines), lines
    return lines


def keys(runs: list[dict]) -> set[str]:
    return {r["config_hash"] for r in runs}


def data_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# --- 1. a runs file cut inside its last row ----------------------------------------------------------
def test_a_runs_row_cut_inside_is_refused_and_kept_aside(tmp_path, capsys):
    results = fed_results()
    store(tmp_path, FED, results)
    runs_csv, curves_csv = paths(tmp_path, FED)
    before, _ = read(tmp_path, FED)
    data = runs_csv.read_bytes()
    last = data.rstrip().rfind(b"\n") + 1
    cut = data[:last + (len(data) - last) // 2]  # inside the last row's config JSON
    runs_csv.write_bytes(cut)
    capsys.readouterr()
    runs, curves = read(tmp_path, FED)
    lost = results[-1][0]["config_hash"]
    assert keys(runs) == keys(before) - {lost} and lost not in {c["config_hash"] for c in curves}
    [line] = warnings_of(capsys)
    assert line.startswith(f"warning: {runs_csv} line 4: it has ") and "cells (cut?)" in line
    assert line.endswith("not counted as done, so a resume trains the run again")
    assert lost not in keys(read_runs(runs_csv, fed.RUN_COLUMNS, fed.CURVE_COLUMNS))  # resume trains it again
    # the next write keeps the cut row's text, byte for byte, beside the file, and its curve rows with it
    new, new_curve = fed_results(seeds=(7, 8))[1]
    upsert_runs(tmp_path, [new], new_curve, *FED)
    aside = runs_csv.with_name(runs_csv.name + ".damaged")
    assert aside.read_bytes() == data_lines(runs_csv)[0] + cut[last:] + b"\r\n"
    curves_aside = curves_csv.with_name(curves_csv.name + ".damaged")
    assert len(data_lines(curves_aside)) == 1 + len(results[-1][1])
    lines = warnings_of(capsys)
    assert f"warning: {runs_csv}: 1 refused row (line 4) moved to {aside}, byte for byte" in lines
    runs, _ = read(tmp_path, FED)
    assert keys(runs) == keys(before) - {lost} | {new["config_hash"]} and not warnings_of(capsys)


def test_a_file_none_of_whose_rows_can_be_read_is_one_error(tmp_path):
    store(tmp_path, FED, fed_results(seeds=(0,)))
    runs_csv, _ = paths(tmp_path, FED)
    runs_csv.write_bytes(runs_csv.read_bytes()[:-300])
    with pytest.raises(ResultsError) as e:
        read(tmp_path, FED)
    assert len(str(e.value).splitlines()) == 1 and "is unreadable: none of its 1 rows can be read (line 2:" in str(e.value)


# --- 2. a curves file cut at 97 %: a number cut short still parses ------------------------------------
def test_a_curves_file_cut_at_97_percent_keeps_no_cut_number(tmp_path, capsys):
    results = fed_results()
    store(tmp_path, FED, results)
    _, curves_csv = paths(tmp_path, FED)
    want, want_curves = read(tmp_path, FED)
    data = curves_csv.read_bytes()
    curves_csv.write_bytes(data[:int(0.97 * len(data))])
    capsys.readouterr()
    runs, curves = read(tmp_path, FED)
    assert keys(runs) == keys(want) - {results[-1][0]["config_hash"]}  # the last run lost a curve row
    assert all(c in want_curves for c in curves)  # every number read is the one written (8.337e-08, not 8.33)
    lines = warnings_of(capsys)
    assert any(f"{curves_csv} line 9: " in l and "(cut?)" in l for l in lines), lines
    assert any("line 4: its curve rows in" in l and "not round 1-3 (its rounds cell)" in l for l in lines)


def test_a_cut_number_in_a_file_without_row_check_is_refused(tmp_path, capsys):
    """A file from before row_check whose last cell is a number: cut, it still parses (8.33), but the file
    ends inside the row."""
    store(tmp_path, FED, fed_results())
    _, curves_csv = paths(tmp_path, FED)
    drop_check(curves_csv)
    data = curves_csv.read_bytes()
    assert data.endswith(b",8.337e-08\r\n")
    curves_csv.write_bytes(data[:-len(b"7e-08\r\n")])  # "8.337e-08" -> "8.33"
    runs, curves = read(tmp_path, FED)
    assert len(runs) == 2 and all(c["aggregation_error"] < 1e-6 for c in curves)
    lines = warnings_of(capsys)
    assert f"warning: {curves_csv} line 9: the file ends inside it, with no line end (cut?); left out; if it is " \
           f"whole, end the file with a line break" in lines


# --- 3. an emptied curves file, curve rows dropped, repeated or added -----------------------------------
@pytest.mark.parametrize("damage", ["emptied", "dropped", "repeated with other cells", "added", "repeated"])
def test_a_run_whose_curve_rows_are_not_its_rounds_is_not_done(tmp_path, capsys, damage):
    results = fed_results()
    store(tmp_path, FED, results)
    runs_csv, curves_csv = paths(tmp_path, FED)
    want, _ = read(tmp_path, FED)
    lines = data_lines(curves_csv)  # header; run 0: rounds 1-2 (diverged in round 3); runs 1, 2: rounds 1-3
    if damage == "emptied":
        lines = []
    elif damage == "dropped":
        del lines[4]  # run 1, round 2
    elif damage == "repeated with other cells":
        lines.insert(5, lines[4].replace(b",912,913,", b",912,914,").rsplit(b",", 1)[0] + b",\r\n")  # by hand
    elif damage == "added":
        lines.insert(3, lines[2].replace(b",2,4,", b",3,4,").rsplit(b",", 1)[0] + b",\r\n")  # a round 3 it never had
    else:
        lines.insert(5, lines[4])
    curves_csv.write_bytes(b"".join(lines))
    capsys.readouterr()
    runs, curves = read(tmp_path, FED)
    said = warnings_of(capsys)
    hashes = [r["config_hash"] for r, _ in results]
    if damage == "repeated":  # the same row twice: read once, and said
        assert keys(runs) == keys(want) and said == [f"warning: {curves_csv} line 6 repeats line 5 (the same row "
                                                     f"twice); read once"]
        return
    lost = {"emptied": set(hashes), "added": {hashes[0]}}.get(damage, {hashes[1]})
    assert keys(runs) == keys(want) - lost and not lost & {c["config_hash"] for c in curves}
    assert not lost & keys(read_runs(runs_csv, fed.RUN_COLUMNS, fed.CURVE_COLUMNS))  # resume trains them again
    expected = {"emptied": f"warning: {runs_csv} line 2: it has no curve rows in {curves_csv}, not round 1-2 "
                           f"(before its diverged_round 3); rows cut, dropped or added?; not counted as done, so a "
                           f"resume trains the run again",
                "dropped": f"warning: {runs_csv} line 3: its curve rows in {curves_csv} are round 1, 3, not round "
                           f"1-3 (its rounds cell); rows cut, dropped or added?; not counted as done, so a resume "
                           f"trains the run again",
                "repeated with other cells": f"warning: {runs_csv} line 3: its curves in {curves_csv} have two "
                                             f"different rows for round 2 (lines 5, 6); not counted as done, so a "
                                             f"resume trains the run again",
                "added": f"warning: {runs_csv} line 2: its curve rows in {curves_csv} are round 1-3, not round 1-2 "
                         f"(before its diverged_round 3); rows cut, dropped or added?; not counted as done, so a "
                         f"resume trains the run again"}[damage]
    assert expected in said and len(said) == len(lost)


# --- 4. formula cells ------------------------------------------------------------------------------------------
def test_formula_cells_are_written_harmless_and_read_back_exactly(tmp_path):
    columns = {"config_hash": str, "note": str, "x": float}
    values = ['=HYPERLINK("http://evil","click")', "+1+2", "-x", "@SUM(A1)", "\tTAB", "\rCR", "'quoted", "''two",
              "-0.5", "+3", "plain", "-inf", ""]
    rows = [dict(config_hash=f"h{i}", note=v or None, x=-1.5) for i, v in enumerate(values)]
    write_rows(tmp_path / "runs.csv", rows, columns)
    cells = [r[1] for r in csv.reader(io.StringIO((tmp_path / "runs.csv").read_bytes().decode(), newline=""))][1:]
    assert cells == ['\'=HYPERLINK("http://evil","click")', "'+1+2", "'-x", "'@SUM(A1)", "'\tTAB", "'\rCR",
                     "''quoted", "'''two", "-0.5", "+3", "plain", "'-inf", ""]
    got = read_rows(tmp_path / "runs.csv", columns)
    assert [r["note"] for r in got] == [v or None for v in values] and all(r["x"] == -1.5 for r in got)


def test_a_formula_cell_never_crashes_the_report_and_is_neutralised_when_rewritten(tmp_path, capsys):
    from engine.runner import report
    from plots import draw_all

    results = sweep_results()
    store(tmp_path, SWEEP, results)
    runs_csv, _ = paths(tmp_path, SWEEP)
    evil = '=HYPERLINK("http://evil","click")'
    table = list(csv.reader(io.StringIO(runs_csv.read_text(), newline="")))
    header = table[0]
    table[2][header.index("method")], table[2][header.index(CHECK)] = evil, ""  # the FPFT run, edited by hand
    table[1][header.index("test_acc_b")] = evil  # not a number: that row (the base run) is refused in one line
    buf = io.StringIO()
    csv.writer(buf).writerows(table)
    runs_csv.write_text(buf.getvalue(), newline="")
    capsys.readouterr()
    cfg = SimpleNamespace(results_dir=tmp_path, plots_dir=tmp_path / "plots")
    report(cfg, None, {r["settings_hash"] for r, _ in results}, summary_table, draw_all, sweep.RUN_COLUMNS,
           sweep.CURVE_COLUMNS)
    out = capsys.readouterr()
    assert evil in out.out and "wrote" in out.out  # the table and the figures
    assert [l for l in out.err.splitlines() if l.strip()] == [
        f"warning: {runs_csv} line 2: its test_acc_b cell '=HYPERLINK(\"http://evil\",\"click\")' is not a number; "
        f"not counted as done, so a resume trains the run again"]
    new, new_curve = sweep_results(Config(max_epochs=3, seeds=[5], progress=False))[2]
    new = dict(new, seed=9, config_hash="ffffffffffff")
    upsert_runs(tmp_path, [new], [dict(c, config_hash="ffffffffffff") for c in new_curve], *SWEEP)
    assert f"'{evil}".replace('"', '""') in runs_csv.read_text()  # written with its leading '
    assert evil in {r["method"] for r in read_rows(runs_csv, sweep.RUN_COLUMNS)}  # and read back as it was


# --- 5. main.py --plots-only on a runs file whose last row is cut ----------------------------------------------
@pytest.mark.slow
def test_plots_only_on_a_cut_runs_file_says_one_line(tmp_path):
    args = ["--results_dir", str(tmp_path / "results"), "--plots_dir", str(tmp_path / "plots"), "--device", "cpu",
            "--max_epochs", "3", "--method", "lora", "--ranks", "1", "--seeds", "0", "1", "--progress", "false"]
    store(tmp_path / "results", SWEEP, sweep_results(from_argv(args)))
    runs_csv = tmp_path / "results" / "runs.csv"
    runs_csv.write_bytes(runs_csv.read_bytes()[:-200])
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *args, "--plots-only"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    err = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith(f"warning: {runs_csv} line 5: ") and "Traceback" not in proc.stderr
    assert "wrote" in proc.stdout and "lora" in proc.stdout  # the table (the cut run left out) and the figures


# --- row_check: a spreadsheet's re-save is read, a hand edit is refused unless its row_check is cleared ------
def excel(text: str, kind) -> str:
    """A cell as a spreadsheet re-saves it: numbers in its own format (8.337E-08, 0.50, TRUE)."""
    if kind is bool:
        return text.upper()
    if not text or not (kind is int or kind is float or isinstance(kind, Index)):
        return text
    value = float(text)
    if value.is_integer() and "e" not in text:
        return str(int(value))
    return repr(value).upper() if "e" in repr(value) else repr(value) + "0"


def resave(path: Path, columns) -> None:
    """``path`` as a spreadsheet writes it back: a byte-order mark, LF line ends, every cell quoted, the columns
    in another order, the numbers in its format."""
    table = list(csv.reader(io.StringIO(path.read_text(), newline="")))
    header = table[0]
    order = list(reversed(range(len(header))))
    out = io.StringIO()
    w = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerow([header[i] for i in order])
    for row in table[1:]:
        w.writerow([excel(row[i], columns.get(header[i], str)) for i in order])
    path.write_bytes(b"\xef\xbb\xbf" + out.getvalue().encode())


def drop_check(path: Path) -> None:
    """``path`` as a file written before row_check: without that column."""
    table = list(csv.reader(io.StringIO(path.read_text(), newline="")))
    out = io.StringIO()
    csv.writer(out).writerows([row[:-1] for row in table])
    path.write_text(out.getvalue(), newline="")


@pytest.mark.parametrize("study,results", [(FED, fed_results), (SWEEP, sweep_results)])
def test_a_spreadsheet_resave_is_read_as_it_was(tmp_path, capsys, study, results):
    store(tmp_path, study, results())
    want = read(tmp_path, study)
    runs_csv, curves_csv = paths(tmp_path, study)
    resave(runs_csv, study[1])
    resave(curves_csv, study[2])
    assert b"E-08" in curves_csv.read_bytes() or study is SWEEP
    capsys.readouterr()
    assert read(tmp_path, study) == want and not capsys.readouterr().err


def test_a_hand_edit_is_refused_until_its_row_check_is_cleared(tmp_path, capsys):
    store(tmp_path, FED, fed_results())
    runs_csv, _ = paths(tmp_path, FED)
    table = list(csv.reader(io.StringIO(runs_csv.read_text(), newline="")))
    acc = table[0].index("final_test_acc_b")
    table[3][acc] = "0.99"

    def write():
        buf = io.StringIO()
        csv.writer(buf).writerows(table)
        runs_csv.write_text(buf.getvalue(), newline="")
    write()
    capsys.readouterr()
    assert len(read(tmp_path, FED)[0]) == 2
    assert warnings_of(capsys) == [
        f"warning: {runs_csv} line 4: its cells do not match its row_check (cut or edited); not counted as done, so "
        f"a resume trains the run again; to keep a hand edit, clear its row_check cell"]
    table[3][-1] = ""
    write()
    runs, _ = read(tmp_path, FED)
    assert len(runs) == 3 and runs[-1]["final_test_acc_b"] == 0.99 and not warnings_of(capsys)


def test_files_from_before_row_check_are_read(tmp_path, capsys):
    for study, results in ((FED, fed_results), (SWEEP, sweep_results)):
        store(tmp_path, study, results())
        want = read(tmp_path, study)
        for path in paths(tmp_path, study):
            drop_check(path)
            assert CHECK not in path.read_text()
        assert read(tmp_path, study) == want
    # and the committed results of docs/results (written before the check) are read whole
    for name, study in (("default_", SWEEP), ("fed_iid_", FED)):
        folder = tmp_path / name
        folder.mkdir()
        for kind in ("runs", "curves"):
            shutil.copy(ROOT / "docs" / "results" / f"{name}{kind}.csv", folder / f"{study[0]}{kind}.csv")
        runs, _ = read(folder, study)
        assert len(runs) == sum(1 for _ in open(folder / f"{study[0]}runs.csv")) - 1
    assert not capsys.readouterr().err


# --- fuzz: cuts, repeated rows and flipped bytes in every file the readers read -------------------------------
_FUZZ: dict = {}


def _fuzz_store(name: str) -> tuple:
    """(study, {file name: bytes}, {config_hash: (runs row, sorted curve rows)}) of a store written once."""
    if name not in _FUZZ:
        study, results = (FED, fed_results) if name == "fed" else (SWEEP, sweep_results)
        folder = Path(tempfile.mkdtemp())
        store(folder, study, results())
        runs, curves = read(folder, study)
        truth = {r["config_hash"]: (r, _sorted([c for c in curves if c["config_hash"] == r["config_hash"]]))
                 for r in runs}
        _FUZZ[name] = study, {p.name: p.read_bytes() for p in paths(folder, study)}, truth
        shutil.rmtree(folder)
    return _FUZZ[name]


def _sorted(curves: list[dict]) -> list[dict]:
    return sorted(curves, key=lambda c: c.get("epoch", c.get("round")))


DAMAGE = st.one_of(
    st.tuples(st.just("cut"), st.floats(0, 1)),
    st.tuples(st.just("repeat"), st.floats(0, 1), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=3)))


def _damage(data: bytes, how) -> bytes:
    if how[0] == "cut":
        return data[:int(how[1] * len(data))]
    if how[0] == "repeat":
        lines = data.splitlines(keepends=True)
        if len(lines) < 2:
            return data
        row = lines[1 + int(how[1] * (len(lines) - 1)) % (len(lines) - 1)]
        at = int(how[2] * len(lines))
        return b"".join(lines[:at] + [row] + lines[at:])
    out = bytearray(data)
    for where, mask in how[1]:
        if out:
            out[min(int(where * len(out)), len(out) - 1)] ^= mask
    return bytes(out)


def _values(row: dict) -> dict:
    """A row's values (a header that renamed a column holding no value changes nothing of them)."""
    return {k: v for k, v in row.items() if v is not None}


def _check(runs, curves, truth) -> None:
    """Every run returned is one that was written, with its values and exactly its curve rows."""
    for r in runs:
        assert r["config_hash"] in truth and _values(r) == _values(truth[r["config_hash"]][0]), r
        mine = _sorted([c for c in curves if c["config_hash"] == r["config_hash"]])
        assert list(map(_values, mine)) == list(map(_values, truth[r["config_hash"]][1]))


@pytest.mark.parametrize("name", ["fed", "sweep"])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["runs", "curves", "both"]), damages=st.lists(DAMAGE, min_size=1, max_size=2))
def test_fuzz_the_readers_never_use_a_damaged_row(name, which, damages):
    study, files, truth = _fuzz_store(name)
    prefix, run_columns, curve_columns = study
    folder = Path(tempfile.mkdtemp())
    try:
        for file, data in files.items():
            if which == "both" or file == f"{prefix}{which}.csv":
                for how in damages:
                    data = _damage(data, how)
            (folder / file).write_bytes(data)
        runs_csv, curves_csv = paths(folder, study)
        every_curve = [_values(c) for _, cs in truth.values() for c in cs]
        try:
            runs, curves = read_results(folder, *study)
            _check(runs, curves, truth)
            assert keys(read_runs(runs_csv, run_columns, curve_columns)) == keys(runs)  # what resume skips
        except ResultsError as e:
            assert len(str(e).splitlines()) == 1
        try:  # every whole row is one that was written
            assert all(_values(r) == _values(truth[r["config_hash"]][0]) for r in read_rows(runs_csv, run_columns))
            assert all(_values(c) in every_curve for c in read_rows(curves_csv, curve_columns))
        except ResultsError as e:
            assert len(str(e).splitlines()) == 1
        # a write into the damaged folder: nothing raised but a ResultsError, nothing damaged used, nothing lost
        new = {**next(iter(truth.values()))[0], "config_hash": "new000000000", "seed": 99}
        new_curves = [dict(c, config_hash="new000000000") for c in next(iter(truth.values()))[1]]
        before = runs_csv.read_bytes() if runs_csv.exists() else b""
        try:
            upsert_runs(folder, [new], new_curves, *study)
        except ResultsError as e:
            assert len(str(e).splitlines()) == 1
            return
        runs, curves = read_results(folder, *study)
        _check([r for r in runs if r["config_hash"] != "new000000000"], curves, truth)
        assert "new000000000" in keys(runs)
        kept = runs_csv.read_bytes() + (folder / f"{runs_csv.name}.damaged").read_bytes() \
            if (folder / f"{runs_csv.name}.damaged").exists() else runs_csv.read_bytes()
        for h in truth:
            if h.encode() in before:
                assert h.encode() in kept, h  # a run whose row was there is still there, or kept aside
    finally:
        shutil.rmtree(folder)
