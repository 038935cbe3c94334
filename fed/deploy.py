"""Starting, running and stopping Flower for fed/flower.py on this machine: the local simulation federation
or a real deployment (a SuperLink and SuperNodes) on 127.0.0.1. Used by ``python federated.py --engine flower``
(run_on_flower), the tests and bench/bench_fed.py; the README's deployment section gives the same commands for
separate machines.

Every process started here is started by a ``Flower`` context manager that stops it on exit (SIGTERM, then
SIGKILL), whatever happened inside; Flower and Ray are kept off the network (no update checks, telemetry or
usage stats) and inside a temporary home.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
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

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tqdm import tqdm

from engine.results import read_runs
from fed.config import app_run_config, flower_run_config
from fed.study import describe, federation, FLOWER_PREFIX, plan, run_hash, RUN_COLUMNS
from raclora.errors import one_line, RunFailed
from sweep import Sweep

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


def live_with_env(key: str, value: str) -> list[int]:
    """The processes (not yet exited) whose environment holds ``key=value``: a Flower home's own processes,
    the ones that left their process group too (flwr-serverapp, which init adopts when its parent is gone)."""
    want, out = f"{key}={value}".encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if want in (entry / "environ").read_bytes().split(b"\0") and \
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(int(entry.name))
        except OSError:
            continue
    return out


def make_certificates(folder: str | os.PathLike, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                      days: int = 30) -> dict[str, Path]:
    """A certificate authority and a SuperLink certificate it signs for ``hosts`` (IP addresses or names),
    written to ``folder`` as PEM: {"ca": ca.crt, "certificate": superlink.crt, "key": superlink.key}. For tests
    and a first deployment; a real one takes its certificates from the institution's authority."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool, names=()):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if names:
            alt = [x509.IPAddress(ipaddress.ip_address(h)) if h.replace(".", "").isdigit() or ":" in h
                   else x509.DNSName(h) for h in names]
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = certificate("rac-lora-lab CA", ca_key, "rac-lora-lab CA", ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = certificate(hosts[0], key, "rac-lora-lab CA", ca_key, ca=False, names=hosts)
    out = {"ca": folder / "ca.crt", "certificate": folder / "superlink.crt", "key": folder / "superlink.key"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["certificate"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out["key"], key)
    return out


def make_node_key(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (EC P-384, both in OpenSSH's format, as Flower reads them)
    in ``folder``: (private key, public key). The
    public key is registered with the SuperLink (``flwr supernode register``); the node signs with the private one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    _write_private(private, key, serialization.PrivateFormat.OpenSSH)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def _write_private(path: Path, key, form=serialization.PrivateFormat.PKCS8) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption()))
    path.chmod(0o600)


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
        self.port = None  # the deployment SuperLink's port (supernode() joins it)
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

    def _wait_healthy(self, port: int, proc: subprocess.Popen, what: str, ca: Path | None = None) -> None:
        """Until the SuperLink answers /health (over TLS, verified against ``ca``, when it has certificates)."""
        deadline = time.monotonic() + 60
        scheme, opener = "http", DIRECT
        if ca is not None:
            scheme = "https"
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(
                context=ssl.create_default_context(cafile=str(ca))))
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode}: see {self.home}")
            try:
                with opener.open(f"{scheme}://127.0.0.1:{port}/health", timeout=1) as r:
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

    def deployment(self, clients: int, node_config: dict | None = None, secure: dict | None = None) -> "Flower":
        """A SuperLink and ``clients`` SuperNodes (partition-id i of ``clients``, ``node_config`` added).

        ``secure``: {"ca", "certificate", "key"} (make_certificates) and "nodes", one (private, public) key pair
        per SuperNode (make_node_key): TLS on every API of the SuperLink, SuperNode authentication on, each node's
        public key registered (``flwr supernode register``) before it starts; without it, ``--insecure`` (a
        trusted network only)."""
        port = free_port()
        self.port = port
        if secure:
            if len(secure["nodes"]) != clients:
                raise ValueError(f"secure deployment: {len(secure['nodes'])} node keys for {clients} SuperNodes")
            tls = ["--ssl-ca-certfile", str(secure["ca"]), "--ssl-certfile", str(secure["certificate"]),
                   "--ssl-keyfile", str(secure["key"]), "--enable-supernode-auth"]
        else:
            tls = ["--insecure"]
        link = self._start([_bin("flower-superlink"), *tls, "--host", "127.0.0.1", "--port", str(port),
                            "--disable-runtime-dependency-installation"], "superlink.log")
        self._wait_healthy(port, link, "the SuperLink", ca=secure["ca"] if secure else None)
        if secure:
            self._write_connection("deployment", f'address = "127.0.0.1:{port}"\nroot-certificates = "{secure["ca"]}"')
            for _, public in secure["nodes"]:
                self.register(public)
        else:
            self._write_connection("deployment", f'address = "127.0.0.1:{port}"\ninsecure = true')
        for i in range(clients):
            self.supernode({"partition-id": i, "num-partitions": clients, **(node_config or {})},
                           key=secure["nodes"][i][0] if secure else None, ca=secure["ca"] if secure else None,
                           log=f"supernode{i}.log")
        return self

    def register(self, public_key: str | os.PathLike) -> None:
        """Register a SuperNode's public key with this deployment's SuperLink (only registered nodes may join)."""
        self._flwr("supernode", "register", str(public_key), self.connection)

    def supernode(self, node_config: dict, key: str | os.PathLike | None = None, ca: str | os.PathLike | None = None,
                  log: str = "supernode.log") -> subprocess.Popen:
        """One more SuperNode of this deployment: over TLS (``ca``: the certificate it verifies the SuperLink's
        against) with its authentication ``key``, or ``--insecure`` when neither is given."""
        how = ([*(["--root-certificates", str(ca)] if ca else []),
                *(["--auth-supernode-private-key", str(key)] if key else [])] if (ca or key) else ["--insecure"])
        return self._start([_bin("flower-supernode"), *how, "--superlink", f"127.0.0.1:{self.port}", "--host",
                            "127.0.0.1", "--port", str(free_port()), "--node-config", run_config_arg(node_config)], log)

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
        exits 0 even when the run fails; ``status-details``: why it failed), with the run's log under "log"."""
        return self.wait(self.submit(run_config))

    def submit(self, run_config: dict) -> int:
        """Start a run (``flwr run``) and return its run id at once."""
        if self.connection is None:
            raise RuntimeError("start a federation first: simulation(...) or deployment(...)")
        extra = ["--federation-config", self.federation_config] if self.federation_config else []
        out = self._flwr("run", str(ROOT), self.connection, "--run-config", run_config_arg(run_config), *extra,
                         "--format", "json")
        reply = json.loads(out[out.index("{"):])
        if not reply.get("success", True) or "run-id" not in reply:
            raise RuntimeError(f"flwr run was refused: {reply.get('error-message') or reply}")
        return int(reply["run-id"])

    def log(self, run_id: int) -> str:
        """The run's log so far (the ServerApp's output, a failure's line)."""
        try:
            return self._flwr("log", str(run_id), self.connection, "--show", timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return f"(no log: {e})"

    def wait(self, run_id: int) -> dict:
        """Wait for run ``run_id`` to finish (at most ``timeout`` seconds: TimeoutError; the SuperLink gone:
        RuntimeError) and return its final ``flwr ls`` entry with its log. One ``flwr log --stream`` follows the
        run to its end (a process per look would keep a core busy on a small machine); ``flwr ls`` then says how
        it ended."""
        deadline = time.monotonic() + self.timeout
        path = self.home / f"run_{run_id}.log"
        with open(path, "wb") as out:
            stream = subprocess.Popen([_bin("flwr"), "log", str(run_id), self.connection, "--stream"], env=self.env,
                                      cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                self._check_link(run_id, deadline)
                try:
                    run = self._status(run_id) if stream.poll() is not None else None
                except RuntimeError:
                    self._check_link(run_id, deadline)  # the SuperLink went meanwhile: say that
                    raise
                if run is not None and run["status"].startswith("finished"):
                    break
                time.sleep(0.5 if run is None else 2)  # the stream ended before the run did: look now and then
        finally:
            if stream.poll() is None:
                os.killpg(stream.pid, signal.SIGKILL)
            stream.wait()
        run["log"] = path.read_text(errors="replace")
        if "Final results" not in run["log"] and run["status"] != "finished:completed":
            run["log"] = self.log(run_id)  # the stream may miss a failure's last lines
        return run

    def _status(self, run_id: int) -> dict:
        """The run's entry of ``flwr ls``; RuntimeError (one line) when the SuperLink does not give it."""
        out = self._flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json")
        listing = json.loads(out[out.index("{"):]) if "{" in out else {}
        if not listing.get("runs"):
            raise RuntimeError(f"flwr ls gave no run {run_id}: {listing.get('error-message') or out.strip()[-300:]}")
        return listing["runs"][0]

    def _check_link(self, run_id: int, deadline: float) -> None:
        link = self.procs[0]  # a SuperNode that exits is the run's to handle (it fails, or goes on without it)
        if link.poll() is not None:
            raise RuntimeError(f"the SuperLink exited ({link.args[0]}, code {link.returncode}) during run "
                               f"{run_id}: see {self.home}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still not finished after {self.timeout:.0f} s: see {self.home}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.home.glob("*.log")))

    def stop(self) -> None:
        """SuperNodes first, then the SuperLink (each with its process group: their ClientApp, ServerApp and
        Ray processes too); SIGKILL after 10 s; then every process of this Flower home, in those groups or not (a
        flwr-serverapp init adopted); returns when none is left."""
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
        while (left := live_in_groups(groups) + live_with_env("FLWR_HOME", str(self.home))) and \
                time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        self.procs = []
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


# --- python federated.py --engine flower ---------------------------------------------------------------------
def run_on_flower(cfg, commit: str) -> list[dict]:
    """Every run of ``cfg``'s plan not yet recorded, each as one Flower run (fed/flower.py, ``flwr run``) on a
    local federation of ``cfg.clients`` SuperNodes that this process starts on free ports of 127.0.0.1 in a
    private Flower home, and stops when done, whatever happened. The base model is trained (or loaded) here
    first, as federated.py does, so that the ServerApp loads it. A run that does not finish ("finished:failed",
    "finished:stopped", or past its time) raises RunFailed (one line: the run, Flower's status and why, where
    the logs are kept). Returns this invocation's fed_flower_runs.csv rows."""
    t0 = time.perf_counter()
    sweep = Sweep(cfg.base_config(), commit)
    federation(cfg, sweep.tasks)  # a split that cannot be made stops here, before any Flower process
    sweep.base_model()  # trained or loaded, and saved where the ServerApp looks for it
    dev = sweep.device.type
    runs_csv = Path(cfg.results_dir) / f"{FLOWER_PREFIX}runs.csv"
    done = {r["config_hash"] for r in read_runs(runs_csv, RUN_COLUMNS) if r["status"] is not None} if cfg.resume else set()
    planned = {run_hash(cfg, dev, **spec): spec for spec in plan(cfg)}
    todo = {key: spec for key, spec in planned.items() if key not in done}
    tqdm.write(f"{len(todo)} Flower runs to make, {len(planned) - len(todo)} already recorded in {runs_csv}")
    if not todo:
        return []
    paths = {key: str(Path(getattr(cfg, key.replace("-", "_"))).resolve()) for key in ("data-dir", "results-dir", "plots-dir")}
    home = Path(tempfile.mkdtemp(prefix="raclora-flwr-"))
    # a run's time: its rounds at most the round timeout each, the nodes' wait, the apps' start
    engine = app_run_config()
    limit = engine["node-timeout"] + (cfg.rounds + 1) * engine["timeout"] + 120
    try:
        with Flower(home / "home", timeout=limit) as fl:
            fl.simulation(clients=cfg.clients, cpus_per_client=1)
            for i, spec in enumerate(todo.values(), 1):
                t = time.perf_counter()
                tqdm.write(f"Flower run {i}/{len(todo)}: {describe(spec)} ({cfg.rounds} rounds, {cfg.clients} SuperNodes)")
                run = fl.run({**flower_run_config(cfg, spec), **paths})
                if run["status"] != "finished:completed":
                    why = (run.get("status-details") or "").replace("ServerApp failed with exception: ", "")
                    raise RunFailed(f"Flower run {describe(spec)} ended {run['status']}: {why or 'no reason given'} "
                                    f"(logs kept in {home})")
                tqdm.write(f"  finished in {time.perf_counter() - t:.1f} s")
    except RunFailed:
        raise
    except (TimeoutError, RuntimeError) as e:
        raise RunFailed(f"{one_line(str(e))} (logs kept in {home})") from None
    shutil.rmtree(home, ignore_errors=True)
    tqdm.write(f"Flower study finished in {time.perf_counter() - t0:.1f} s")
    return [r for r in read_runs(runs_csv, RUN_COLUMNS) if r["config_hash"] in todo]  # what the ServerApps wrote
