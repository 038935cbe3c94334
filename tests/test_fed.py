"""The federated building blocks (issue 13): client partitions, the servers' aggregation rules (exact or not),
and the communication each method costs."""
from __future__ import annotations

import pytest
import torch

from raclora.errors import ConfigError
from fed.methods import FED_METHODS, aggregate_layer, aggregation_error, communication, get_fed_method
from fed.partition import partition

DT = torch.float64
MLP_LAYERS = [(64, 784), (64, 64), (5, 64)]  # (out, in) of the suite's MLP


def labels(n=3000, classes=5, seed=0):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_cover_every_image_once_and_follow_the_seed(scheme):
    y = labels()
    shards = partition(y, 10, scheme, 0.5, seed=3)
    every = torch.cat(shards)
    assert len(shards) == 10 and min(s.numel() for s in shards) > 0
    assert torch.equal(every.sort().values, torch.arange(y.numel()))  # each index exactly once
    again = partition(y, 10, scheme, 0.5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(shards, again))
    other = partition(y, 10, scheme, 0.5, seed=4)
    assert any(not torch.equal(a, b) for a, b in zip(shards, other))
    if scheme == "iid":
        assert max(s.numel() for s in shards) - min(s.numel() for s in shards) <= 1


def test_a_small_dirichlet_alpha_skews_the_labels():
    y = labels()

    def classes_held(alpha):  # per client, the classes that make up at least 5 % of its shard, on average
        counts = [torch.bincount(y[s], minlength=5).double() for s in partition(y, 10, "dirichlet", alpha, seed=0)]
        return sum(float((c / c.sum() >= 0.05).sum()) for c in counts) / len(counts)
    assert classes_held(0.1) < 3.0 < 4.5 < classes_held(100.0)


@pytest.mark.parametrize("clients,scheme,alpha,needle", [
    (0, "iid", 0.5, "clients must be from 1 to the 3000 training images, got 0"),
    (3001, "iid", 0.5, "clients must be from 1 to the 3000 training images, got 3001"),
    (10, "dirichlet", 0.0, "dirichlet_alpha must be a finite number > 0, got 0.0"),
    (10, "dirichlet", float("nan"), "dirichlet_alpha must be a finite number > 0"),
    (10, "pathological", 0.5, "unknown partition 'pathological'; allowed: iid, dirichlet"),
    (2000, "dirichlet", 1e-3, "leaves a client of 2000 without images"),
])
def test_partitions_that_cannot_be_made_get_one_line(clients, scheme, alpha, needle):
    with pytest.raises(ConfigError) as e:
        partition(labels(), clients, scheme, alpha, seed=0)
    assert needle in str(e.value) and "\n" not in str(e.value)


def client_states(method, sketch="left", k=4, out=6, inp=9, rank=2, seed=0):
    """A round's start and k clients' states after "training" (random moves of what each client trains)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=DT)
    m = FED_METHODS[method]
    if m.trains == "all":
        start = {"W": rnd(out, inp)}
        return start, [{"W": start["W"] + rnd(out, inp)} for _ in range(k)]
    if m.start == "fresh":  # each client: A random, B zero, then both trained
        clients = []
        for _ in range(k):
            a0 = rnd(rank, inp)
            clients.append({"A0": a0, "B0": torch.zeros(out, rank, dtype=DT), "A": a0 + rnd(rank, inp),
                            "B": rnd(out, rank)})
        return {}, clients
    random = rnd(out, rank) if sketch == "left" else rnd(rank, inp)
    zero_shape = (rank, inp) if sketch == "left" else (out, rank)
    trained = torch.zeros(zero_shape, dtype=DT) if m.start == "redrawn" else rnd(*zero_shape)
    if m.trains == "both":
        start = {"A": rnd(rank, inp), "B": rnd(out, rank)}
        return start, [{"A": start["A"] + rnd(rank, inp), "B": start["B"] + rnd(out, rank)} for _ in range(k)]
    name_z, name_r = ("A", "B") if sketch == "left" else ("B", "A")
    start = {name_z: trained, name_r: random}
    return start, [{name_z: trained + rnd(*zero_shape), name_r: random} for _ in range(k)]


@pytest.mark.parametrize("sketch", ["left", "right"])
@pytest.mark.parametrize("method", ["fedavg", "ffa_lora", "flora", "fed_rac_lora"])
def test_the_exact_methods_apply_the_mean_of_the_clients_updates(method, sketch):
    start, clients = client_states(method, sketch)
    weights = [120, 80, 300, 50]  # unequal shards
    new, mean_update, applied = aggregate_layer(FED_METHODS[method], 0.7, start, clients, weights)
    assert aggregation_error([mean_update], [applied]) < 1e-13
    w = [x / sum(weights) for x in weights]
    if method == "fedavg":
        want = sum(wi * c["W"] for wi, c in zip(w, clients)) - start["W"]
    else:
        want = sum(wi * 0.7 * (c["B"] @ c["A"] - (c.get("B0", start.get("B")) @ c.get("A0", start.get("A"))))
                   for wi, c in zip(w, clients))
    torch.testing.assert_close(applied, want, rtol=0, atol=1e-12)
    if method == "flora":  # the stacked factors: (out, K r) and (K r, in), their product the weighted sum
        assert new["B"].shape == (6, 4 * 2) and new["A"].shape == (4 * 2, 9)
        torch.testing.assert_close(0.7 * new["B"] @ new["A"], applied, rtol=0, atol=1e-12)


def test_fedit_averaging_both_factors_is_not_the_mean_update():
    start, clients = client_states("fedit")
    _, mean_update, applied = aggregate_layer(FED_METHODS["fedit"], 1.0, start, clients, [1, 1, 1, 1])
    gap = aggregation_error([mean_update], [applied])
    assert gap > 0.05  # random moves of both factors: mean(B_i) mean(A_i) is far from mean(B_i A_i)
    # one client, or clients that agree, leave no gap
    _, m1, a1 = aggregate_layer(FED_METHODS["fedit"], 1.0, start, clients[:1], [1])
    assert aggregation_error([m1], [a1]) < 1e-13


@pytest.mark.parametrize("sketch", ["left", "right"])
def test_communication_matches_the_formulas(sketch):
    layers, r, k, every = MLP_LAYERS, 2, 10, 54_725
    both = r * sum(o + i for o, i in layers)  # 2 * 1045
    trained = r * sum(i if sketch == "left" else o for o, i in layers)  # A: r x in (left), B: out x r (right)
    assert both == 2090 and trained == (1824 if sketch == "left" else 266)
    assert communication(FED_METHODS["fedavg"], layers, None, None, k, every) == (every, every)
    assert communication(FED_METHODS["fedit"], layers, r, None, k, every) == (both, both)
    assert communication(FED_METHODS["flora"], layers, r, None, k, every) == (both, k * both)
    assert communication(FED_METHODS["ffa_lora"], layers, r, sketch, k, every) == (trained, trained)
    assert communication(FED_METHODS["fed_rac_lora"], layers, r, sketch, k, every) == (trained, trained + 1)


def test_unknown_method_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown federated method 'fedprox'; allowed: fedavg, fedit, ffa_lora, "
                                         "flora, fed_rac_lora"):
        get_fed_method("fedprox")


# --- local training: the clients of a round as one stack equal each client alone -----------------------
def _round_models(model_name, method, k, dt=DT):
    from engine.build import build_run
    from tests.test_vit import TINY

    from conftest import mlp
    from models import build_model
    from data import DIGITS

    g = torch.Generator().manual_seed(11)
    base = (mlp([16, 16], 0.1, g) if model_name == "mlp"
            else build_model("vit", TINY, DIGITS.shape, DIGITS.classes, g, "cpu")).to(dt)
    ranks, scales = [2] * k, [0.5] * k
    init = lambda: [torch.Generator().manual_seed(100 + c) for c in range(k)]  # noqa: E731 (factor draws)
    stacked = build_run(base, method, "left", ranks, init(), scales, stacked=True, lr=1e-2, total_steps=1)
    alone = [build_run(base, method, "left", [2], [g], [0.5], lr=1e-2, total_steps=1) for g in init()]
    return stacked, alone


@pytest.mark.parametrize("model_name", ["mlp", "vit"])
@pytest.mark.parametrize("method", ["fpft", "rac_lora", "lora"])
def test_a_round_of_clients_stacked_equals_each_client_alone(model_name, method):
    from data import CLASSIFICATION
    from fed.local import train_client, train_clients

    k = 4
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(300, 784, generator=g, dtype=DT), torch.randint(0, 5, (300,), generator=g)
    shards = partition(y, k, "dirichlet", 0.5, seed=1)  # unequal shards: clients take different step counts
    assert len({s.numel() for s in shards}) == k
    kw = dict(objective=CLASSIFICATION, epochs=2, batch_size=32, lr=1e-2, weight_decay=0.01)
    stacked, alone = _round_models(model_name, method, k)
    gens = [torch.Generator().manual_seed(c) for c in range(k)]
    states, losses = train_clients(stacked.model, stacked.params, x, y, shards, gens, **kw)
    for c in range(k):
        run = alone[c]
        loss = train_client(run.model, run.params, x, y, shards[c], torch.Generator().manual_seed(c), **kw)
        want = run.model.state_dict()
        assert states[c].keys() == want.keys()
        for name in want:
            torch.testing.assert_close(states[c][name], want[name], rtol=0, atol=1e-10, msg=f"client {c} {name}")
        assert losses[c] == pytest.approx(loss, abs=1e-10)
    assert any(not torch.equal(states[0][n], states[1][n]) for n in states[0])  # the clients moved differently


# --- rounds: the server's loop, stacked clients against clients alone -----------------------------------
def _fed_setup(dt=DT, n=240, k=4):
    from conftest import mlp
    from data import Split, Task

    g = torch.Generator().manual_seed(8)

    def split(m):
        xs = torch.randn(m, 784, generator=g, dtype=dt)
        return Split(xs, torch.randint(0, 5, (m,), generator=g))
    task, task_a = Task(split(n), split(60), split(80)), Task(split(10), split(10), split(50))
    base = mlp([16, 16], 0.1, torch.Generator().manual_seed(2)).to(dt)
    return base, task, task_a, partition(task.train.y, k, "dirichlet", 0.5, seed=0)


def _settings(method, sketch="left", **kw):
    from fed.simulate import FedSettings

    lora = method != "fedavg"
    return FedSettings(method=method, sketch=sketch if lora else None, rank=2 if lora else None,
                       scale=0.5 if lora else None, seed=7, rounds=3, participation=0.75, local_epochs=1,
                       batch_size=32, lr=1e-2, weight_decay=0.01, **kw)


@pytest.mark.parametrize("method,sketch", [("fedavg", None), ("fedit", "left"), ("ffa_lora", "left"),
                                           ("ffa_lora", "right"), ("flora", "left"), ("fed_rac_lora", "left"),
                                           ("fed_rac_lora", "right")])
def test_rounds_with_stacked_clients_equal_rounds_with_clients_alone(method, sketch):
    from fed.simulate import run_federated

    base, task, task_a, shards = _fed_setup()
    s = _settings(method, sketch)
    stacked = run_federated(base, task, task_a, shards, s, engine="stack")
    alone = run_federated(base, task, task_a, shards, s, engine="plain")
    assert [r["round"] for r in stacked] == [1, 2, 3] and all(r["participants"] == 3 for r in stacked)
    for a, b in zip(stacked, alone, strict=True):
        for key in ("train_loss", "test_acc_b", "test_acc_a", "aggregation_error"):
            assert a[key] == pytest.approx(b[key], abs=1e-10), (method, a["round"], key)
        assert (a["up_numbers"], a["down_numbers"]) == (b["up_numbers"], b["down_numbers"])
    errors = [r["aggregation_error"] for r in stacked]
    if method == "fedit":
        assert min(errors) > 1e-3  # averaging both factors is inexact
    else:
        assert max(errors) < 1e-12


def test_a_round_records_the_methods_communication():
    from fed.simulate import run_federated

    base, task, task_a, shards = _fed_setup()
    layers = [(16, 784), (16, 16), (5, 16)]
    trained_a = 2 * sum(i for _, i in layers)  # left sketch: A (r x in) trains
    for method, want in (("fedavg", (sum(p.numel() for p in base.parameters()),) * 2),
                         ("fed_rac_lora", (trained_a, trained_a + 1)),
                         ("flora", (2 * sum(o + i for o, i in layers), 3 * 2 * sum(o + i for o, i in layers)))):
        rec = run_federated(base, task, task_a, shards, _settings(method), engine="stack")[0]
        assert (rec["up_numbers"], rec["down_numbers"]) == want, method


def test_every_lora_method_uses_the_sketch_and_fedavg_does_not():
    assert [m for m in FED_METHODS if FED_METHODS[m].uses_sketch] == ["fedit", "ffa_lora", "flora", "fed_rac_lora"]


# --- what goes down: a client's copy of the server's state, brought up to date by the method's payload -----
@pytest.mark.parametrize("method,sketch", [("fedavg", None), ("fedit", "left"), ("ffa_lora", "left"),
                                           ("ffa_lora", "right"), ("flora", "left"), ("flora", "right"),
                                           ("fed_rac_lora", "left"), ("fed_rac_lora", "right")])
def test_the_down_payload_brings_a_clients_copy_to_the_servers_state(method, sketch):
    """What the Flower server sends down after a round (fed.simulate.close_round's payload) lets a client that
    held the server's state at the round's start rebuild the state after it (apply_down), and holds exactly
    the numbers of the method's "down" formula (the round seed aside)."""
    import copy

    from fed.simulate import (Server, apply_down, client_round, close_round, global_state,
                              load_global_state)

    base, task, task_a, shards = _fed_setup()
    s = _settings(method, sketch)
    server = Server(base, s, len(shards))
    client = Server(base, s, len(shards))  # the client's copy, kept in sync only through the payloads
    load_global_state(client, global_state(server))
    for t in (1, 2):
        chosen, seed = server.next_round()
        rounds = [client_round(server, c, t, seed, task, shards[c]) for c in chosen]
        starts, states, losses = map(list, zip(*rounds))
        rec, down = close_round(server, t, chosen, starts, states, losses, [shards[c].numel() for c in chosen],
                                task, task_a)
        assert sum(v.numel() for v in down.values()) == rec["down_numbers"] - (method == "fed_rac_lora")
        before = copy.deepcopy(global_state(client))
        apply_down(client, down, seed)
        after, want = global_state(client), global_state(server)
        assert after.keys() == want.keys()
        assert any(not torch.equal(before[k], want[k]) for k in want)  # the round moved the server
        for k in want:
            torch.testing.assert_close(after[k], want[k], rtol=0, atol=1e-12, msg=f"round {t} {k}")
    if method != "fedavg":  # and the client's rebuilt global model computes what the server's does
        x = task.test.x[:20]
        from fed.simulate import _global_model
        torch.testing.assert_close(_global_model(client).eval()(x), _global_model(server).eval()(x), rtol=0, atol=1e-12)
