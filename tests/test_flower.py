"""The federated study on Flower (issue 13): the run config, and real Flower runs on 127.0.0.1 (a deployment:
SuperLink + SuperNodes; the local simulation federation) that must equal the in-process simulation in float64
and record what their messages carried. Every Flower process a test starts is stopped by it (fed.deploy)."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from raclora.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DATA = str(ROOT / "data")


def test_pyproject_holds_the_run_config_and_the_requirements():
    """The run config is declared once: pyproject.toml holds every key of a run (derived from FedConfig's fields,
    and the engine's), at FedConfig's defaults but for the few the Flower app sets (FLOWER_OWN: clients equals
    the size of Flower's default local federation)."""
    from flwr.supercore.constant import DEFAULT_SIMULATION_CONFIG

    from fed.config import FedConfig, run_config_keys, toml_value
    from fed.flower import ENGINE_KEYS, FLOWER_OWN

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    table = project["tool"]["flwr"]["app"]["config"]
    keys = run_config_keys()
    assert set(table) == set(keys) | set(ENGINE_KEYS)
    defaults = FedConfig().to_dict()
    differ = {k for k, field in keys.items() if table[k] != toml_value(defaults[field][0] if k in ("rank", "seed")
                                                                        else defaults[field])}
    assert differ == set(FLOWER_OWN)
    assert table["clients"] == DEFAULT_SIMULATION_CONFIG.num_supernodes
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "fed.flower:server_app",
                                                            "clientapp": "fed.flower:client_app"}
    required = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip()]
    assert project["project"]["optional-dependencies"]["lab"] == required  # the lab's, as requirements.txt
    assert set(project["project"]["dependencies"]) <= set(required)  # the library's, a part of them


def _project_imports(module: str) -> list[str]:
    """The project's files that ``module`` imports, transitively (read from their import statements)."""
    import ast

    def file_of(name: str):
        parts = name.split(".")
        return next((f for f in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py"))
                     if f.is_file()), None)
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        f = file_of(name)
        if f is None or f in seen:
            continue
        seen.add(f)
        if "." in name:
            todo.append(name.rsplit(".", 1)[0])  # its package's __init__
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return sorted(str(f.relative_to(ROOT)) for f in seen)


def test_the_fab_carries_only_what_the_apps_import(tmp_path):
    """fab-include lists the files fed.flower imports, and the bundle `flwr build` makes holds those and
    pyproject.toml only (no tests, docs, benches or other scripts)."""
    import subprocess
    import zipfile

    from fed.deploy import _bin, QUIET

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    want = _project_imports("fed.flower")
    assert project["tool"]["flwr"]["app"]["fab-include"] == [f"/{f}" for f in want]
    env = {**__import__("os").environ, **QUIET, "FLWR_HOME": str(tmp_path / "home")}
    subprocess.run([_bin("flwr"), "build", "--app", str(ROOT)], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=120)
    fab, = tmp_path.glob("*.fab")
    names = set(zipfile.ZipFile(fab).namelist()) - {".info/CONTENT"}
    assert names == {*want, "pyproject.toml"}


def test_the_run_config_defaults_are_federated_pys(tmp_path):
    from fed.config import FedConfig
    from fed.flower import from_run_config

    cfg, spec, opts = from_run_config({}, root=tmp_path)
    folders = {k: str(tmp_path / k.split("_")[0]) for k in ("data_dir", "results_dir", "plots_dir")}
    want = FedConfig(clients=2, rounds=10, **folders)
    assert cfg.to_dict() == want.to_dict() | {"seeds": [0]}
    assert spec == dict(method="fed_rac_lora", sketch="left", rank=1, seed=0)
    assert opts == dict(dtype=torch.float32, base_model="", records="", timeout=600.0, node_timeout=60.0, tolerate=0)


@pytest.mark.parametrize("run_config,needle", [
    ({"clients": 0}, "clients"), ({"participation": 1.5}, "participation"), ({"participation": 0.0}, "participation"),
    ({"dirichlet-alpha": 0.0}, "dirichlet_alpha"), ({"method": "fedprox"}, "fedprox"),
    ({"method": "all"}, "one method"), ({"sketch": "both"}, "one method and one sketch"),
    ({"dtype": "float16"}, "dtype"), ({"timeout": -1}, "timeout"), ({"ranks": 2}, "unknown run-config key"),
    ({"node-timeout": 0}, "node-timeout"), ({"tolerate": 2}, "tolerate must be a whole number of clients from 0 to 1"),
    ({"tolerate": -1}, "tolerate"), ({"engine": "flower"}, "unknown run-config key"),
    ({"lr": float("nan")}, "lr"), ({"hidden": "8,x"}, "hidden"),
])
def test_bad_run_config_is_one_line(run_config, needle):
    from fed.flower import from_run_config

    with pytest.raises(ConfigError) as e:
        from_run_config({"data-dir": "/d", "results-dir": "/r", **run_config})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_relative_paths_are_the_apps_folders(tmp_path):
    """A relative path is taken from the folder the app runs in (the apps resolve it; an absolute one is kept)."""
    from fed.flower import from_run_config

    cfg, _, opts = from_run_config({"data-dir": "d", "results-dir": "/abs/r", "plots-dir": "../p",
                                    "records": "rec.json"}, root=tmp_path / "app")
    assert (cfg.data_dir, cfg.results_dir, cfg.plots_dir) == (str(tmp_path / "app" / "d"), "/abs/r", str(tmp_path / "p"))
    assert opts["records"] == str(tmp_path / "app" / "rec.json") and opts["base_model"] == ""


def test_the_apps_log_the_suites_errors_as_one_line(caplog):
    """Flower logs a ServerApp's exception with exc_info: the suite's own errors lose the traceback (OneLine),
    any other exception keeps it."""
    import logging

    from fed.flower import OneLine

    logger = logging.getLogger("test.flower.oneline")
    logger.addFilter(OneLine())
    for error in (ConfigError("clients must be in [1, 1000000], got 0"), KeyError("bug")):
        try:
            raise error
        except Exception as ex:  # noqa: BLE001
            logger.error("ServerApp raised an exception", exc_info=ex)
    ours, other = caplog.records[-2:]
    assert caplog.text.count("Traceback") == 1 and ours.exc_info is None and other.exc_info is not None
    assert ours.getMessage() == "ConfigError: clients must be in [1, 1000000], got 0"


def test_a_missing_or_foreign_base_model_is_one_line(tmp_path):
    from fed.flower import from_run_config, load_base

    cfg, _, _ = from_run_config({"hidden": "8"})
    for path, needle in ((tmp_path / "none.pt", "is not a file"), (tmp_path / "bad.pt", "is not a state dict")):
        if path.name == "bad.pt":
            path.write_bytes(b"not a checkpoint")
        with pytest.raises(ConfigError) as e:
            load_base(cfg, str(path), torch.float64, "cpu")
        assert needle in str(e.value) and "\n" not in str(e.value)


# --- real Flower runs ------------------------------------------------------------------------------------
def _setup(tmp_path, **over):
    """A tiny float64 run config, its base model saved to a file, and the in-process records for it."""
    from engine.build import config_model
    from fed.flower import from_run_config, load_base, load_run_tasks
    from fed.simulate import run_federated
    from fed.study import client_shards, settings

    rc = {"rank": 2, "seed": 3, "clients": 2, "rounds": 2, "hidden": "8", "partition": "iid", "batch-size": 256,
          "dtype": "float64", "data-dir": DATA, "results-dir": str(tmp_path / "results"), "plots-dir": str(tmp_path / "plots"),
          "base-model": str(tmp_path / "base.pt"), "records": str(tmp_path / "records.json"), "timeout": 120,
          **over}
    cfg, spec, opts = from_run_config(rc)
    torch.save(config_model(cfg, torch.Generator().manual_seed(0), "cpu").state_dict(), rc["base-model"])
    tasks = load_run_tasks(cfg, DATA, torch.float64, "cpu")
    base = load_base(cfg, rc["base-model"], torch.float64, "cpu")
    want = run_federated(base, tasks["B"], tasks["A"], client_shards(cfg, tasks), settings(cfg, spec))
    return rc, want


def _assert_same_records(got, want):
    assert [r["round"] for r in got] == [r["round"] for r in want]
    for a, b in zip(got, want):
        for key in ("participants", "up_numbers", "down_numbers"):
            assert a[key] == b[key], (a["round"], key)
        for key in ("train_loss", "test_acc_b", "test_acc_a", "aggregation_error"):
            assert a[key] == pytest.approx(b[key], abs=1e-10), (a["round"], key)


def simulate_on_flower(tmp_path, rc: dict, clients: int) -> list[dict]:
    """Run ``rc`` on a local Flower simulation of ``clients`` SuperNodes (fed.deploy.Flower), check that it finished
    and that every process it started is gone, and return the rounds' records it wrote."""
    from fed.deploy import Flower

    with Flower(tmp_path / "flwr", timeout=240) as fl:
        fl.simulation(clients=clients)
        groups = [p.pid for p in fl.procs]
        run = fl.run(rc)
        assert run["status"] == "finished:completed", run["log"][-4000:]
    assert _groups_gone(groups) and not _home_left(tmp_path / "flwr")
    return json.loads(Path(rc["records"]).read_text())


def _home_left(home) -> list[int]:
    """Processes of a Flower home still running (those that left their process group too: an adopted ServerApp)."""
    from fed.deploy import live_with_env

    return live_with_env("FLWR_HOME", str(home))


def _groups_gone(groups: list[int]) -> bool:
    from fed.deploy import live_in_groups

    return not live_in_groups(groups)


def assert_deployment_records(rc: dict, want: list[dict]) -> None:
    """What a deployment of _setup's run (2 SuperNodes, fed_rac_lora, 2 rounds) must give: the in-process records
    (float64, 1e-10), the messages holding the method's numbers, the results in fed_flower_*.csv
    (tests/test_flower_conventions.py's secure deployment runs it)."""
    from engine.results import read_results
    from fed.study import CURVE_COLUMNS, FLOWER_COLUMNS, RUN_COLUMNS

    got = json.loads(Path(rc["records"]).read_text())
    _assert_same_records(got, want)
    assert max(r["aggregation_error"] for r in got) < 1e-12
    # what the messages held, per client: the trained factor up; the whole state down in the first round,
    # then the mean trained factor (the formula's count less the seed, which travels in the config)
    assert all(r["sent_up_numbers"] == r["up_numbers"] for r in got)
    assert got[0]["sent_down_numbers"] == 784 * 8 + 8 + 8 * 5 + 5  # W of the 784-8-5 MLP
    assert got[1]["sent_down_numbers"] == got[1]["down_numbers"] - 1
    runs, curves = read_results(rc["results-dir"], "fed_flower_", RUN_COLUMNS, {**CURVE_COLUMNS, **FLOWER_COLUMNS})
    assert len(runs) == 1 and runs[0]["method"] == "fed_rac_lora" and len(curves) == 2
    assert runs[0]["final_test_acc_b"] == pytest.approx(want[-1]["test_acc_b"], abs=1e-10)


def assert_partial_participation_records(got: list[dict], want: list[dict]) -> None:
    """What FedIT with 2 of 3 clients a round for 3 rounds (seed 0, _setup's MLP) must give on Flower: the
    in-process records, a node that sat out a round sent the whole state again (tests/test_flower_conventions.py's
    bare `flwr run` runs it on Flower's own local federation)."""
    _assert_same_records(got, want)
    assert all(r["participants"] == 2 for r in got)
    assert min(r["aggregation_error"] for r in got) > 1e-5  # FedIT's average stays inexact on Flower too
    both = got[0]["up_numbers"]
    assert all(r["sent_up_numbers"] == both for r in got)
    # seed 0 takes clients {0, 2}, then {1, 2}, then {1, 2}: round 1 sends the whole state (W and the factors),
    # round 2 the whole state to client 1 (it sat out round 1) and the factors to client 2, round 3 the factors
    whole = 784 * 8 + 8 + 8 * 5 + 5 + both
    assert [r["sent_down_numbers"] for r in got] == [whole, (whole + both) / 2, both]


def test_the_federation_is_stopped_when_the_test_fails(tmp_path):
    from fed.deploy import Flower

    with pytest.raises(RuntimeError, match="on purpose"):
        with Flower(tmp_path / "flwr") as fl:
            fl.deployment(clients=2)
            groups = [p.pid for p in fl.procs]
            raise RuntimeError("failing on purpose")
    assert _groups_gone(groups)


def test_a_proxy_in_the_environment_does_not_stop_the_federation(tmp_path, monkeypatch):
    """127.0.0.1 is reached directly: a proxy named in the environment (a dead one here), or one that
    urlopen's global opener kept from an earlier test, is not used for the health checks or by Flower."""
    import urllib.request

    from fed.deploy import Flower

    for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(key, "http://127.0.0.1:9")
    monkeypatch.setattr(urllib.request, "_opener", None)
    with pytest.raises(OSError):
        urllib.request.urlopen("http://127.0.0.1:1/", timeout=1)  # primes the global opener with the proxy
    with Flower(tmp_path / "flwr") as fl:
        fl.deployment(clients=1)
        groups = [p.pid for p in fl.procs]
        assert all(p.poll() is None for p in fl.procs)
    assert _groups_gone(groups)


def test_federated_py_on_flower_says_a_failed_run_in_one_line_and_exits_2(tmp_path, monkeypatch, capsys):
    """`python federated.py --engine flower`: a run whose Flower status is not finished:completed (here, as a
    client's failure reply makes it: Flower's own status and details, the federation stubbed) stops the command
    with one line naming the run and why, exit 2; the Flower home is kept for its logs and the federation is
    stopped. (The real federation's failures: tests/test_flower_conventions.py.)"""
    import federated
    from fed import deploy

    stopped = []
    monkeypatch.setattr(deploy.Flower, "simulation", lambda self, clients, cpus_per_client=1: self)
    monkeypatch.setattr(deploy.Flower, "stop", lambda self: stopped.append(self.home))
    monkeypatch.setattr(deploy.Flower, "run", lambda self, rc: {
        "status": "finished:failed", "log": "...",
        "status-details": "ServerApp failed with exception: round 1: 1 of 2 clients replied; client (partition-id) 1 "
                          "on node 7: DataError: no MNIST files in /nowhere; tolerate is 0"})
    monkeypatch.setattr(__import__("tempfile"), "tempdir", str(tmp_path))  # where the private Flower home goes
    code = federated.main(["--engine", "flower", "--hidden", "8", "--clients", "2", "--rounds", "1", "--partition",
                           "iid", "--base_max_epochs", "1", "--seeds", "0", "--device", "cpu", "--data_dir", DATA,
                           "--results_dir", str(tmp_path / "r"), "--plots_dir", str(tmp_path / "p"),
                           "--progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(stopped) == 1
    assert err[-1].startswith("error: Flower run fed_rac_lora left 1 seed 0 ended finished:failed: round 1: 1 of 2 "
                              "clients replied; client (partition-id) 1 on node 7: DataError"), err
    assert f"(logs kept in {tmp_path}" in err[-1]
