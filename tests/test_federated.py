"""python federated.py: end to end on a short budget, resume, and one-line errors for bad settings."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from raclora.errors import ConfigError
from tests.conftest import ROOT
from tests.test_cli import assert_one_line_error


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "federated.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_federated_end_to_end_then_resume(tmp_path):
    args = ["--method", "all", "--sketch", "both", "--clients", "4", "--participation", "0.5", "--rounds", "2",
            "--seeds", "0", "--hidden", "16", "--workers", "1", "--progress", "false", "--results_dir",
            tmp_path / "r", "--plots_dir", tmp_path / "p", "--base_max_epochs", "3"]  # what is checked needs no better base
    out = _run(*args)
    assert out.returncode == 0, out.stderr
    runs = list(csv.DictReader(open(tmp_path / "r" / "fed_runs.csv")))
    rounds = list(csv.DictReader(open(tmp_path / "r" / "fed_curves.csv")))
    assert sorted((r["method"], r["sketch"]) for r in runs) == sorted(
        [("fedavg", "")] + [(m, s) for m in ("fedit", "ffa_lora", "flora", "fed_rac_lora") for s in ("left", "right")])
    assert len(rounds) == 2 * len(runs) and {r["participants"] for r in rounds} == {"2"}
    for r in runs:  # communication per client and round, as fed.methods.communication counts it
        layers = [(16, 784), (5, 16)]
        trained = sum(i if r["sketch"] == "left" else o for o, i in layers)
        want = {"fedavg": (784 * 16 + 16 + 16 * 5 + 5,) * 2, "fedit": (sum(o + i for o, i in layers),) * 2,
                "flora": (sum(o + i for o, i in layers), 2 * sum(o + i for o, i in layers)),
                "ffa_lora": (trained, trained), "fed_rac_lora": (trained, trained + 1)}[r["method"]]
        assert (int(r["up_numbers"]), int(r["down_numbers"])) == want, r["method"]
        exact = r["method"] != "fedit"
        assert (float(r["max_aggregation_error"]) < 1e-5) == exact, (r["method"], r["max_aggregation_error"])
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [  # r_: the results folder's name (figure_prefix)
        "fed_r_dirichlet_accuracy_vs_mb.png", "fed_r_dirichlet_accuracy_vs_round.png",
        "fed_r_dirichlet_aggregation_error.png"]
    assert "fed_rac_lora  left" in out.stdout and "max agg. error" in out.stdout
    again = _run(*args)
    assert again.returncode == 0 and "0 runs to train, 9 already recorded" in again.stdout + again.stderr


@pytest.mark.parametrize("argv,needle", [
    (["--clients", "0"], "clients must be an integer from 1 to 1000000, got 0"),
    (["--participation", "0"], "participation must be in (0, 1], got 0.0"),
    (["--participation", "1.5"], "participation must be in (0, 1], got 1.5"),
    (["--dirichlet_alpha", "0"], "dirichlet_alpha must be positive, got 0.0"),
    (["--dirichlet_alpha", "nan"], "dirichlet_alpha must be a finite number, got nan"),
    (["--method", "fedprox"], "unknown method 'fedprox'; allowed: fedavg, fedit, ffa_lora, flora, fed_rac_lora, all"),
    (["--partition", "shards"], "unknown partition 'shards'; allowed: iid, dirichlet"),
    (["--clients", "30000", "--hidden", "4"], "clients must be from 1 to the 26993 training images, got 30000"),
    (["--clients", "100000"], "needs about"),  # 100000 clients of the 54,725-parameter MLP at once
])
@pytest.mark.slow
def test_bad_federated_settings_get_one_line(tmp_path, argv, needle):
    out = _run(*argv, "--results_dir", tmp_path, "--plots_dir", tmp_path / "p", timeout=120)
    assert out.returncode == 2, out.stderr
    assert_one_line_error(out, needle)
    assert not (tmp_path / "fed_runs.csv").exists()


def test_the_configs_federated_names_are_the_registrys():
    from fed.config import FedConfig
    from fed.methods import FED_METHODS
    from fed.partition import PARTITIONS

    with pytest.raises(ConfigError, match=f"unknown method 'x'; allowed: {', '.join(FED_METHODS)}, all$"):
        FedConfig(method="x")
    with pytest.raises(ConfigError, match=f"unknown partition 'x'; allowed: {', '.join(PARTITIONS)}$"):
        FedConfig(partition="x")


def test_the_base_config_carries_every_models_settings():
    """The federated study adapts main.py's base model: every field a model of the registry reads reaches it
    (derived from models.MODELS; the gpt's fields were missing from a hand-kept list)."""
    import models
    from fed.config import FedConfig

    fields = {f for _, reads in models.MODELS.values() for f in reads}
    changed = {"gpt_dim": 96, "gpt_depth": 3, "vit_dim": 48, "hidden": [32], "dropout": 0.2}
    assert set(changed) <= fields
    base = FedConfig(**changed).base_config()
    for name in fields:
        assert getattr(base, name) == getattr(FedConfig(**changed), name), name
