"""A disk that refuses a write (full, over quota, file too large) while the suite writes results, a checkpoint or a
figure (issue 20): one line that names the file and the space it needed, exit 2, and the old file kept."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest
import torch

from engine.results import read_results
from raclora.errors import OutputError
from sweep import CURVE_COLUMNS, RUN_COLUMNS
from raclora.files import atomic_write, atomic_write_via
from tests.conftest import ROOT
from tests.test_cli import assert_one_line_error


@pytest.fixture
def full_disk(monkeypatch):
    """The disk is full: the suite's writes fail where a full disk shows at the latest (fsync)."""
    def refuse(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", refuse)


def test_a_full_disk_keeps_the_old_file_and_says_what_it_needed(tmp_path, full_disk):
    path = tmp_path / "runs.csv"
    path.write_text("old\n")
    with pytest.raises(OutputError) as e:
        atomic_write(path, "x" * 3000)
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert str(path) in message and "No space left on device" in message and "needs 2.9 kB" in message
    assert "previous file is kept" in message and "free there" in message
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["runs.csv"]  # no temporary left


def test_a_checkpoint_on_a_full_disk(tmp_path, full_disk):
    import sweep
    from config import Config
    from train import Record

    path = tmp_path / "base.pt"
    with pytest.raises(OutputError, match="could not write .*base.pt .*nothing was written"):
        sweep.save_checkpoint(path, torch.nn.Linear(3, 2), Record(), Config())
    assert not path.exists() and not list(tmp_path.iterdir())


def test_a_figure_on_a_full_disk(tmp_path, full_disk):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from theory.central import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    (tmp_path / "f.png").write_bytes(b"old")
    with pytest.raises(OutputError, match="could not write .*f.png"):
        save_figure(fig, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").read_bytes() == b"old"


def test_a_source_that_cannot_be_read_is_not_called_a_full_disk(tmp_path):
    """Only the disk's refusals of a write become OutputError; another OSError in the writer goes on as it is."""
    def broken(f):
        raise OSError("not a gzip file")
    with pytest.raises(OSError, match="not a gzip file") as e:
        atomic_write_via(tmp_path / "x", broken)
    assert not isinstance(e.value, OutputError)


LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _limited(limit: int, *args) -> subprocess.CompletedProcess:
    """main.py with every file it writes limited to ``limit`` bytes (RLIMIT_FSIZE): a real refused write."""
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), str(ROOT / "main.py"), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_main_on_a_disk_that_refuses_its_writes(small_sweep, tmp_path):
    out, args = small_sweep
    results, plots = tmp_path / "results", tmp_path / "plots"
    shutil.copytree(out / "results", results)
    shutil.copytree(out / "plots", plots)
    args = [results if a == out / "results" else plots if a == out / "plots" else a for a in args]
    before = {p.name: p.read_bytes() for p in plots.iterdir()}
    proc = _limited(1000, *args, "--plots-only")  # every figure is bigger than 1000 bytes
    assert_one_line_error(proc, f"could not write {plots}")
    assert "File too large" in proc.stderr and "previous file is kept" in proc.stderr
    assert {p.name: p.read_bytes() for p in plots.iterdir()} == before
    runs_csv = (results / "runs.csv").read_bytes()
    seen = read_results(results, "", RUN_COLUMNS, CURVE_COLUMNS)
    limit = len(runs_csv) + 100  # room for the curve rows of one more run, not for its runs row
    seeds = args.index("--seeds")
    proc = _limited(limit, *args[:seeds + 1], "0", "1", "2", *args[seeds + 3:])
    assert_one_line_error(proc, f"could not write {results / 'runs.csv'}")
    assert (results / "runs.csv").read_bytes() == runs_csv  # nothing lost, nothing half-written
    assert read_results(results, "", RUN_COLUMNS, CURVE_COLUMNS) == seen  # the new run's curves never landed
    assert not list(results.glob("*.tmp"))
