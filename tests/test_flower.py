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
    from fed.flower import RUN_CONFIG

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["config"] == RUN_CONFIG
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "fed.flower:server_app",
                                                            "clientapp": "fed.flower:client_app"}
    required = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip()]
    assert project["project"]["optional-dependencies"]["lab"] == required  # the lab's, as requirements.txt
    assert set(project["project"]["dependencies"]) <= set(required)  # the library's, a part of them


def test_the_run_config_defaults_are_federated_pys():
    from fed.config import FedConfig
    from fed.flower import from_run_config

    cfg, spec, opts = from_run_config({}, check_paths=False)
    want = FedConfig(device="cpu")
    assert cfg.to_dict() == want.to_dict() | {"seeds": [0]}
    assert spec == dict(method="fed_rac_lora", sketch="left", rank=1, seed=0)
    assert opts["dtype"] == torch.float32 and opts["base_model"] == "" and opts["timeout"] == 3600


@pytest.mark.parametrize("run_config,needle", [
    ({"clients": 0}, "clients"), ({"participation": 1.5}, "participation"), ({"participation": 0.0}, "participation"),
    ({"dirichlet-alpha": 0.0}, "dirichlet_alpha"), ({"method": "fedprox"}, "fedprox"),
    ({"method": "all"}, "one method"), ({"sketch": "both"}, "one method and one sketch"),
    ({"dtype": "float16"}, "dtype"), ({"timeout": -1}, "timeout"), ({"ranks": 2}, "unknown run-config key"),
    ({"lr": float("nan")}, "lr"), ({"hidden": "8,x"}, "hidden"), ({"data-dir": "./data"}, "absolute path"),
    ({"results-dir": "results"}, "results-dir 'results' is relative"),
])
def test_bad_run_config_is_one_line(run_config, needle):
    from fed.flower import from_run_config

    with pytest.raises(ConfigError) as e:
        from_run_config({"data-dir": "/d", "results-dir": "/r", **run_config})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_missing_or_foreign_base_model_is_one_line(tmp_path):
    from fed.flower import from_run_config, load_base

    cfg, _, _ = from_run_config({"hidden": "8"}, check_paths=False)
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
          "dtype": "float64", "data-dir": DATA, "results-dir": str(tmp_path / "results"),
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
    assert _groups_gone(groups)
    return json.loads(Path(rc["records"]).read_text())


def _groups_gone(groups: list[int]) -> bool:
    from fed.deploy import live_in_groups

    return not live_in_groups(groups)


@pytest.mark.slow
def test_a_deployment_on_127_0_0_1_equals_the_in_process_simulation(tmp_path):
    """A real SuperLink and two SuperNodes (partition-id 0 and 1), two rounds of fed_rac_lora through
    `flwr run`: the same records as in this process (float64, 1e-10), the messages held the method's
    numbers, the results landed in fed_flower_*.csv, and every process is stopped afterwards."""
    from engine.results import read_results
    from fed.study import CURVE_COLUMNS, FLOWER_COLUMNS, RUN_COLUMNS
    from fed.deploy import Flower

    rc, want = _setup(tmp_path)
    with Flower(tmp_path / "flwr", timeout=240) as fl:
        fl.deployment(clients=2)
        groups = [p.pid for p in fl.procs]
        assert len(groups) == 3
        run = fl.run(rc)
        assert run["status"] == "finished:completed", run["log"][-4000:]
    assert _groups_gone(groups)
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


@pytest.mark.slow
def test_flower_simulation_with_partial_participation_equals_the_in_process_simulation(tmp_path):
    """`flwr run` on the local simulation federation (3 virtual SuperNodes), FedIT with 2 of 3 clients a round
    for 3 rounds: a node that sat out a round is sent the whole state again; same records as in process."""
    rc, want = _setup(tmp_path, method="fedit", clients=3, participation=0.67, rounds=3, seed=0)
    got = simulate_on_flower(tmp_path, rc, clients=3)
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
