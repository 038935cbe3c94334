"""main.py as a user runs it: a tiny end-to-end sweep, resume, --plots-only, and one-line errors."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from raclora.methods import METHODS
from engine.results import read_rows, write_rows
from sweep import CURVE_COLUMNS, RUN_COLUMNS
from tests.conftest import ROOT
from tests.test_data import NO_NETWORK, _copy_raw

# the tiny sweep's figures: one rank (no params_vs_accuracy), AdaLoRA among the methods (where its rank went)
PLOTS = {"mlp_rank_vs_accuracy.png", "mlp_accuracy_vs_epoch.png", "mlp_methods_rank1.png", "mlp_adalora_ranks.png"}


def run_main(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


def assert_one_line_error(proc, needle):
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    args = ["--method", "all", "--sketch", "both", "--ranks", "1", "--seeds", "0", "--max_epochs", "1",
            "--results_dir", out / "results", "--plots_dir", out / "plots", "--progress", "false"]
    proc = run_main(*args)
    assert proc.returncode == 0, proc.stderr
    return out, args, proc


@pytest.mark.slow
def test_end_to_end_writes_csvs_plots_and_table(tiny_sweep):
    out, _, proc = tiny_sweep
    runs = read_rows(out / "results" / "runs.csv", RUN_COLUMNS)
    assert set(RUN_COLUMNS) <= set(runs[0])
    methods = sorted((r["method"], r["sketch"]) for r in runs)
    assert methods == sorted([("base", None), ("fpft", None)] + [(m, None) for m in METHODS if not METHODS[m].uses_sketch]
                             + [(m, s) for m in METHODS if METHODS[m].uses_sketch for s in ("left", "right")])
    assert {m for m, _ in methods} == {"base", "fpft", "randlora", "pissa", "cola_pissa", "adalora", *METHODS}
    for r in runs:
        assert 0.0 <= r["test_acc_b"] <= 1.0 and 0.0 <= r["test_acc_a"] <= 1.0
        assert r["git_commit"] and r["config_hash"] and r["epochs"] == 1
    fpft = next(r for r in runs if r["method"] == "fpft")
    assert fpft["trainable_params"] == 54_725 and fpft["test_acc_b"] > 0.8
    base = next(r for r in runs if r["method"] == "base")
    assert base["test_acc_a"] > 0.9  # one epoch on digits 0-4 already separates them
    rac = next(r for r in runs if r["method"] == "rac_lora" and r["sketch"] == "left")
    assert rac["trainable_params"] == 912 and rac["merges"] == 1
    curves = read_rows(out / "results" / "curves.csv", CURVE_COLUMNS)
    assert len(curves) == len(runs)  # one epoch each
    assert {p.name for p in (out / "plots").iterdir()} == PLOTS
    assert "test acc B %" in proc.stdout and "rac_lora" in proc.stdout


@pytest.mark.slow
def test_second_invocation_resumes_and_plots_only_redraws(tiny_sweep):
    out, args, _ = tiny_sweep
    before = read_rows(out / "results" / "runs.csv", RUN_COLUMNS)
    proc = run_main(*args)
    assert proc.returncode == 0, proc.stderr
    assert "base model: loaded" in proc.stdout + proc.stderr
    assert read_rows(out / "results" / "runs.csv", RUN_COLUMNS) == before  # nothing re-trained, nothing lost
    shutil.rmtree(out / "plots")
    proc = run_main("--plots-only", *args)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (out / "plots").iterdir()} == PLOTS


@pytest.mark.parametrize("engine", [["--stack_size", "1"], ["--workers", "2", "--stack_size", "3"]])
@pytest.mark.slow
def test_runs_alone_or_on_two_workers_give_the_same_rows(tiny_sweep, tmp_path, engine):
    """The same sweep one run at a time, or in stacks on two worker processes: the same runs,
    the same numbers to float rounding (the tiny sweep itself ran in stacks in one process)."""
    out, args, _ = tiny_sweep
    shutil.copytree(out / "results" / "checkpoints", tmp_path / "results" / "checkpoints")  # same base model
    mine = [*args[:args.index("--results_dir")], "--results_dir", tmp_path / "results", "--plots_dir",
            tmp_path / "plots", "--progress", "false", *engine]
    proc = run_main(*mine)
    assert proc.returncode == 0, proc.stderr
    want = {r["config_hash"]: r for r in read_rows(out / "results" / "runs.csv", RUN_COLUMNS)}
    got = {r["config_hash"]: r for r in read_rows(tmp_path / "results" / "runs.csv", RUN_COLUMNS)}
    assert got.keys() == want.keys()
    for k, r in got.items():
        assert r["best_val_loss"] == pytest.approx(want[k]["best_val_loss"], rel=1e-5)
        assert r["test_acc_b"] == pytest.approx(want[k]["test_acc_b"], abs=1e-3)
        assert (r["epochs"], r["trainable_params"], r["merges"]) == (want[k]["epochs"],
                                                                    want[k]["trainable_params"], want[k]["merges"])


@pytest.mark.parametrize("args,needle", [
    (["--method", "vera"], "unknown method 'vera'; allowed:"),
    (["--ranks", "0"], "rank 0 is out of range"),
    (["--ranks", "-1"], "rank -1 is out of range"),
    (["--learning_rate", "0.1"], "unknown option --learning_rate; allowed:"),
    (["--max_epochs", "ten"], "--max_epochs expects an integer"),
    (["--seeds"], "expected at least one argument"),
])
@pytest.mark.slow
def test_bad_command_line_gives_one_line_error(args, needle):
    assert_one_line_error(run_main(*args), needle)


def test_missing_data_without_network(tmp_path):
    proc = run_main("--data_dir", tmp_path / "nodata", "--results_dir", tmp_path / "r", "--plots_dir",
                    tmp_path / "p", env=NO_NETWORK)
    assert_one_line_error(proc, "could not be downloaded")


def test_corrupt_data_file(tmp_path):
    raw = _copy_raw(tmp_path)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"not a gzip file")
    proc = run_main("--data_dir", tmp_path, "--results_dir", tmp_path / "r", "--plots_dir", tmp_path / "p")
    assert_one_line_error(proc, "corrupt data file")


def test_plots_only_without_results(tmp_path):
    proc = run_main("--plots-only", "--results_dir", tmp_path / "r", "--plots_dir", tmp_path / "p")
    assert_one_line_error(proc, "no runs in")


def test_unreadable_results_file(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "runs.csv").write_text("method,rank,config_hash,settings_hash\nlora,one,x,y\n")
    proc = run_main("--plots-only", "--results_dir", tmp_path / "r", "--plots_dir", tmp_path / "p")
    assert_one_line_error(proc, "is unreadable")


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "runs.csv"
    good = [{"method": "lora", "rank": 1, "config_hash": "a"}]
    write_rows(path, good, RUN_COLUMNS)
    before = path.read_bytes()
    import csv

    def boom(self, row):
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerow", boom)
    with pytest.raises(KeyboardInterrupt):
        write_rows(path, good * 3, RUN_COLUMNS)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["runs.csv"]  # no temporary file left behind


@pytest.mark.slow
def test_interrupted_sweep_keeps_finished_runs_and_resumes(tmp_path):
    import signal
    import time

    common = ["--method", "rac_lora", "--ranks", "1", "--max_epochs", "1", "--run_fpft", "false",
              "--results_dir", str(tmp_path / "r"), "--plots_dir", str(tmp_path / "p"), "--progress", "false"]
    args = [sys.executable, str(ROOT / "main.py"), *common, "--seeds", *map(str, range(40))]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs_csv = tmp_path / "r" / "runs.csv"
    deadline = time.time() + 300
    while time.time() < deadline and len(read_rows(runs_csv, RUN_COLUMNS) if runs_csv.exists() else []) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    kept = read_rows(runs_csv, RUN_COLUMNS)
    assert len(kept) >= 3 and {r["method"] for r in kept} == {"base", "rac_lora"}
    done_seeds = sorted(r["seed"] for r in kept if r["method"] == "rac_lora")
    # the same command again trains only what is missing, and keeps every finished run as it was
    # (stacks finish in any order on several workers, so the finished seeds need not be a prefix)
    wanted = sorted(done_seeds + [min(set(range(40)) - set(done_seeds))])
    again = run_main(*common, "--seeds", *wanted)
    assert again.returncode == 0, again.stderr
    after = {r["config_hash"]: r for r in read_rows(runs_csv, RUN_COLUMNS)}
    assert all(after[r["config_hash"]] == r for r in kept)
    assert sorted(r["seed"] for r in after.values() if r["method"] == "rac_lora") == wanted
