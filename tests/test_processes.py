"""Processes: main.py's worker processes die with their parent however it dies (SIGKILL, SIGTERM), and a
writer killed mid-write leaves a temporary file that the next run removes (and only that one).

Linux-only where it reads /proc. The base model trains once, in the module fixture (its checkpoint in
the shared results folder is reused by every main.py below); the workers then train runs of 10 epochs,
three each, far longer than any test waits.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")

# The workers' runs: 10 epochs each, about 5 s of CPU per run or more, three a worker, so that killing the
# parent always finds both workers training (the base model trains 10 epochs too: 30 took 140 s in CI).
SWEEP = ["--workers", "2", "--stack_size", "1", "--method", "lora", "--ranks", "1", "--seeds", *map(str, range(6)),
         "--run_fpft", "false", "--max_epochs", "10", "--progress", "false"]
# A worker's start-up before the pool's initializer runs (spawn: import torch and this project) costs
# about 2 s of CPU, loading the data about 3 s more. Past this much CPU time each, both are training.
TRAINING_CPU_S = 5.0
GONE_WITHIN_S = 3.0


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One results folder for every test here, with the base model's checkpoint already in it."""
    out = tmp_path_factory.mktemp("processes")
    args = [*SWEEP, "--results_dir", str(out / "results"), "--plots_dir", str(out / "plots")]
    code = ("import sys; from config import from_argv; from sweep import Sweep; "
            "Sweep(from_argv(sys.argv[1:]), 'test').base_model()")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert list((out / "results" / "checkpoints").glob("base_*.pt"))
    return out, args


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status waits for init, which need not reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_gone(pids: list[int], within: float) -> list[int]:
    """The pids still running after ``within`` seconds (returns as soon as none is)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(map(running, pids)):
        time.sleep(0.02)
    return [p for p in pids if running(p)]


def kill_running(pids: list[int]) -> None:
    """SIGKILL those of ``pids`` (processes this test started) that still run: a failed test leaves none."""
    for pid in pids:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def start_training(shared, log: Path) -> tuple[subprocess.Popen, list[int]]:
    """main.py on two workers, returned once both workers are past start-up, training; and every
    child process it has then (the workers and multiprocessing's resource tracker). Its output goes
    to files (``log``.out, ``log``.err), not pipes: the workers inherit them, and a pipe would not
    close before the last of them is gone."""
    _, args = shared
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, stdout=out, stderr=err)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        workers = [c for c in children(proc.pid) if "spawn_main" in cmdline(c)]
        if len(workers) == 2 and all(cpu_seconds(w) >= TRAINING_CPU_S for w in workers):
            return proc, children(proc.pid)
        if proc.poll() is not None:
            pytest.fail(f"main.py ended before its workers trained: {Path(f'{log}.err').read_text()}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail("main.py's two workers did not start training within 240 s")


@pytest.mark.slow
def test_workers_die_at_once_when_the_parent_is_killed(shared, tmp_path):
    """SIGKILL: no handler of the parent runs; the kernel kills the workers (PR_SET_PDEATHSIG). Before,
    they trained on until their run ended (8-40 s here, with the load), then failed to send the result."""
    proc, kids = start_training(shared, tmp_path / "main")
    assert len(kids) >= 2 and all(map(running, kids))
    try:
        proc.kill()
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert wait_gone(kids, GONE_WITHIN_S) == [], [cmdline(p) for p in kids if running(p)]
    finally:
        kill_running(kids)


@pytest.mark.slow
def test_sigterm_stops_workers_and_says_so_in_one_line(shared, tmp_path):
    """SIGTERM: cli.Terminated stops the pool; one line, exit 143, and no warning from multiprocessing's
    resource tracker about semaphores that terminated workers leaked (tqdm's lock, before)."""
    proc, kids = start_training(shared, tmp_path / "main")
    try:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        assert wait_gone(kids, GONE_WITHIN_S) == [], [cmdline(p) for p in kids if running(p)]
    finally:
        kill_running([proc.pid, *kids])
    out, err = (tmp_path / "main.out").read_text(), (tmp_path / "main.err").read_text()
    assert code == 143, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("terminated:") and "runs.csv" in lines[0], err
    assert "Traceback" not in out + err


# The worker's side, without the pool: a process that armed _die_with_parent either way (prctl, poll),
# started by an intermediate process that the test then kills.
_CHILD = textwrap.dedent("""
    import os, sys, time
    import engine.runner as runner
    how = runner._die_with_parent(int(sys.argv[1]), use_prctl=sys.argv[2] == "prctl")
    os.write(1, f"{how}\\n".encode())  # one write: the two children share the pipe
    time.sleep(120)
""")
_MIDDLE = textwrap.dedent("""
    import os, subprocess, sys, time
    kids = [subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), how]) for how in ("prctl", "poll")]
    print(" ".join(str(k.pid) for k in kids), flush=True)
    time.sleep(120)
""")


@pytest.mark.slow
def test_die_with_parent_by_prctl_and_by_polling():
    middle = subprocess.Popen([sys.executable, "-c", _MIDDLE, _CHILD], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    kids = []
    try:
        kids += [int(p) for p in middle.stdout.readline().split()]
        armed = [middle.stdout.readline().strip() for _ in kids]  # each child prints how, once armed
        assert sorted(armed) == ["poll", "prctl"]
        assert all(map(running, kids))
        middle.kill()
        middle.wait(timeout=30)
        # prctl: at once; polling: within one period (0.5 s)
        assert wait_gone(kids, GONE_WITHIN_S) == []
    finally:
        middle.kill()
        kill_running(kids)


def test_worker_whose_parent_already_died_exits_at_once():
    """The race the prctl cannot close: the parent died while the worker was starting (seconds)."""
    code = "import os, runner; runner._die_with_parent(os.getppid() + 10 ** 6); print('still here')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "still here" not in proc.stdout, proc.stderr


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from raclora.files import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half a figure")
        os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.slow
def test_next_run_removes_a_killed_writers_temp_file_and_keeps_a_live_ones(shared):
    out, args = shared
    plots = out / "plots"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(plots / "x.png")], cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (left,) = plots.glob("x.png.*.tmp")  # x.png.<pid>.<random>.tmp, its writer dead
    assert left.read_bytes() == b"half a figure" and not (plots / "x.png").exists()
    live = plots / f"y.png.{os.getpid()}.abc123.tmp"  # a writer that is alive: this process
    live.write_bytes(b"being written")
    ckpt_live = out / "results" / "checkpoints" / f"base.pt.{os.getpid()}.zz.tmp"
    ckpt_live.write_bytes(b"being written")
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "--plots-only", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not left.exists()
    assert live.read_bytes() == b"being written" and ckpt_live.exists()
