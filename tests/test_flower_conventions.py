"""Federated runs the way Flower users run them (issue 23): a bare `flwr run .` that finishes with Flower's
summary showing central evaluation and a saved model; `python federated.py --engine flower`, which exits
non-zero with one line when a run fails and does not meet another such command on the same machine; failures
that end runs in bounded time (or, tolerated, a round that goes on without the node); a secure deployment (TLS,
registered SuperNodes only). Every process a test starts is stopped by it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.test_flower import _groups_gone, _home_left, _setup, assert_deployment_records, DATA, ROOT

pytestmark = pytest.mark.slow


def _records(rc) -> list[dict]:
    return json.loads(Path(rc["records"]).read_text())


def test_failures_end_runs_in_bounded_time_with_one_line(tmp_path):
    """On a real deployment (a SuperLink and 2 SuperNodes on 127.0.0.1, insecure): a bad value fails the run at
    once, in one line; a run asking for more nodes than connect fails after node-timeout; a SuperNode killed
    mid-run is tolerated (tolerate=1: the rounds go on without it, and their records say so); then, with
    tolerate=0, the node it lost ends the next run naming the round and the client. Nothing is left running."""
    from fed.deploy import Flower

    # a round waits 45 s for its replies: with the whole suite on 2 cores, a ClientApp's start-up alone took 30 s
    rc, _ = _setup(tmp_path, rounds=3, timeout=45, **{"node-timeout": 5})
    with Flower(tmp_path / "flwr", timeout=240) as fl:
        fl.deployment(clients=2)
        groups = [p.pid for p in fl.procs]

        bad = fl.run({**rc, "method": "fedprox"})
        assert bad["status"] == "finished:failed"
        assert "fedprox" in bad["status-details"] and "Traceback" not in bad["log"], bad["log"][-3000:]

        t = time.monotonic()
        short = fl.run({**rc, "clients": 3})
        assert short["status"] == "finished:failed" and time.monotonic() - t < 60
        assert "only 2 of the 3 SuperNodes" in short["status-details"], short["status-details"]

        run_id = fl.submit({**rc, "tolerate": 1})
        deadline = time.monotonic() + 120
        while "[ROUND 2/3]" not in fl.log(run_id) and time.monotonic() < deadline:
            time.sleep(2)
        os.killpg(fl.procs[2].pid, signal.SIGKILL)  # SuperNode of partition 1, mid-run
        went_on = fl.wait(run_id)
        assert went_on["status"] == "finished:completed", went_on["log"][-4000:]
        records = _records(rc)
        assert [r["round"] for r in records] == [1, 2, 3]
        assert [r["failed_clients"] for r in records] == [0, 1, 1] and records[-1]["participants"] == 1
        assert "round 2: going on without client 1" in went_on["log"], went_on["log"][-3000:]
        assert "round 3: going on without client 1" in went_on["log"] and "lost in round 2" in went_on["log"]

        t = time.monotonic()
        lost = fl.run({**rc, "tolerate": 0})
        assert lost["status"] == "finished:failed" and time.monotonic() - t < 90
        why = lost["status-details"]
        assert ("round 1: 1 of 2 clients replied; client (partition-id) 1" in why
                or "only 1 of the 2 SuperNodes" in why or "1 of 2 SuperNodes did not say their partition" in why), why
        assert "Traceback" not in lost["log"], lost["log"][-3000:]
    assert _groups_gone(groups) and not _home_left(tmp_path / "flwr")


def test_a_secure_deployment_admits_only_registered_nodes_over_tls(tmp_path):
    """TLS on the SuperLink (certificates made here) and SuperNode authentication: two registered nodes run the
    federation to the in-process simulation's records (float64), their messages holding the method's numbers and
    the results in fed_flower_*.csv; a node whose key is not registered and a node
    that does not hold the CA's certificate never join (they hold partitions 0 and 1: had either joined, the
    server's discovery would have refused the federation): the SuperLink lists the two registered nodes only, the
    unregistered one is refused and exits, the one without the CA cannot verify the SuperLink's certificate and exits."""
    from fed.deploy import Flower, make_certificates, make_node_key

    rc, want = _setup(tmp_path)
    certs = make_certificates(tmp_path / "certs")
    nodes = [make_node_key(tmp_path / "keys", f"node{i}") for i in range(2)]
    stranger, _ = make_node_key(tmp_path / "keys", "stranger")
    other_ca = make_certificates(tmp_path / "other")["ca"]
    with Flower(tmp_path / "flwr", timeout=240) as fl:
        fl.deployment(clients=2, secure={**certs, "nodes": nodes})
        fl.supernode({"partition-id": 0, "num-partitions": 2}, key=stranger, ca=certs["ca"], log="stranger.log")
        fl.supernode({"partition-id": 1, "num-partitions": 2}, key=nodes[1][0], ca=other_ca, log="other_ca.log")
        groups = [p.pid for p in fl.procs]
        run = fl.run(rc)
        assert run["status"] == "finished:completed", run["log"][-4000:] + fl.logs()
        listed = json.loads(fl._flwr("supernode", "list", fl.connection, "--format", "json"))["nodes"]
        stranger_code, other_code = fl.procs[-2].poll(), fl.procs[-1].poll()
        stranger_log = (fl.home / "stranger.log").read_text(errors="replace")
        other_log = (fl.home / "other_ca.log").read_text(errors="replace")
    assert _groups_gone(groups) and not _home_left(tmp_path / "flwr")
    assert_deployment_records(rc, want)  # what the insecure deployment test of tests/test_flower.py asserted
    assert len(listed) == 2 and all(n["status"] == "online" for n in listed)  # the registered two, and no other
    assert stranger_code not in (None, 0) and "Failed to activate SuperNode" in stranger_log, stranger_log[-2000:]
    assert other_code not in (None, 0) and "CERTIFICATE_VERIFY_FAILED" in other_log, other_log[-2000:]


def _federated(tmp_path, name: str, *extra: str, rounds: int = 2) -> subprocess.Popen:
    args = [sys.executable, str(ROOT / "federated.py"), "--hidden", "8", "--clients", "2", "--rounds", str(rounds),
            "--partition", "iid", "--base_max_epochs", "1", "--seeds", "0", "--batch_size", "256",
            "--device", "cpu", "--data_dir", DATA, "--results_dir", str(tmp_path / name),
            "--plots_dir", str(tmp_path / f"{name}_plots"), "--progress", "false", *extra]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the private Flower homes land here
    return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_federated_py_runs_on_flower_at_once_do_not_meet(tmp_path):
    """Two `python federated.py --engine flower` at once, each with a local federation of its own on free ports
    in a private Flower home: both finish (exit 0), each writes its own results, equal to the in-process
    engine's for the same settings (run here, on run a's base model); nothing of theirs is left running."""
    from engine.results import read_results
    from fed.flower import from_run_config, load_base, load_run_tasks
    from fed.simulate import run_federated
    from fed.study import client_shards, CURVE_COLUMNS, FLOWER_COLUMNS, run_hash, RUN_COLUMNS, settings
    from sweep import Sweep
    from train import evaluate

    procs = [_federated(tmp_path, name, "--engine", "flower") for name in ("a", "b")]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, (out[-3000:], err[-3000:])
    # the in-process engine, the same settings and base model (run a's checkpoint), in this process
    cfg, spec, _ = from_run_config({"hidden": "8", "data-dir": DATA, "clients": 2, "rounds": 2, "partition": "iid",
                                    "base-max-epochs": 1, "batch-size": 256, "device": "cpu",
                                    "results-dir": str(tmp_path / "a")})
    base = Sweep(cfg.base_config(), "test").base_model()
    tasks = load_run_tasks(cfg, DATA, torch.float32, "cpu")
    want = run_federated(base, tasks["B"], tasks["A"], client_shards(cfg, tasks), settings(cfg, spec))
    for name in ("a", "b"):
        got, curves = read_results(tmp_path / name, "fed_flower_", RUN_COLUMNS, {**CURVE_COLUMNS, **FLOWER_COLUMNS})
        assert len(got) == 1 and len(curves) == 2
        assert got[0]["final_test_acc_b"] == pytest.approx(want[-1]["test_acc_b"], abs=1e-6)
        assert got[0]["config_hash"] == run_hash(cfg, "cpu", **spec)
        saved, = (tmp_path / name / "fed_flower_models").glob("*.pt")  # the global model: the suite loads it
        model = load_base(cfg, str(saved), torch.float32, "cpu")
        _, acc = evaluate(model, tasks["B"].test, tasks["B"].spec.objective)
        assert acc == pytest.approx(got[0]["final_test_acc_b"], abs=1e-6)
        assert list((tmp_path / f"{name}_plots").glob("*fed_flower_*accuracy_vs_round.png"))
    assert not _pids_with_tmp(tmp_path), "a Flower process of the commands is still running"
    assert not list(tmp_path.glob("raclora-flwr-*")), "a private Flower home was left behind"


def _pids_with_tmp(tmp_path) -> list[int]:
    from fed.deploy import live_with_env

    return live_with_env("TMPDIR", str(tmp_path))


def test_federated_py_on_flower_fails_with_one_line_when_the_federation_goes(tmp_path):
    """The SuperLink of `python federated.py --engine flower` killed mid-run: the command stops everything it
    started and exits 2 with one line (no traceback)."""
    proc = _federated(tmp_path, "c", "--engine", "flower", rounds=50)
    deadline = time.monotonic() + 240
    link = []
    while not link and time.monotonic() < deadline and proc.poll() is None:
        link = [pid for pid in _pids_with_tmp(tmp_path)
                if b"flower-superlink" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        time.sleep(0.5)
    assert link, proc.communicate()[1][-3000:]
    time.sleep(8)  # into the run
    os.kill(link[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out[-2000:], err[-2000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "SuperLink exited" in last and "Traceback" not in err, err[-3000:]
    assert not _pids_with_tmp(tmp_path)


def test_bare_flwr_run_completes_with_central_evaluation_and_a_saved_model(tmp_path):
    """`flwr run <app> --stream` as a Flower user types it, from a folder holding the data (relative paths: the
    app's defaults), Flower starting its own local SuperLink (moved to free ports; the test stops it after):
    Flower's summary shows the server-side evaluation and the global model's arrays, the model is saved, the
    figures drawn, the rows written. The run config makes it small and exact (FedIT, 2 of 3 clients a round, 3
    rounds, float64, on 3 SuperNodes): the in-process records, a node that sat out a round sent the whole state."""
    from engine.results import read_results
    from fed.deploy import _bin, free_port, live_with_env, QUIET, run_config_arg
    from fed.study import CURVE_COLUMNS, FLOWER_COLUMNS, RUN_COLUMNS
    from tests.test_flower import assert_partial_participation_records

    rc, want = _setup(tmp_path, method="fedit", clients=3, participation=0.67, rounds=3, seed=0)
    for key in ("data-dir", "results-dir", "plots-dir"):
        del rc[key]  # the app's own: ./data, ./results, ./plots of the folder it runs in
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(DATA)
    home = tmp_path / "home"
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's sockets need a short path
    env = {**os.environ, **QUIET, "FLWR_HOME": str(home), "RAY_TMPDIR": ray_tmp,
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    try:
        done = subprocess.run([_bin("flwr"), "run", str(ROOT), "--stream", "--run-config", run_config_arg(rc),
                               "--federation-config", "num_supernodes=3 client_resources_num_cpus=1"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=400)
    finally:
        left = live_with_env("FLWR_HOME", str(home))  # Flower's local SuperLink, which flwr run leaves running
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and left, log[-4000:]
    assert "Final results:" in log, log[-4000:]
    summary = log[log.index("Final results:"):]
    assert "ServerApp-side Evaluate Metrics" in summary and "test_acc_b" in summary.split("ServerApp-side Evaluate")[1]
    assert "Global Arrays" in summary and "(0.000 MB)" not in summary, summary
    runs, curves = read_results(work / "results", "fed_flower_", RUN_COLUMNS, {**CURVE_COLUMNS, **FLOWER_COLUMNS})
    assert len(runs) == 1 and runs[0]["status"] == "finished" and len(curves) == 3
    assert (work / "results" / "fed_flower_models" / f"{runs[0]['config_hash']}.pt").is_file()
    assert list((work / "plots").glob("*accuracy_vs_round.png"))
    assert f"data from {work / 'data'}, results to {work / 'results'}" in log
    assert_partial_participation_records(_records(rc), want)
