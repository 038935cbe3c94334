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
    records = [dict(round=1, participants=2, train_loss=0.5, test_acc_b=0.5, test_acc_a=0.9, up_numbers=10,
                    down_numbers=11, aggregation_error=1e-9)]
    row, curve = run_rows(cfg, "abc", "cpu", spec, records, 1.0, 100, diverged_round=2)
    assert row["status"] == DIVERGED and row["diverged_round"] == 2 and len(curve) == 1
    assert row["final_test_acc_b"] is None and row["max_aggregation_error"] is None
    assert set(row) <= set(RUN_COLUMNS)
    ok, _ = run_rows(cfg, "abc", "cpu", dict(spec, seed=1), records * 3, 1.0, 100)
    table = federated.summary([row, ok])
    assert "1 +1 diverged" in table
