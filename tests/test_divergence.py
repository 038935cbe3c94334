"""Every study stops a run whose training loss is not finite and records it as diverged (issue 20): the
federated simulation (both engines), its runs rows and summary, and the one shared test (raclora.errors)."""
from __future__ import annotations

import math

import pytest
import torch

from raclora.errors import DIVERGED, Diverged, check_loss
from tests.test_fed import _fed_setup, _settings


def test_check_loss_names_the_step_and_the_value():
    check_loss(torch.tensor([1.0, 2.0]), 3)
    check_loss(0.5, 1)
    for bad in (float("nan"), float("inf"), torch.tensor([1.0, float("-inf")])):
        with pytest.raises(Diverged) as e:
            check_loss(bad, 7)
        assert e.value.step == 7 and not math.isfinite(e.value.loss)


@pytest.mark.parametrize("engine", ["stack", "plain"])
@pytest.mark.parametrize("method", ["fedavg", "fed_rac_lora", "fedit"])
def test_a_federated_run_with_a_huge_learning_rate_diverges_and_keeps_its_rounds(engine, method):
    from fed.simulate import run_federated

    base, task, task_a, shards = _fed_setup(torch.float32)  # the dtype the suite trains in: 1e30 overflows it
    s = _settings(method)
    s.lr, s.rounds = 1e30, 5
    with pytest.raises(Diverged) as e:
        run_federated(base, task, task_a, shards, s, engine=engine)
    assert 1 <= e.value.round <= 5 and len(e.value.records) == e.value.round - 1
    assert all(math.isfinite(r["train_loss"]) for r in e.value.records)


def test_a_diverged_federated_run_is_recorded_as_diverged_and_summarised_apart():
    from fed.config import FedConfig
    from fed.study import RUN_COLUMNS, run_rows
    import federated

    cfg = FedConfig(rounds=3, seeds=[0], lr=1e30)
    spec = dict(method="fed_rac_lora", sketch="left", rank=1, seed=0)
    records = [dict(round=1, participants=2, train_loss=0.5, test_acc_b=0.5, test_acc_a=0.9, test_loss_b=1.2,
                    test_loss_a=0.3, up_numbers=10, down_numbers=11, aggregation_error=1e-9)]
    row, curve = run_rows(cfg, "abc", "cpu", spec, records, 1.0, 100, diverged_round=2)
    assert row["status"] == DIVERGED and row["diverged_round"] == 2 and len(curve) == 1
    assert row["final_test_acc_b"] is None and row["max_aggregation_error"] is None
    assert set(row) <= set(RUN_COLUMNS)
    ok, _ = run_rows(cfg, "abc", "cpu", dict(spec, seed=1), records * 3, 1.0, 100)
    table = federated.summary([row, ok])
    assert "1 +1 diverged" in table


@pytest.mark.slow
def test_a_diverging_flower_run_is_recorded_as_diverged(tmp_path):
    """`flwr run` on the local simulation federation with a learning rate float32 overflows on: the clients
    say so, the ServerApp ends the run and records it as diverged (fed_flower_runs.csv), as federated.py does."""
    from engine.build import config_model
    from engine.results import read_results
    from fed.deploy import Flower
    from fed.flower import from_run_config
    from fed.study import CURVE_COLUMNS, FLOWER_COLUMNS, RUN_COLUMNS
    from tests.test_flower import DATA

    rc = {"rank": 2, "seed": 3, "clients": 2, "rounds": 3, "hidden": "8", "partition": "iid", "batch-size": 256,
          "dtype": "float32", "lr": 1e30, "data-dir": DATA, "results-dir": str(tmp_path / "results"),
          "plots-dir": str(tmp_path / "plots"), "base-model": str(tmp_path / "base.pt"), "timeout": 120}
    cfg, _, _ = from_run_config(rc)
    torch.save(config_model(cfg, torch.Generator().manual_seed(0), "cpu").state_dict(), rc["base-model"])
    with Flower(tmp_path / "flwr", timeout=240) as fl:
        fl.simulation(clients=2)
        run = fl.run(rc)
        assert run["status"] == "finished:completed", run["log"][-4000:]
    assert "Flower run diverged in round" in run["log"], run["log"][-4000:]
    runs, curves = read_results(rc["results-dir"], "fed_flower_", RUN_COLUMNS, {**CURVE_COLUMNS, **FLOWER_COLUMNS})
    assert len(runs) == 1 and runs[0]["status"] == DIVERGED
    assert len(curves) == runs[0]["diverged_round"] - 1


@pytest.mark.slow
def test_federated_py_with_a_huge_learning_rate_records_diverged_runs(tmp_path):
    """Issue 20's case: `federated.py --lr 1e30` recorded `finished` runs with train_loss nan."""
    import csv

    from tests.test_federated import _run

    proc = _run("--method", "fed_rac_lora", "--sketch", "left", "--clients", "4", "--rounds", "2", "--seeds", "0",
                "--hidden", "16", "--workers", "1", "--progress", "false", "--lr", "1e30", "--base_max_epochs", "2",
                "--results_dir", tmp_path / "r", "--plots_dir", tmp_path / "p")
    assert proc.returncode == 0, proc.stderr
    assert "diverged in round 1" in proc.stdout + proc.stderr and "0 +1 diverged" in proc.stdout
    runs = list(csv.DictReader(open(tmp_path / "r" / "fed_runs.csv")))
    assert [(r["status"], r["diverged_round"]) for r in runs] == [("diverged", "1")]
    assert len(list(csv.DictReader(open(tmp_path / "r" / "fed_curves.csv")))) == 0
