"""--report_to tensorboard (engine/tracking.py): every recorded run of a study is one TensorBoard run, read back here
with TensorBoard's own reader: its curves step by step as in the curves CSV, its final metrics as in the runs CSV,
its settings; each run of a stack its own; a resume adds nothing, a run recorded again replaces its events, and
writers side by side leave one run. The studies are run in this process (main.main, ...), which saves each one
its imports."""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time

import numpy as np
import pytest
import torch

import federated
import main
import scratch
from config import Config
from engine.results import RECORD_COLUMNS, Index, read_results
from engine.runner import Study, run_study
from engine.settings import from_argv, hashed_settings
from engine.tracking import FINAL, MARK, curve_parts, require, study_folder, write_run
from fed.config import FedConfig, from_argv as fed_argv
from fed.study import CURVE_COLUMNS as FED_CURVES, PREFIX as FED_PREFIX, RUN_COLUMNS as FED_RUNS
from glue import GlueConfig
from raclora.errors import ConfigError
from raclora.files import clean_stale_tmp
from scratch import ScratchConfig
from sweep import CURVE_COLUMNS, RUN_COLUMNS, run_hash

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator


def tracked(results_dir, prefix: str, run_columns, curve_columns) -> dict:
    """Check every run of the results folder's CSVs against its TensorBoard run, read back; returns
    {config_hash: {tag: [(step, value)]}}. One run folder per config hash, nothing else; each curve column's
    steps are exactly the run's epochs (rounds) and its values the CSV's (to float32); the final metrics present
    at the last step and equal to the runs row's; the run's settings in the HParams plugin's data."""
    runs, curves = read_results(results_dir, prefix, run_columns, curve_columns)
    folder = study_folder(results_dir, prefix)
    assert sorted(os.listdir(folder)) == sorted(r["config_hash"] for r in runs)
    _, index, measured = curve_parts(curve_columns)
    out = {}
    for row in runs:
        key = row["config_hash"]
        events = [f for f in os.listdir(folder / key) if f.startswith("events.out.tfevents")]
        assert len(events) == 1 and (folder / key / MARK).exists(), key
        acc = EventAccumulator(str(folder / key))
        acc.Reload()
        scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
        mine = sorted((c for c in curves if c["config_hash"] == key), key=lambda c: c[index])
        assert [c[index] for c in mine] == list(range(1, len(mine) + 1))
        for name in measured:
            want = [(c[index], float(c[name])) for c in mine if c[name] is not None]
            if not want:
                assert name not in scalars, (key, name)
                continue
            got = scalars[name]
            assert [s for s, _ in got] == [s for s, _ in want], (key, name)  # the steps are the epochs
            np.testing.assert_array_equal(np.float32([v for _, v in got]), np.float32([v for _, v in want]))
        finals = {t: v for t, v in scalars.items() if t.startswith(FINAL)}
        assert finals, key
        for tag, got in finals.items():
            assert got == [(mine[-1][index] if mine else 0, pytest.approx(float(row[tag[len(FINAL):]]), rel=1e-6))]
        assert set(acc.PluginTagToContent("hparams")) == {"_hparams_/experiment", "_hparams_/session_start_info",
                                                          "_hparams_/session_end_info"}
        out[key] = scalars
    return out


def snapshot(folder) -> dict:
    """{path: (size, mtime)} of every file under ``folder``: what a run that adds nothing leaves as it was."""
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(folder) for f in files}


# --- the setting ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Config, FedConfig, ScratchConfig, GlueConfig])
def test_report_to_is_one_shared_setting_that_changes_no_run(cls):
    assert cls().report_to == "none"
    assert from_argv(["--report_to", "tensorboard"], cls, prog="x").report_to == "tensorboard"
    assert "report_to" not in hashed_settings(cls(report_to="tensorboard"))
    with pytest.raises(ConfigError, match=r"^unknown report_to 'nonsense'; allowed: none, tensorboard$"):
        from_argv(["--report_to", "nonsense"], cls, prog="x")


def test_an_unknown_tracker_or_a_missing_tensorboard_is_one_line_before_any_compute(tmp_path, capsys, monkeypatch):
    folders = ["--results_dir", str(tmp_path / "r"), "--plots_dir", str(tmp_path / "p"), "--progress", "false"]
    assert main.main(["--report_to", "nonsense", *folders]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown report_to 'nonsense'; allowed: none, tensorboard\n"
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an import without the package meets
    require("none")
    with pytest.raises(ConfigError, match="needs the tensorboard package"):
        require("tensorboard")
    assert main.main(["--report_to", "tensorboard", *folders]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --report_to tensorboard needs the tensorboard package") and err.count("\n") == 1
    assert not (tmp_path / "r" / "runs.csv").exists()  # nothing trained


# --- the runner on a study of its own (no training) ------------------------------------------------------------

RUNS = {"name": str, "seed": int, "status": str, "epochs": int, "acc": float, **RECORD_COLUMNS}
CURVES = {"config_hash": str, "name": str, "seed": int, "epoch": Index("epochs"), "loss": float, "merged": bool,
          "note": str}


class ToyTrainer:
    """Trains nothing: a run's curves are a function of its spec and the trainer's ``offset``; each recording of
    a run is told from the others by its finished_at."""

    def __init__(self, offset: float, show_epochs: bool = True):
        self.offset = offset

    def run(self, specs):
        out = []
        for s in specs:
            key, epochs = f"{s['name']}-{s['seed']}", 2 + s["seed"]
            row = dict(name=s["name"], seed=s["seed"], status="ok", epochs=epochs, acc=self.offset + s["seed"] / 10,
                       config_hash=key, settings_hash="toy", git_commit="", device="cpu", wall_s=0.5,
                       finished_at=f"{time.time_ns()}", config=json.dumps({"lr": 0.1, "seeds": [0, 1, 2]}))
            curve = [dict(config_hash=key, name=s["name"], seed=s["seed"], epoch=e, loss=self.offset + s["seed"] / e,
                          merged=e % 2 == 0, note="x") for e in range(1, epochs + 1)]
            curve[0]["loss"] = None  # an empty cell: no point at that step
            out.append((row, curve))
        return out


def toy(tmp_path, offset=0.5, **kw):
    from types import SimpleNamespace

    plan = [dict(name=n, seed=s) for n in ("a", "b") for s in range(3)]
    study = Study(plan=plan, run_hash=lambda s: f"{s['name']}-{s['seed']}", stack_key=lambda s: (s["name"],),
                  make_trainer=ToyTrainer, trainer_args=(offset,), trainer=ToyTrainer(offset), prefix="toy_",
                  code=__name__, run_columns=RUNS, curve_columns=CURVES)
    cfg = SimpleNamespace(**{**dict(results_dir=str(tmp_path), resume=True, resume_any_code=False, workers=1, executor="local",
                                    stack_size=3, progress=False, report_to="tensorboard"), **kw})
    return run_study(study, cfg, torch.device("cpu"))


def test_each_run_of_a_stack_is_its_own_run_a_resume_adds_nothing_and_a_new_recording_replaces(tmp_path):
    rows = toy(tmp_path)  # two stacks of three runs
    assert len(rows) == 6
    first = tracked(tmp_path, "toy_", RUNS, CURVES)
    assert set(first["a-2"]) == {"loss", "merged", "final/epochs", "final/acc", "final/wall_s"}  # not seed, note
    assert first["a-2"]["loss"] == [(e, pytest.approx(0.5 + 2 / e)) for e in (2, 3, 4)]  # no point at epoch 1
    assert first["a-2"]["merged"] == [(1, 0.0), (2, 1.0), (3, 0.0), (4, 1.0)]
    before = snapshot(tmp_path / "tensorboard")
    toy(tmp_path, offset=9.0)  # a resume: every run recorded and tracked, nothing written
    assert snapshot(tmp_path / "tensorboard") == before
    toy(tmp_path, offset=2.0, resume=False)  # every run recorded again: its events replaced, still one run each
    again = tracked(tmp_path, "toy_", RUNS, CURVES)
    assert again["a-2"]["final/acc"] == [(4, pytest.approx(2.2))]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_runs_recorded_before_are_tracked_and_writers_side_by_side_leave_one_run(tmp_path):
    toy(tmp_path, report_to="none")  # recorded without tracking
    assert not (tmp_path / "tensorboard").exists()
    toy(tmp_path, offset=9.0)  # trains nothing, tracks the six recorded runs
    tracked(tmp_path, "toy_", RUNS, CURVES)
    row, curves = ToyTrainer(3.0).run([dict(name="a", seed=1)])[0]
    writers = [threading.Thread(target=write_run, args=(tmp_path, "toy_", row, curves, RUNS, CURVES))
               for _ in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    folder = study_folder(tmp_path, "toy_") / "a-1"
    assert len([f for f in os.listdir(folder) if f.startswith("events")]) == 1
    assert json.loads((folder / MARK).read_text())["finished_at"] == row["finished_at"]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    stale = tmp_path / f".tensorboard.a-1.{2 ** 22 + 12345}.abc.tmp"  # a killed writer's folder (no such process)
    (stale / "a-1").mkdir(parents=True)
    assert clean_stale_tmp(tmp_path) == [stale] and not stale.exists()


# --- the studies, end to end -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_main_sweep_is_one_run_per_config_hash_with_its_epochs(small_sweep, tmp_path, capsys):
    """small_sweep's results (base, fpft and lora, seeds 0 1) are tracked as they are; seeds 2 3 are trained, one
    stack of fpft and one of lora, each run its own TensorBoard run; a resume adds nothing."""
    out, args = small_sweep
    shutil.copytree(out / "results", tmp_path / "results")
    argv = [str(a) for a in args]
    for flag, value in (("--results_dir", tmp_path / "results"), ("--plots_dir", tmp_path / "plots")):
        argv[argv.index(flag) + 1] = str(value)
    at = argv.index("--seeds")
    argv[at + 1:at + 3] = ["0", "1", "2", "3"]
    argv += ["--report_to", "tensorboard"]
    assert main.main(argv) == 0
    assert "4 runs to train, 4 already recorded" in "".join(capsys.readouterr())
    runs = tracked(tmp_path / "results", "", RUN_COLUMNS, CURVE_COLUMNS)
    assert len(runs) == 9  # base, fpft and lora x 4 seeds
    cfg = from_argv(argv, Config, prog="main.py")
    for method, sketch, rank in (("fpft", None, None), ("lora", "left", 1)):
        two, three = (runs[run_hash(cfg, "cpu", method, sketch, rank, s)] for s in (2, 3))
        assert two["val_loss"] != three["val_loss"]  # a stack's runs: each its own curves
        assert [s for s, _ in two["val_loss"]] == [1]  # max_epochs 1
    before = snapshot(tmp_path / "results" / "tensorboard")
    assert main.main(argv) == 0
    assert "0 runs to train, 8 already recorded" in "".join(capsys.readouterr())
    assert snapshot(tmp_path / "results" / "tensorboard") == before


@pytest.mark.slow
def test_a_federated_study_is_tracked_by_rounds(small_sweep, tmp_path, capsys):
    """Two rounds of fed_rac_lora, two seeds; the base model is small_sweep's, put in the cache under the key
    federated.py asks for (it trains none)."""
    out, _ = small_sweep
    argv = ["--method", "fed_rac_lora", "--sketch", "left", "--clients", "2", "--participation", "1",
            "--rounds", "2", "--seeds", "0", "1", "--workers", "1", "--progress", "false", "--results_dir",
            str(tmp_path / "r"), "--plots_dir", str(tmp_path / "p"), "--report_to", "tensorboard"]
    base = fed_argv(argv).base_config()
    key = run_hash(base, "cpu", "base", None, None, base.base_seed)
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    shutil.copy(next((out / "results" / "checkpoints").glob("base_*.pt")),
                tmp_path / "r" / "checkpoints" / f"base_{key}.pt")
    assert federated.main(argv) == 0
    assert "base model: loaded" in "".join(capsys.readouterr())
    runs = tracked(tmp_path / "r", FED_PREFIX, FED_RUNS, FED_CURVES)
    assert len(runs) == 2
    for scalars in runs.values():
        assert [s for s, _ in scalars["test_acc_b"]] == [1, 2] and "communicated_mb" in scalars
        assert "final/final_test_acc_b" in scalars


@pytest.mark.slow
def test_a_scratch_study_is_tracked_by_epochs(tmp_path, capsys):
    argv = ["--form", "lowrank", "--ranks", "4", "--seeds", "0", "1", "--hidden", "32", "32", "--max_epochs", "2",
            "--progress", "false", "--results_dir", str(tmp_path / "r"), "--plots_dir", str(tmp_path / "p"),
            "--report_to", "tensorboard"]
    assert scratch.main(argv) == 0
    runs = tracked(tmp_path / "r", scratch.PREFIX, scratch.RUN_COLUMNS, scratch.CURVE_COLUMNS)
    assert len(runs) == 2 and all([s for s, _ in r["val_loss"]] == [1, 2] for r in runs.values())
