"""Starting, running and stopping Flower for fed/flower.py on this machine: the local simulation federation
or a real deployment (a SuperLink and SuperNodes) on 127.0.0.1. Used by the tests and bench/bench_fed.py;
the README's deployment section gives the same commands for separate machines.

Every process started here is started by a ``Flower`` context manager that stops it on exit (SIGTERM, then
SIGKILL), whatever happened inside; Flower and Ray are kept off the network (no update checks, telemetry or
usage stats) and inside a temporary home.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the Flower app's project folder (pyproject.toml)
QUIET = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
         "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


# Straight to 127.0.0.1, whatever proxy the environment names (urlopen's global opener keeps the proxies it saw
# first, a test's fake one included)
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_dirs() -> list[str]:
    """Where the running Python's console scripts are: beside sys.executable (an unactivated venv's bin/),
    then sysconfig's scripts folder."""
    return list(dict.fromkeys([str(Path(sys.executable).parent), sysconfig.get_path("scripts")]))


def _bin(name: str) -> str:
    """A console script of the running Python's environment (flwr, flower-superlink, flower-supernode): the one
    in script_dirs(), else the one on PATH; FileNotFoundError (one line, naming where it looked) if neither."""
    for folder in script_dirs():
        if found := shutil.which(name, path=folder):
            return found
    if found := shutil.which(name):
        return found
    raise FileNotFoundError(f"no {name} script beside {sys.executable} (looked in {', '.join(script_dirs())}) "
                            f"nor on PATH: install flwr into this environment (pip install -r requirements.txt)")


def live_in_groups(groups: list[int]) -> list[int]:
    """The processes (not yet exited: zombies aside) whose process group is one of ``groups`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) in groups:  # state, ppid, pgrp
            out.append(int(entry.name))
    return out


def run_config_arg(run_config: dict) -> str:
    """``--run-config`` text: TOML values (strings quoted)."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in run_config.items())


class Flower:
    """A Flower home in ``home`` and the processes of one federation on 127.0.0.1.

    ``simulation(clients)``: a simulation SuperLink that ``flwr run`` uses for its local federation
    (``clients`` virtual SuperNodes, one CPU each). ``deployment(clients)``: a SuperLink and one SuperNode
    per client (``partition-id`` i of ``clients``). ``run(run_config)`` then runs the app and returns Flower's
    final status of the run. Leaving the ``with`` block stops every process started."""

    def __init__(self, home: str | os.PathLike, timeout: float = 600):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.procs: list[subprocess.Popen] = []
        self.connection = None
        self.federation_config = None  # the simulation's size and resources (flwr run --federation-config)
        # Ray's sockets need a short path (107 bytes at most): a folder of /tmp of its own, removed by stop()
        self.ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        self.env = {**os.environ, **QUIET, "FLWR_HOME": str(self.home), "RAY_TMPDIR": self.ray_tmp,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    # so that Flower's own processes (flower-superexec, flwr-serverapp, ...) find its scripts too
                    "PATH": os.pathsep.join(dict.fromkeys(filter(None, [
                        *script_dirs(), *os.environ.get("PATH", "").split(os.pathsep)])))}
        for key in ("NO_PROXY", "no_proxy"):  # Flower's CLI and processes talk to 127.0.0.1 directly
            self.env[key] = ",".join(filter(None, [self.env.get(key), "127.0.0.1", "localhost"]))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(self.home / log, "wb")
        p = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.home,
                             start_new_session=True)
        out.close()
        self.procs.append(p)
        return p

    def _wait_healthy(self, port: int, proc: subprocess.Popen, what: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode}: see {self.home}")
            try:
                with DIRECT.open(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{what} did not answer on 127.0.0.1:{port} within 60 s: see {self.home}")

    def _write_connection(self, name: str, body: str) -> None:
        (self.home / "config.toml").write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n{body}\n')
        self.connection = name

    def simulation(self, clients: int, cpus_per_client: int = 1) -> "Flower":
        http, control = free_port(), free_port()
        self.env.update(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http), FLWR_LOCAL_CONTROL_API_PORT=str(control))
        link = self._start([_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                            "--control-api-address", f"127.0.0.1:{control}", "--host", "127.0.0.1",
                            "--port", str(http), "--disable-runtime-dependency-installation"], "superlink.log")
        self._wait_healthy(http, link, "the simulation SuperLink")
        self._write_connection("local", 'address = ":local:"')
        self.federation_config = (f"num_supernodes={clients} client_resources_num_cpus={cpus_per_client} "
                                  f"init_args_num_cpus={os.cpu_count() or 1}")
        return self

    def deployment(self, clients: int, node_config: dict | None = None) -> "Flower":
        port = free_port()
        link = self._start([_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                            "--disable-runtime-dependency-installation"], "superlink.log")
        self._wait_healthy(port, link, "the SuperLink")
        extra = run_config_arg(node_config or {})
        for i in range(clients):
            self._start([_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--host",
                         "127.0.0.1", "--port", str(free_port()), "--node-config",
                         f"partition-id={i} num-partitions={clients} {extra}".strip()], f"supernode{i}.log")
        self._write_connection("deployment", f'address = "127.0.0.1:{port}"\ninsecure = true')
        return self

    def _flwr(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([_bin("flwr"), *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args[:2])} failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()[-2000:]}")
        return done.stdout

    def run(self, run_config: dict) -> dict:
        """``flwr run . <connection> --run-config ...``, then wait for the run to finish; returns its final
        entry of ``flwr ls`` (``status`` is "finished:completed" when it succeeded: ``flwr run`` itself
        exits 0 even when the run fails), with the run's log under "log"."""
        if self.connection is None:
            raise RuntimeError("start a federation first: simulation(...) or deployment(...)")
        extra = ["--federation-config", self.federation_config] if self.federation_config else []
        out = self._flwr("run", str(ROOT), self.connection, "--run-config", run_config_arg(run_config), *extra,
                         "--format", "json")
        reply = json.loads(out[out.index("{"):])
        if not reply.get("success", True) or "run-id" not in reply:
            raise RuntimeError(f"flwr run was refused: {reply.get('error-message') or reply}")
        run_id = reply["run-id"]
        deadline = time.monotonic() + self.timeout
        while True:
            listing = json.loads(self._flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json"))
            run = listing["runs"][0]
            if run["status"].startswith("finished"):
                try:  # the run's own log (the ServerApp's output, a failure's traceback)
                    run["log"] = self._flwr("log", str(run_id), self.connection, "--show", timeout=60)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    run["log"] = f"(no log: {e})"
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {run['status']} after {self.timeout:.0f} s: see {self.home}")
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Flower process exited ({p.args[0]}, code {p.returncode}): see {self.home}")
            time.sleep(1)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.home.glob("*.log")))

    def stop(self) -> None:
        """SuperNodes first, then the SuperLink (each with its process group: their ClientApp, ServerApp and
        Ray processes too); SIGKILL after 10 s; returns when no process of those groups is left."""
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the group's leftovers too (ClientApp processes, Ray workers)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
        groups = [p.pid for p in self.procs]
        deadline = time.monotonic() + 10
        while (left := live_in_groups(groups)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        self.procs = []
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
