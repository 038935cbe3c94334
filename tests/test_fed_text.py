"""The federated study on text (issue 22, study 3): Shakespeare's speaking roles as clients (the partition by role),
every method's rounds on a tiny GPT with loss curves, the clients of a round stacked = alone, the summary and
figures of a text run, one-line errors for a partition that does not fit, and Flower on the same apps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data import keep_roles, load_text, speaking_roles, text_bounds, vocabulary
from fed.partition import role_partition, speech_spans, SPEECH_JOIN
from raclora.errors import ConfigError
from tests.conftest import ROOT
from tests.test_cli import assert_one_line_error

DATA = str(ROOT / "data")
TINY = dict(model="gpt", gpt_dim=8, gpt_depth=1, gpt_heads=2, gpt_context=8, dropout=0.1)
# the text's first 3,000 characters of each split: four roles have 100 training characters (First Citizen,
# Second Citizen, MENENIUS, All), three are the clients
SMALL = dict(TINY, partition="role", text_chars=3000, min_role_chars=100, clients=3)


@pytest.fixture(scope="module")
def text():
    return load_text("shakespeare", DATA)


@pytest.fixture(scope="module")
def roles(text):
    return speaking_roles(text)


def test_each_speech_is_found_where_its_speaker_line_opens_its_block(text, roles):
    spans = speech_spans(text, roles)
    assert spans.keys() == roles.keys()
    for name, speeches in roles.items():
        assert len(spans[name]) == len(speeches)
        for (a, b), speech in zip(spans[name], speeches):
            assert text[a:b] == speech
            assert text[:a].endswith(f"{name}:\n") and text[:a - len(name) - 2][-2:] in ("\n\n", "")
        assert all(b0 < a1 for (_, b0), (a1, _) in zip(spans[name], spans[name][1:]))  # in text order


@pytest.mark.parametrize("stop_chars", [20_000, None])  # a cut training split, the whole one (90 %)
def test_a_clients_windows_are_its_own_training_speeches(text, roles, stop_chars):
    """Client i's windows, read back, are role i's speeches that end inside the training split, joined in text
    order; their targets the next character; no window reads a character of val or test."""
    stop = stop_chars or text_bounds(len(text))["train"][1]
    vocab, T = vocabulary(DATA), 8
    part = role_partition(text, vocab, T, stop, 4, 300)
    spans = speech_spans(text, roles)
    assert torch.equal(torch.cat(part.shards), torch.arange(len(part.train.y)))  # every window, one client each
    for name, shard, chars in zip(part.roles, part.shards, part.chars):
        own = [text[a:b] for a, b in spans[name] if b <= stop]
        assert chars == sum(map(len, own)) >= 300
        joined = SPEECH_JOIN.join(own)
        x, y = part.train.x[shard], part.train.y[shard]
        assert vocab.decode(x.flatten()) == joined[: x.numel()]  # the role's speeches from their start, in order
        assert vocab.decode(y.flatten()) == joined[1: x.numel() + 1]  # the next character at every position
        assert len(joined) - T <= x.numel() <= len(joined) - 1  # every whole window of them
    assert part.chars == sorted(part.chars, reverse=True)  # the largest roles, client 0 the largest


@pytest.mark.parametrize("min_chars", [100, 2000, 20_000])
def test_the_roles_kept_are_keep_roles_count(text, roles, min_chars):
    """With the whole text as training split the roles kept are data.keep_roles's; with the training split
    they are keep_roles of the speeches inside it, never more."""
    vocab, n = vocabulary(DATA), len(text)
    whole = role_partition(text, vocab, 8, n, 1, min_chars)
    assert whole.kept == len(keep_roles(roles, min_chars))
    train = role_partition(text, vocab, 8, text_bounds(n)["train"][1], 1, min_chars)
    assert 0 < train.kept <= whole.kept
    every = role_partition(text, vocab, 8, n, whole.kept, min_chars)  # clients = every kept role
    assert sorted(every.roles) == sorted(keep_roles(roles, min_chars))


def test_the_role_partition_is_the_same_every_time_and_client_i_is_one_role(text):
    vocab, stop = vocabulary(DATA), text_bounds(len(text))["train"][1]
    a, b = (role_partition(text, vocab, 8, stop, 5, 2000) for _ in range(2))
    assert a.roles == b.roles and torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert all(torch.equal(s, t) for s, t in zip(a.shards, b.shards))
    more = role_partition(text, vocab, 8, stop, 8, 2000)  # more clients: the same five first, then the next ones
    assert more.roles[:5] == a.roles and len(set(more.roles)) == 8
    for s, t in zip(a.shards, more.shards):
        assert torch.equal(a.train.x[s], more.train.x[t])


@pytest.mark.parametrize("clients,min_chars,needle", [
    (0, 2000, "clients must be from 1 to the"), (10 ** 4, 2000, "speaking roles with at least 2000 training characters"),
    (1, 8, "min_role_chars must be an integer above gpt_context (8)"),
])
def test_a_role_partition_that_cannot_be_made_is_one_line(text, clients, min_chars, needle):
    with pytest.raises(ConfigError) as e:
        role_partition(text, vocabulary(DATA), 8, len(text), clients, min_chars)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("fields,needle", [
    (dict(partition="role"), "partition role makes Shakespeare's speaking roles the clients and needs a text model"),
    (dict(TINY, partition="dirichlet"), "partition dirichlet skews image labels and a text has none to skew"),
    (dict(TINY, partition="role", text_b="austen"), "text_b must be shakespeare, got 'austen'"),
    (dict(TINY, partition="role", min_role_chars=8), "min_role_chars must be above gpt_context (8)"),
])
def test_a_partition_that_does_not_fit_the_model_is_one_line(fields, needle):
    from fed.config import FedConfig

    with pytest.raises(ConfigError) as e:
        FedConfig(**fields)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_federated_py_refuses_more_clients_than_roles_before_any_training(tmp_path):
    import subprocess
    import sys

    args = ["--model", "gpt", "--partition", "role", "--gpt_context", "8", "--text_chars", "3000",
            "--min_role_chars", "100", "--clients", "5", "--results_dir", tmp_path, "--plots_dir", tmp_path / "p"]
    out = subprocess.run([sys.executable, str(ROOT / "federated.py"), *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert_one_line_error(out, "clients must be from 1 to the 4 speaking roles with at least 100 training characters")
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "fed_runs.csv").exists()


def test_the_base_is_trained_on_austen_for_the_studys_epochs_and_keeps_main_pys_checkpoint_by_default():
    from config import Config
    from fed.config import FedConfig
    from sweep import run_hash

    base = FedConfig(**TINY, partition="role", base_max_epochs=3, base_lr=1e-3).base_config()
    assert (base.text_a, base.text_b, base.max_epochs, base.lr) == ("austen", "shakespeare", 3, 1e-3)
    # at their defaults the base fields are main.py's: an MLP study's base model is main.py's checkpoint
    assert run_hash(FedConfig().base_config(), "cpu", "base", None, None, 0) == run_hash(Config(), "cpu", "base", None,
                                                                                        None, 0)


# --- rounds on the tiny GPT --------------------------------------------------------------------------------
def _text_setup(dt=torch.float64, **over):
    """A tiny GPT (float64) as the base, the role partition of SMALL, and the config."""
    from engine.build import config_model
    from fed.config import FedConfig
    from fed.study import federation

    cfg = FedConfig(**{**SMALL, "data_dir": DATA, "device": "cpu", "batch_size": 16, **over})
    tasks, shards = federation(cfg, cfg.load_tasks("cpu"))
    base = config_model(cfg, torch.Generator().manual_seed(0), "cpu").to(dt)
    return cfg, base, tasks, shards


def _spec(method, sketch="left"):
    lora = method != "fedavg"
    return dict(method=method, sketch=sketch if lora else None, rank=2 if lora else None, seed=1)


@pytest.mark.parametrize("method,sketch", [("fedavg", None), ("fedit", "left"), ("ffa_lora", "right"),
                                           ("flora", "left"), ("fed_rac_lora", "left"), ("fed_rac_lora", "right")])
def test_every_method_runs_on_the_roles_with_loss_curves_stacked_equal_to_alone(method, sketch):
    """Two rounds, 2 of the 3 roles a round, every method: each round records the central test loss (nats per
    character) and next-character accuracy on Shakespeare and on Austen; the clients of a round trained as one
    stack give what they give one after another (float64)."""
    import math

    from fed.simulate import run_federated
    from fed.study import settings

    cfg, base, tasks, shards = _text_setup(participation=0.67, rounds=2)
    assert [s.numel() for s in shards] == sorted((s.numel() for s in shards), reverse=True)
    s = settings(cfg, _spec(method, sketch))
    stacked = run_federated(base, tasks["B"], tasks["A"], shards, s, engine="stack")
    alone = run_federated(base, tasks["B"], tasks["A"], shards, s, engine="plain")
    assert [r["round"] for r in stacked] == [1, 2] and all(r["participants"] == 2 for r in stacked)
    for a, b in zip(stacked, alone, strict=True):
        for key in ("train_loss", "test_loss_b", "test_loss_a", "test_acc_b", "test_acc_a", "aggregation_error"):
            assert a[key] == pytest.approx(b[key], abs=1e-10), (method, a["round"], key)
        assert math.isfinite(a["test_loss_b"]) and 0 < a["test_loss_b"] < 2 * math.log(80)
        assert a["test_loss_b"] != a["test_loss_a"]  # two texts: Shakespeare (B) and Austen (A)
    errors = [r["aggregation_error"] for r in stacked]
    assert (min(errors) > 1e-5) if method == "fedit" else (max(errors) < 1e-12)


def test_a_text_runs_summary_and_figures_show_the_loss(tmp_path):
    from federated import summary
    from fed.simulate import run_federated
    from fed.study import run_rows, settings
    from plots import draw_federated

    cfg, base, tasks, shards = _text_setup(rounds=2, target_loss=50.0)
    rows, curves = [], []
    for seed in (0, 1):
        spec = dict(_spec("fed_rac_lora"), seed=seed)
        records = run_federated(base, tasks["B"], tasks["A"], shards, settings(cfg, spec))
        row, curve = run_rows(cfg, "test", "cpu", spec, records, 1.0, 0)
        rows.append(row)
        curves += curve
    assert rows[0]["rounds_to_target"] == 1 and rows[0]["final_test_loss_b"] == curves[1]["test_loss_b"]
    assert rows[0]["min_role_chars"] == 100 and rows[0]["partition"] == "role"
    table = summary(rows)
    assert "final loss B" in table and "loss A" in table and "acc B %" in table and "fed_rac_lora" in table
    drawn = draw_federated(rows, curves, tmp_path)
    assert sorted(p.name for p in drawn) == sorted(f"role_{n}.png" for n in (
        "loss_vs_round", "loss_vs_mb", "accuracy_vs_round", "accuracy_vs_mb", "aggregation_error"))


# --- Flower --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_flower_runs_the_roles_as_the_in_process_simulation(tmp_path):
    """`flwr run` on the local simulation federation (3 virtual SuperNodes, each one speaking role), Fed-RAC-LoRA
    on the tiny GPT, 2 of 3 roles a round for 2 rounds: the in-process records (float64, 1e-10), losses included;
    every process it started is stopped."""
    from fed.flower import from_run_config, load_base
    from fed.simulate import run_federated
    from fed.study import federation, settings
    from engine.build import config_model
    from tests.test_flower import simulate_on_flower

    rc = {"model": "gpt", "gpt-dim": 8, "gpt-depth": 1, "gpt-heads": 2, "gpt-context": 8, "partition": "role",
          "text-chars": 3000, "min-role-chars": 100, "clients": 3, "participation": 0.67, "rounds": 2, "rank": 2,
          "seed": 1, "batch-size": 16, "dtype": "float64", "data-dir": DATA, "results-dir": str(tmp_path / "results"),
          "plots-dir": str(tmp_path / "plots"), "base-model": str(tmp_path / "base.pt"),
          "records": str(tmp_path / "records.json"), "timeout": 120}
    cfg, spec, _ = from_run_config(rc)
    torch.save(config_model(cfg, torch.Generator().manual_seed(0), "cpu").state_dict(), rc["base-model"])
    base = load_base(cfg, rc["base-model"], torch.float64, "cpu")
    tasks, shards = federation(cfg, cfg.load_tasks("cpu"))
    want = run_federated(base, tasks["B"], tasks["A"], shards, settings(cfg, spec))
    got = simulate_on_flower(tmp_path, rc, clients=3)
    assert [r["round"] for r in got] == [1, 2] and all(r["participants"] == 2 for r in got)
    for a, b in zip(got, want, strict=True):
        assert (a["up_numbers"], a["down_numbers"]) == (b["up_numbers"], b["down_numbers"])
        for key in ("train_loss", "test_loss_b", "test_loss_a", "test_acc_b", "test_acc_a", "aggregation_error"):
            assert a[key] == pytest.approx(b[key], abs=1e-10), (a["round"], key)
