"""The Ray executor (engine/cluster.py): main.py's sweep as Ray tasks on a cluster the test starts on this machine
(a head node without CPUs and two worker nodes, each `ray start --block` in a process group of its own, in a
private Ray temp folder, stopped by the test), against the local executor's rows; a worker node killed while it
trains a stack;
and the settings' one-line refusals.

Ray advertises a node by the machine's own address even when told 127.0.0.1 (ray._private.services.
resolve_ip_for_localhost), so the nodes talk over this machine's interface; nothing leaves the machine.
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from config import Config
from engine.cluster import check_address
from fed.config import FedConfig
from fed.deploy import free_port, live_in_groups
from raclora.errors import ConfigError
from tests.conftest import ROOT
from tests.ray_toy import Failing

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")

# 6 runs of 4 epochs, one a stack of a few seconds, 2 at a time (as the local executor's 2 workers)
SWEEP = ["--method", "lora", "--ranks", "1", "--seeds", *map(str, range(6)), "--stack_size", "1", "--workers", "2",
         "--run_fpft", "false", "--max_epochs", "4", "--progress", "false"]
# what a run's result is, as the runs and curves files record it (when, where and how long are left out)
RESULT = ("config_hash", "method", "sketch", "rank", "seed", "status", "trainable_params", "epochs", "best_epoch",
          "best_val_loss", "test_acc_b", "test_acc_a", "test_loss_b", "test_loss_a", "merges")
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
START_S = 90  # a node that is not up in this time on this 2-core machine has failed


def ray_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts", *args]


def main_py(out: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *SWEEP, "--results_dir", str(out / "results"),
                           "--plots_dir", str(out / "plots"), *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **RAY_ENV})


def results(out: Path) -> tuple[list[tuple], list[dict]]:
    with open(out / "results" / "runs.csv", newline="") as f:
        runs = sorted(tuple(r[k] for k in RESULT) for r in csv.DictReader(f) if r["method"] == "lora")
    with open(out / "results" / "curves.csv", newline="") as f:
        curves = sorted((r["config_hash"], int(r["epoch"]), r["val_loss"], r["test_acc_b"]) for r in csv.DictReader(f)
                        if r["method"] == "lora")
    return runs, curves


def recorded(out: Path) -> int:
    """The adapter runs in the results folder's runs.csv now (it is replaced atomically: never half written)."""
    try:
        with open(out / "results" / "runs.csv", newline="") as f:
            return sum(r["method"] == "lora" for r in csv.DictReader(f))
    except OSError:
        return 0


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


class RayCluster:
    """A head node without CPUs (it schedules, it trains nothing) and worker nodes of one CPU each, added by
    add_worker(), on this machine; stop() ends every node's process group."""

    def __init__(self, temp: Path, logs: Path):
        self.port, self.logs = free_port(), logs
        self.env = {**os.environ, **RAY_ENV}
        self.common = ["--block", "--object-store-memory", str(100 * 2 ** 20), "--disable-usage-stats"]
        self.head = subprocess.Popen(ray_cli("start", "--head", "--port", str(self.port), "--include-dashboard",
                                             "false", "--temp-dir", str(temp), "--num-cpus", "0", *self.common),
                                     start_new_session=True, stdout=open(self.logs / "head.log", "w"),
                                     stderr=subprocess.STDOUT, env=self.env)
        self.workers: list[subprocess.Popen] = []
        self._wait(lambda: self._accepts(), "the head node")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add_worker(self) -> subprocess.Popen:
        """Start a worker node of one CPU (without waiting for it: wait_nodes does)."""
        n = len(self.workers)
        self.workers.append(subprocess.Popen(ray_cli("start", "--address", self.address, "--num-cpus", "1",
                                                     *self.common), start_new_session=True,
                                             stdout=open(self.logs / f"worker{n}.log", "w"),
                                             stderr=subprocess.STDOUT, env=self.env))
        return self.workers[-1]

    def wait_nodes(self, n: int) -> None:
        self._wait(lambda: self.alive_nodes() == n, f"{n} nodes")

    def _accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def _wait(self, ready, what: str) -> None:
        t0 = time.monotonic()
        while not ready():
            if time.monotonic() - t0 > START_S or any(p.poll() is not None for p in self.nodes):
                self.stop()
                pytest.fail(f"{what} did not start: {(self.logs / 'head.log').read_text()[-2000:]}")
            time.sleep(0.5)

    @property
    def nodes(self) -> list[subprocess.Popen]:
        return [self.head, *self.workers]

    def alive_nodes(self) -> int:
        proc = subprocess.run(ray_cli("status", "--address", self.address), capture_output=True, text=True,
                              timeout=60, env=self.env)
        return proc.stdout.count("node_") if proc.returncode == 0 else 0

    @staticmethod
    def training(node: subprocess.Popen) -> list[int]:
        """The node's processes that are training a stack now (Ray titles them after the task)."""
        return [pid for pid in live_in_groups([node.pid]) if title(pid).startswith("ray::_train_stack")]

    @staticmethod
    def kill(node: subprocess.Popen) -> None:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait(30)

    def stop(self) -> None:
        for p in reversed(self.nodes):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.nodes):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)
        groups = [p.pid for p in self.nodes]
        deadline = time.monotonic() + 30
        while live_in_groups(groups) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in live_in_groups(groups):  # a process of the node that outlived its group's SIGTERM
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_sweep_on_two_ray_nodes_equals_the_local_executor_and_survives_a_worker_node_killed(tmp_path):
    """The same sweep three ways would cost a minute more: the Ray sweep that loses a worker node mid-stack must give
    the local executor's rows (same stacks, one thread per stack in both), each run once, trained on both worker
    nodes."""
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    proc = main_py(local)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (on_ray / "results").mkdir(parents=True)
    shutil.copytree(local / "results" / "checkpoints", on_ray / "results" / "checkpoints")  # the same base model
    t0 = time.monotonic()
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    cluster = RayCluster(temp, tmp_path)
    first = cluster.add_worker()
    cluster.wait_nodes(2)
    started_s = time.monotonic() - t0
    try:
        log = open(tmp_path / "driver.log", "w")
        driver = subprocess.Popen([sys.executable, "main.py", *SWEEP, "--results_dir", str(on_ray / "results"),
                                   "--plots_dir", str(on_ray / "plots"), "--executor", "ray", "--ray_address",
                                   cluster.address], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, **RAY_ENV})

        def wait_for(ready, what: str) -> None:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and driver.poll() is None and not ready():
                time.sleep(0.1)
            assert driver.poll() is None and ready(), f"the sweep ended (or stalled) before {what}"

        # the first worker node is the only one with a CPU: the first stack recorded is its own. It is killed while it
        # trains the next; then a second worker node joins, and the killed stack is retried there with the rest (so
        # "trained on 2 nodes" does not hang on which node is quicker)
        wait_for(lambda: recorded(on_ray) >= 1, "the first worker node returned a stack")
        wait_for(lambda: recorded(on_ray) < 6 and cluster.training(first), "the first worker node trained again")
        killed_at = time.monotonic() - t0
        cluster.kill(first)
        cluster.add_worker()  # the driver waits for it: Ray keeps the retried task until a node has a CPU
        code = driver.wait(300)
        log.close()
        out = (tmp_path / "driver.log").read_text()
        assert code == 0, out[-3000:]
        assert "retries remaining, so the task will be retried" in out, out[-3000:]  # Ray's own word for it
        assert "ray: 6 stacks trained on 2 nodes" in out, out[-3000:]
    finally:
        cluster.stop()
        shutil.rmtree(temp, ignore_errors=True)
    assert not live_in_groups([p.pid for p in cluster.nodes]), "a Ray process outlived the test"
    with open(on_ray / "results" / "runs.csv", newline="") as f:
        hashes = [r["config_hash"] for r in csv.DictReader(f) if r["method"] == "lora"]
    assert len(hashes) == len(set(hashes)) == 6  # every run once: none lost, none written twice
    assert results(on_ray) == results(local)
    print(f"ray cluster up in {started_s:.1f} s; worker node killed at {killed_at:.1f} s; "
          f"sweep done at {time.monotonic() - t0:.1f} s")


def test_ray_settings_are_refused_in_one_line_before_any_compute(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="ray_address is a setting of --executor ray, not of --executor local"):
        Config(ray_address="auto")
    with pytest.raises(ConfigError, match="ray_cpus, ray_retries are settings of --executor ray"):
        Config(ray_cpus=2, ray_retries=0)
    with pytest.raises(ConfigError, match="engine flower runs each federated run on a Flower federation"):
        FedConfig(engine="flower", executor="ray")
    with pytest.raises(ConfigError, match="unknown executor .slurm.; allowed: local, ray"):
        Config(executor="slurm")
    t0 = time.monotonic()
    nobody = f"127.0.0.1:{free_port()}"
    proc = main_py(tmp_path, "--executor", "ray", "--ray_address", nobody)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"no Ray head node answers at {nobody}" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "results" / "checkpoints").exists()  # refused before the base model was trained
    assert time.monotonic() - t0 < 60
    with pytest.raises(ConfigError, match="ray_address must be '', 'auto' or host:port, got '6379'"):
        check_address("6379")
    monkeypatch.setenv("RAY_ADDRESS", nobody)  # where "auto" looks first (Ray's own lookup)
    with pytest.raises(ConfigError, match=f"no Ray head node answers at .*:{nobody.rpartition(':')[2]} "):
        check_address("auto")  # Ray names this machine by its own address, not 127.0.0.1


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "die"])
def test_a_failing_stack_ends_the_ray_sweep_in_one_line_and_keeps_the_finished_ones(tmp_path, how):
    """On a Ray instance of this process: the study's own error arrives as itself (not retried: it is no system
    failure); a worker that dies past ray_retries is a RunFailed line. The stacks that returned are recorded."""
    from types import SimpleNamespace

    import torch

    from engine.results import read_rows
    from engine.runner import Study, run_study
    from raclora.errors import RunFailed

    columns = {"name": str, "seed": int, "test_acc": float, "config_hash": str, "code_fingerprint": str,
               "device": str}
    study = Study(plan=[dict(name="toy", seed=s) for s in range(3)], run_hash=lambda s: f"toy-{s['seed']}",
                  stack_key=lambda s: (), make_trainer=Failing, code=__name__, trainer_args=(how,),
                  run_columns=columns, curve_columns={"config_hash": str, "epoch": int, "test_acc": float},
                  order=lambda specs: specs[0]["seed"])  # seed 0 first: recorded before seed 1 fails
    cfg = SimpleNamespace(results_dir=str(tmp_path), resume=True, resume_any_code=False, workers=3, stack_size=1,
                          progress=False, report_to="none", executor="ray", ray_address="", ray_cpus=1,
                          ray_retries=1)
    expected = (ConfigError, "the study's own one-line error") if how == "raise" else (
        RunFailed, r"a stack of 1 run failed on Ray \(WorkerCrashedError: .*\), with up to 1 retry; the finished")
    with pytest.raises(expected[0], match=expected[1]):
        run_study(study, cfg, torch.device("cpu"))
    assert 0 in [r["seed"] for r in read_rows(tmp_path / "runs.csv", columns)]
