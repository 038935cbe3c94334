"""Nothing lost, nothing silently wrong: concurrent writers of one results folder, corrupt results files
and checkpoints, runs that diverge, output folders checked before any compute, and command lines fuzzed."""
from __future__ import annotations

import math
import multiprocessing as mp
import shutil
import subprocess
import sys

import pytest
import torch

from engine.results import landed_runs, read_results, read_rows, read_runs, summary_table, upsert_runs, write_rows
from sweep import CURVE_COLUMNS, RUN_COLUMNS
from tests.conftest import ROOT

CURVES_PER_RUN = 3


# --- 1. several writers, one results folder --------------------------------------------------------
def fake_run(writer: int, i: int) -> tuple[dict, list[dict]]:
    key = f"w{writer}-r{i}"
    row = dict(method="lora", sketch="left", rank=1, seed=1000 * writer + i, status="finished", epochs=3,
               test_acc_b=0.5, test_acc_a=0.5, trainable_params=10, wall_s=1.0, config_hash=key, settings_hash="s")
    curve = [dict(config_hash=key, method="lora", sketch="left", rank=1, seed=row["seed"], epoch=e,
                  train_loss=1.0 / e, merged=False) for e in range(1, CURVES_PER_RUN + 1)]
    return row, curve


def _writer(folder: str, writer: int, runs: int) -> None:
    for i in range(runs):
        row, curve = fake_run(writer, i)
        upsert_runs(folder, [row], curve, "", RUN_COLUMNS, CURVE_COLUMNS)


def _check_complete(folder, writers, runs):
    rows = read_rows(folder / "runs.csv", RUN_COLUMNS)
    curves = read_rows(folder / "curves.csv", CURVE_COLUMNS)
    assert len(rows) == writers * runs and len({r["config_hash"] for r in rows}) == writers * runs
    per_run = {}
    for c in curves:
        per_run[c["config_hash"]] = per_run.get(c["config_hash"], 0) + 1
    assert per_run == {r["config_hash"]: CURVES_PER_RUN for r in rows}


@pytest.mark.parametrize("attempt", range(2))
@pytest.mark.slow
def test_four_writers_lose_nothing(tmp_path, attempt):
    """4 processes x 60 upserts of distinct runs into one folder: all 240 runs and all their curve rows.
    (Before the lock, two writers of 200 upserts each kept 117 of 200 rows each.)"""
    writers, runs = 4, 60
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, runs)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    _check_complete(tmp_path, writers, runs)


def _reader(folder: str, rounds: int, out) -> None:
    """Read while others write: every run seen has exactly its own curve rows."""
    bad = 0
    for _ in range(rounds):
        runs, curves = read_results(folder, "", RUN_COLUMNS, CURVE_COLUMNS)
        counts = {}
        for c in curves:
            counts[c["config_hash"]] = counts.get(c["config_hash"], 0) + 1
        bad += sum(counts.get(r["config_hash"], 0) != CURVES_PER_RUN for r in runs) + (len(counts) != len(runs))
    out.put(bad)


@pytest.mark.slow
def test_readers_see_a_run_with_all_its_curves_or_not_at_all(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), w, 60)) for w in range(2)]
    reader = ctx.Process(target=_reader, args=(str(tmp_path), 60, q))
    for p in (*writers, reader):
        p.start()
    for p in (*writers, reader):
        p.join(timeout=300)
    assert q.get(timeout=10) == 0
    _check_complete(tmp_path, 2, 60)


def test_a_writer_killed_between_the_two_files_leaves_no_half_run(tmp_path, monkeypatch):
    import engine.results as results

    row, curve = fake_run(0, 0)
    upsert_runs(tmp_path, [row], curve, "", RUN_COLUMNS, CURVE_COLUMNS)
    replaced, new_curve = dict(row, test_acc_b=0.9), [dict(c, train_loss=9.0) for c in curve]
    other, other_curve = fake_run(1, 0)
    real_write = results.write_rows
    calls = []

    def dies_before_runs_csv(path, rows, columns):
        calls.append(path.name)
        if path.name == "runs.csv" and "curves.csv" in calls:
            raise KeyboardInterrupt  # the process dies here: curves written, its runs.csv row not
        real_write(path, rows, columns)

    monkeypatch.setattr(results, "write_rows", dies_before_runs_csv)
    with pytest.raises(KeyboardInterrupt):
        upsert_runs(tmp_path, [replaced, other], new_curve + other_curve, "", RUN_COLUMNS, CURVE_COLUMNS)
    monkeypatch.setattr(results, "write_rows", real_write)
    runs, curves = read_results(tmp_path, "", RUN_COLUMNS, CURVE_COLUMNS)
    assert runs == []  # the replaced run left runs.csv first; the new one never landed
    assert curves == []  # and no reader sees curve rows of a run that has no row
    upsert_runs(tmp_path, [other], other_curve, "", RUN_COLUMNS, CURVE_COLUMNS)  # the next write drops the orphans for good
    assert len(read_rows(tmp_path / "curves.csv", CURVE_COLUMNS)) == CURVES_PER_RUN


# --- 2. corrupt results files ------------------------------------------------------------------------
def test_bom_duplicates_and_nan_rows(tmp_path):
    rows = [fake_run(0, i)[0] for i in range(3)]
    rows[2]["test_acc_b"] = math.nan  # a run whose result is not a number: not finished
    diverged = dict(fake_run(0, 3)[0], status="diverged", test_acc_b=None, test_acc_a=None, best_val_loss=math.inf)
    write_rows(tmp_path / "runs.csv", rows + [rows[0], diverged], RUN_COLUMNS)  # rows[0] twice
    data = (tmp_path / "runs.csv").read_bytes()
    (tmp_path / "runs.csv").write_bytes(b"\xef\xbb\xbf" + data)  # re-saved by a spreadsheet
    got = read_runs(tmp_path / "runs.csv", RUN_COLUMNS)
    assert sorted(r["config_hash"] for r in got) == ["w0-r0", "w0-r1", "w0-r3"]
    table = summary_table(got)
    assert "2 +1 diverged" in table and "50.00 ± 0.00" in table  # two seeds counted once each
    assert landed_runs([dict(rows[1], wall_s=math.inf)]) == []


def _run(script, *args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_plots_only_survives_a_spreadsheet_save_and_a_nan_row(small_sweep, tmp_path):
    out, args = small_sweep
    results = tmp_path / "results"
    shutil.copytree(out / "results", results)
    rows = read_rows(results / "runs.csv", RUN_COLUMNS)
    lora = [r for r in rows if r["method"] == "lora"]
    lora[0]["test_acc_b"] = math.nan
    write_rows(results / "runs.csv", rows + [lora[1]], RUN_COLUMNS)  # a nan row and a duplicated row
    (results / "runs.csv").write_bytes(b"\xef\xbb\xbf" + (results / "runs.csv").read_bytes())
    swapped = [a if a != out / "results" else results for a in args]
    swapped = [a if a != out / "plots" else tmp_path / "plots" for a in swapped]
    proc = _run("main.py", *swapped, "--plots-only")
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("lora "))
    assert line.split()[4] == "1"  # the nan run is not counted, the duplicated one once
    proc = _run("main.py", *swapped)  # resume: the nan run is not finished, so it is trained again
    assert proc.returncode == 0, proc.stderr
    redone = [r for r in read_runs(results / "runs.csv", RUN_COLUMNS) if r["method"] == "lora"]
    assert len(redone) == 2 and all(0 <= r["test_acc_b"] <= 1 for r in redone)
    assert any(r["config_hash"] == lora[0]["config_hash"] for r in redone)


# --- 2. checkpoints prove themselves -------------------------------------------------------------------
def _checkpoint(tmp_path):
    from data import DIGITS, Split, Task
    from conftest import mlp
    from sweep import save_checkpoint
    from train import Record, evaluate

    g = torch.Generator().manual_seed(0)
    model = mlp([16], 0.0, g, "cpu")
    val = Split(torch.randn(40, 784, generator=g), torch.randint(0, 5, (40,), generator=g))
    record = Record(best_val_loss=evaluate(model, val, DIGITS.objective)[0], best_epoch=1, epochs=1)
    path = tmp_path / "base.pt"
    from config import Config
    save_checkpoint(path, model, record, Config(hidden=[16]))
    return path, Task(val, val, val, DIGITS), lambda: mlp([16], 0.0, None, "cpu")


def _damage(path, kind):
    saved = torch.load(path, weights_only=True)
    if kind == "flipped bytes":
        data = bytearray(path.read_bytes())
        start = len(data) // 3
        for i in range(start, start + 400):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
        return
    if kind == "changed weight":
        saved["state_dict"]["net.0.weight"][0, 0] += 0.5
    elif kind == "nan weights":
        saved["state_dict"]["net.0.weight"][0, 0] = math.nan
        from sweep import tensor_checksum
        saved["checksum"] = tensor_checksum(saved["state_dict"])  # a consistent file of non-finite weights
    elif kind == "no record":
        del saved["record"]
    elif kind == "other validation loss":
        saved["record"]["best_val_loss"] += 0.01
    elif kind == "not a dict":
        saved = [1, 2]
    torch.save(saved, path)


@pytest.mark.parametrize("kind,needle", [
    ("flipped bytes", ""), ("changed weight", "does not match its checksum"), ("nan weights", "non-finite"),
    ("no record", "lacks its 'record' entry"), ("other validation loss", "gives validation loss"),
    ("not a dict", "not a checkpoint")])
def test_a_damaged_checkpoint_is_refused(tmp_path, kind, needle):
    from sweep import load_checkpoint

    path, val, fresh = _checkpoint(tmp_path)
    record, problem = load_checkpoint(path, fresh(), val)
    assert problem is None and record.best_epoch == 1  # the intact one proves itself
    _damage(path, kind)
    record, problem = load_checkpoint(path, fresh(), val)
    assert record is None and needle in problem and "\n" not in problem


@pytest.mark.slow
def test_main_retrains_a_damaged_base_checkpoint(small_sweep, tmp_path):
    out, args = small_sweep
    results = tmp_path / "results"
    shutil.copytree(out / "results", results)
    (ckpt,) = (results / "checkpoints").glob("base_*.pt")
    original = torch.load(ckpt, weights_only=True)["checksum"]
    _damage(ckpt, "changed weight")
    swapped = [a if a != out / "results" else results for a in args]
    proc = _run("main.py", *swapped, "--resume", "false")
    assert proc.returncode == 0, proc.stderr
    assert "does not match its checksum (its tensors were changed or damaged); not used, training the base " \
           "model again" in proc.stdout + proc.stderr
    from sweep import tensor_checksum
    fresh = torch.load(ckpt, weights_only=True)
    assert tensor_checksum(fresh["state_dict"]) == fresh["checksum"] == original  # retrained: the same model


# --- 3. runs that diverge ------------------------------------------------------------------------------
def test_a_diverging_run_stops_at_once_and_says_so():
    from tests.test_train import fit, synthetic_task

    model, rec = fit(synthetic_task(), lr=1e30, weight_decay=0.0, max_epochs=20)
    assert rec.status == "diverged" and rec.diverged_step is not None and rec.diverged_step <= 5
    assert rec.epochs == 0 and rec.curve == []  # stopped inside epoch 1, which is not recorded
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the kept weights are the finite ones
    _, ok = fit(synthetic_task(), max_epochs=2)
    assert ok.status == "finished" and ok.diverged_step is None


def test_stacked_divergence_leaves_the_other_runs_as_they_are_alone():
    """A nan put into run 1's weights at step 7: run 1 is recorded as diverged at step 8, in the stack
    and alone, and runs 0 and 2 equal their runs alone in float64."""
    from engine.stack import StackedModel, train_stack
    from tests.test_stack import DT, KW, noisy_task, plain_copy
    from conftest import mlp
    from models import set_generator
    from train import train

    task = noisy_task()
    base = mlp([64, 64], 0.1, torch.Generator().manual_seed(11), "cpu").to(DT)
    seeds, poisoned = [3, 4, 5], 4
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    model = StackedModel(base, len(seeds))

    def poison_stack(step, live):
        if step == 7 and gens[1] in live:
            model.linears[0].weight.data[live.index(gens[1])] = math.nan
        return False

    records = train_stack(model, list(model.parameters()), task, generators=gens, lr=3e-3, on_step_end=poison_stack,
                          **KW)
    assert [r.status for r in records] == ["finished", "diverged", "finished"]
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        ref = plain_copy(base)
        set_generator(ref, g)

        def poison_alone(step):
            if step == 7 and seed == poisoned:
                ref.net[0].weight.data.fill_(math.nan)
            return False

        rec = train(ref, list(ref.parameters()), task, lr=3e-3, generator=g, on_step_end=poison_alone, **KW)
        got = records[i]
        assert (got.status, got.diverged_step, got.epochs, got.best_epoch) == \
               (rec.status, rec.diverged_step, rec.epochs, rec.best_epoch)
        assert [c["val_loss"] for c in got.curve] == pytest.approx([c["val_loss"] for c in rec.curve], abs=1e-10)
        state, want = model.run_state(i), ref.state_dict()
        for k in want:
            torch.testing.assert_close(state[k], want[k], rtol=0, atol=1e-10)
    assert records[1].diverged_step == 8


def test_summary_counts_diverged_runs_apart():
    ok = [dict(fake_run(0, i)[0], test_acc_b=0.9 + 0.02 * i) for i in range(2)]
    bad = dict(fake_run(0, 2)[0], status="diverged", test_acc_b=None, test_acc_a=None)
    line = summary_table(ok + [bad]).splitlines()[2]
    assert "2 +1 diverged" in line and "91.00 ± 1.41" in line


# --- 4. output folders, before any compute ------------------------------------------------------------
@pytest.mark.parametrize("script", ["main.py", "scratch.py"])
@pytest.mark.parametrize("field", ["results_dir", "plots_dir"])
@pytest.mark.parametrize("value,needle", [("", "is empty"), ("/proc/rac", "is under /proc, a system folder"),
                                          ("README.md", "is a file, not a folder")])
@pytest.mark.slow
def test_bad_output_folders_stop_before_compute(script, field, value, needle):
    proc = _run(script, f"--{field}", value, timeout=60)
    _one_line_error(proc, f"{field} ")
    assert needle in proc.stderr


def test_read_only_output_folder(tmp_path):
    """A read-only file system (a tmpfs mounted read-only in a private mount namespace)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mount = f"mount -t tmpfs -o ro none {ro}"
    try:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no unshare command here")
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a read-only file system here: {probe.stderr.strip()}")
    cmd = f"{mount} && {sys.executable} {ROOT / 'main.py'} --results_dir {ro / 'results'}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=60, cwd=ROOT)
    _one_line_error(proc, "results_dir")
    assert "cannot be written" in proc.stderr and "Read-only file system" in proc.stderr


@pytest.mark.parametrize("script,args", [("main.py", []), ("scratch.py", ["--form", "full"])])
@pytest.mark.slow
def test_a_model_the_machine_cannot_hold_is_refused(script, args, tmp_path):
    proc = _run(script, "--hidden", "100000", "100000", *args, "--results_dir", tmp_path / "r", "--plots_dir",
                tmp_path / "p", timeout=60)
    _one_line_error(proc, "hidden [100000, 100000] needs about")
    assert "GiB available" in proc.stderr


def test_scratch_rejects_a_validation_set_that_leaves_nothing_to_train():
    _one_line_error(_run("scratch.py", "--val_size", "59999", timeout=60), "val_size must be an integer from 1 to 50000")


@pytest.mark.slow
def test_non_finite_values_never_train():
    for script, args in (("main.py", ["--lr", "inf"]), ("main.py", ["--lora_alpha", "inf"]),
                         ("main.py", ["--weight_decay", "nan"]), ("scratch.py", ["--lr", "inf"]),
                         ("scratch.py", ["--weight_decay", "nan"])):
        _one_line_error(_run(script, *args, timeout=60), "must be a finite number")


@pytest.mark.slow
def test_rows_record_their_code_and_a_mix_is_said_in_one_line(small_sweep, tmp_path):
    from engine.provenance import code_fingerprint

    out, args = small_sweep
    results = tmp_path / "results"
    shutil.copytree(out / "results", results)
    rows = read_rows(results / "runs.csv", RUN_COLUMNS)
    assert {r["code_fingerprint"] for r in rows} == {code_fingerprint("sweep")}
    rows[-1]["code_fingerprint"] = "0123456789ab"
    write_rows(results / "runs.csv", rows, RUN_COLUMNS)
    swapped = [results if a == out / "results" else tmp_path / "plots" if a == out / "plots" else a for a in args]
    proc = _run("main.py", *swapped, "--plots-only")
    assert proc.returncode == 0, proc.stderr
    notes = [l for l in proc.stdout.splitlines() if l.startswith("note: these results combine 2 versions of the code")]
    assert len(notes) == 1 and "0123456789ab: 1 run" in notes[0]
