"""Federated adaptation in one process: rounds of (participants drawn -> the round's models built by the
method's rule -> local training -> the server's aggregation -> central evaluation), for every method of
fed/methods.py. Local training runs every client of a round as one stack (``engine="stack"``) or each client
alone (``engine="plain"``, what a Flower client does); both give the same numbers (float64: tests).

Randomness, all from the run's seed and stateless per round and client (so that a client process started
afresh each round, as Flower starts them, draws what this simulation draws):
- the server: ``seed`` -> participants and the round seed of each round, in round order;
- client c in round t: its batch order and dropout masks from ``mix(seed, t, c)``; FLoRA's fresh factors from
  ``mix(seed, t, c, "init")``;
- the random factor: Fed-RAC-LoRA redraws it every round from the round seed (the same for every client);
  FFA-LoRA and FedIT draw it once, at round 0, from ``mix(seed, "init")``.
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from data import Task
from engine.build import build_run
from fed.local import train_client, train_clients
from fed.methods import aggregate_layer, aggregation_error, communication, get_fed_method
from raclora.errors import check_loss, Diverged
from raclora.factors import ROLES, init_factor_
from models import target_linears
from train import evaluate

# the suite's registry entry that gives each federated method's clients their trainable parameters
CLIENT_METHOD = {"all": "fpft", "both": "lora", "zero": "asymmetric_lora"}


def mix(*parts) -> int:
    """A 63-bit seed from any parts (the run's seed, a round, a client, a label): SHA-256, stable everywhere."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


@dataclass
class FedSettings:
    method: str
    sketch: str | None  # which factor is random (factors.ROLES); None for fedavg
    rank: int | None
    scale: float | None  # the update's scale s (factors.lora_scale)
    seed: int
    rounds: int
    participation: float  # fraction of the clients in each round
    local_epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    random_init: str = "gaussian"
    targets: list[str] | None = None  # which Linear layers get adapters (models.targeted)


class Server:
    """The server's state between rounds: the model's weights W and, for FedIT and FFA-LoRA, the global factors."""

    def __init__(self, base: nn.Module, s: FedSettings, clients: int):
        self.s, self.m, self.clients = s, get_fed_method(s.method), clients
        self.model = copy.deepcopy(base)  # W: the base model, merged into by FLoRA and Fed-RAC-LoRA
        self.layers = [name for name, _ in target_linears(self.model, s.targets)] if self.m.trains != "all" else []
        self.rng = torch.Generator().manual_seed(s.seed)  # participants and round seeds, in round order
        self.factors: dict[str, dict[str, torch.Tensor]] = {}
        if self.m.start in ("kept", "fixed"):  # a random factor drawn once, a zero factor
            self.factors = self._draw_factors(mix(s.seed, "init"))

    def _draw_factors(self, seed: int) -> dict[str, dict[str, torch.Tensor]]:
        """Each adapted layer's zero factor and random factor (drawn from ``seed``), layer by layer as
        lora.wrap_linears draws."""
        s = self.s
        g = torch.Generator(device=base_device(self.model)).manual_seed(seed)
        zero, random = ROLES[s.sketch]
        out = {}
        for name in self.layers:
            lin = self.model.get_submodule(name)
            shapes = {"A": (s.rank, lin.in_features), "B": (lin.out_features, s.rank)}
            kw = dict(dtype=lin.weight.dtype, device=lin.weight.device)
            out[name] = {zero: torch.zeros(shapes[zero], **kw),
                         random: init_factor_(torch.empty(shapes[random], **kw), s.random_init, g)}
        return out

    def next_round(self) -> tuple[list[int], int]:
        """(the round's participants, sorted; the round seed)."""
        take = max(1, round(self.s.participation * self.clients))
        chosen = sorted(torch.randperm(self.clients, generator=self.rng)[:take].tolist())
        return chosen, int(torch.randint(0, 2 ** 62, (1,), generator=self.rng))

    def start_factors(self, round_seed: int, client: int, t: int) -> dict[str, dict[str, torch.Tensor]]:
        """Each adapted layer's factors at the start of the round for ``client`` ({} for fedavg)."""
        if self.m.start == "none":
            return {}
        if self.m.start in ("kept", "fixed"):
            return self.factors
        return self._draw_factors(round_seed if self.m.start == "redrawn" else mix(self.s.seed, t, client, "init"))

    def communication(self, participants: int) -> tuple[int, int]:
        shapes = [tuple(self.model.get_submodule(n).weight.shape) for n in self.layers]
        return communication(self.m, shapes, self.s.rank, self.s.sketch, participants,
                             sum(p.numel() for p in self.model.parameters()))


def base_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _client_run(server: Server, stacked_rows: int | None = None):
    """build.build_run for the round: the clients' trainable parameters as the method says, on adapters (if any)
    whose factors the caller sets next (_set_factors); one client (``stacked_rows`` None) or a stack of that many."""
    s = server.s
    method = CLIENT_METHOD[server.m.trains]
    runs = stacked_rows or 1
    gens = [torch.Generator() for _ in range(runs)]  # the factors are overwritten below: these draws are unused
    run = build_run(server.model, method, s.sketch or "left", [s.rank] * runs, gens, [s.scale] * runs,
                    random_init=s.random_init, stacked=stacked_rows is not None, targets=s.targets, lr=s.lr,
                    total_steps=1)
    return run


def _set_factors(model: nn.Module, layers: list[str], factors: list[dict], stacked: bool) -> None:
    with torch.no_grad():
        for name in layers:
            layer = model.body.get_submodule(name) if stacked else model.get_submodule(name)
            for key in ("A", "B"):
                if stacked:
                    getattr(layer, key).copy_(torch.stack([f[name][key] for f in factors]))
                else:
                    getattr(layer, key).copy_(factors[0][name][key])


def run_federated(base: nn.Module, task: Task, task_a: Task, shards: list[torch.Tensor], s: FedSettings, *,
                  engine: str = "stack", progress: Callable[[dict], None] | None = None) -> list[dict]:
    """``s.rounds`` rounds of ``s.method`` from ``base`` over the clients' ``shards`` of task.train; returns one
    record per round: the server's test accuracy and mean test loss on task B and on task A (forgetting; a text
    task: next-character accuracy, nats per character), the clients' mean training loss, participants, numbers sent up and down per client, aggregation error.

    A client's loss that is not finite ends the run (raclora.errors.Diverged, raised on with ``records``: the
    rounds completed before it, and ``round``: the round it happened in)."""
    server = Server(base, s, len(shards))
    kw = dict(objective=task.spec.objective, epochs=s.local_epochs, batch_size=s.batch_size, lr=s.lr,
              weight_decay=s.weight_decay)
    records = []
    for t in range(1, s.rounds + 1):
        try:
            rec = _round(server, t, engine, task, task_a, shards, kw)
        except Diverged as e:
            e.records, e.round = records, t
            raise
        records.append(rec)
        if progress is not None:
            progress(rec)
    return records


def _round(server: Server, t: int, engine: str, task: Task, task_a: Task, shards: list[torch.Tensor],
           kw: dict) -> dict:
    """Round ``t`` of run_federated: its record."""
    s = server.s
    x, y = task.train.x, task.train.y
    chosen, round_seed = server.next_round()
    if engine == "stack":
        starts = [server.start_factors(round_seed, c, t) for c in chosen]
        gens = [client_generator(s.seed, t, c, x.device) for c in chosen]
        run = _client_run(server, len(chosen))
        if server.layers:
            _set_factors(run.model, server.layers, starts, stacked=True)
        states, losses = train_clients(run.model, run.params, x, y, [shards[c] for c in chosen], gens, **kw)
    elif engine == "plain":
        starts, states, losses = zip(*[client_round(server, c, t, round_seed, task, shards[c]) for c in chosen])
    else:
        raise ValueError(f"unknown engine {engine!r}; allowed: stack, plain")
    rec, _ = close_round(server, t, chosen, list(starts), list(states), list(losses),
                         [shards[c].numel() for c in chosen], task, task_a)
    return rec


def client_generator(seed: int, t: int, client: int, device) -> torch.Generator:
    """Client ``client``'s generator in round ``t``: its batch order and dropout masks."""
    return torch.Generator(device=device).manual_seed(mix(seed, t, client))


def client_round(server: Server, client: int, t: int, round_seed: int, task: Task,
                 shard: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor], float]:
    """One client's round alone on its ``shard`` of ``task.train``, from the server's state at the start of round
    ``t`` (what a Flower client does): (its start factors, its state after local training, its last epoch's mean
    loss)."""
    s = server.s
    x, y = task.train.x, task.train.y
    start = server.start_factors(round_seed, client, t)
    run = _client_run(server)
    if server.layers:
        _set_factors(run.model, server.layers, [start], stacked=False)
    loss = train_client(run.model, run.params, x, y, shard, client_generator(s.seed, t, client, x.device),
                        objective=task.spec.objective, epochs=s.local_epochs, batch_size=s.batch_size, lr=s.lr, weight_decay=s.weight_decay)
    return start, {k: v.detach() for k, v in run.model.state_dict().items()}, loss


def close_round(server: Server, t: int, chosen: list[int], starts: list[dict], states: list[dict],
                losses: list[float], weights: list[int], task: Task, task_a: Task) -> tuple[dict, dict]:
    """The server's end of round ``t``: aggregation, then central evaluation of the new global model. Returns
    the round's record and what goes down to the clients (``apply_down``'s payload)."""
    error, down = _aggregate(server, starts, states, weights)
    up_numbers, down_numbers = server.communication(len(chosen))
    model = _global_model(server)
    loss_b, acc_b = evaluate(model, task.test, task.spec.objective)
    check_loss(loss_b, t)  # a last local step to non-finite weights shows here, not in a next round's loss
    loss_a, acc_a = evaluate(model, task_a.test, task_a.spec.objective)
    rec = dict(round=t, participants=len(chosen), train_loss=sum(losses) / len(losses), test_acc_b=acc_b,
               test_acc_a=acc_a, test_loss_b=loss_b, test_loss_a=loss_a, up_numbers=up_numbers,
               down_numbers=down_numbers, aggregation_error=error)
    return rec, down


def _aggregate(server: Server, starts: list[dict], states: list[dict],
               weights: list[int]) -> tuple[float, dict[str, torch.Tensor]]:
    """The server's step for every layer (or every parameter, for fedavg); returns the aggregation error and
    what goes down (``apply_down``'s payload: the method's "down" column, the round seed aside)."""
    m, s = server.m, server.s
    means, applied, down = [], [], {}
    with torch.no_grad():
        if m.trains == "all":
            for name, p in server.model.named_parameters():
                new, mean_u, app = aggregate_layer(m, 1.0, {"W": p}, [{"W": st[name]} for st in states], weights)
                p.copy_(new["W"])
                means.append(mean_u)
                applied.append(app)
                down[f"model.{name}"] = p.detach().clone()
            return aggregation_error(means, applied), down
        zero = ROLES[s.sketch][0]
        for name in server.layers:
            clients = [{"A": st[f"{name}.A"], "B": st[f"{name}.B"],
                        **({"A0": start[name]["A"], "B0": start[name]["B"]} if m.start == "fresh" else {})}
                       for st, start in zip(states, starts)]
            new, mean_u, app = aggregate_layer(m, s.scale, starts[0][name], clients, weights)
            means.append(mean_u)
            applied.append(app)
            if m.merges:  # into W; the adapter starts over next round
                server.model.get_submodule(name).weight += app
            else:
                server.factors[name] = new
            sent = ("A", "B") if m.trains == "both" else (zero,)  # FFA-LoRA, Fed-RAC-LoRA: the trained factor only
            down.update({f"{name}.{k}": new[k].detach().clone() for k in sent})
    return aggregation_error(means, applied), down


def apply_down(server: Server, down: dict[str, torch.Tensor], round_seed: int) -> None:
    """A client's copy of the server's state (``server``: W and the global factors at the start of the round
    whose seed is ``round_seed``) brought to the server's state after that round, from what came down:
    FedAvg's weights, FedIT's factors, FFA-LoRA's mean trained factor, FLoRA's stacked factors (s B A merged
    into W), Fed-RAC-LoRA's mean trained factor with the round's random factor redrawn from its seed."""
    m, s = server.m, server.s
    with torch.no_grad():
        if m.trains == "all":
            for name, p in server.model.named_parameters():
                p.copy_(down[f"model.{name}"])
            return
        zero = ROLES[s.sketch][0]
        redrawn = server._draw_factors(round_seed) if m.start == "redrawn" else {}
        for name in server.layers:
            if m.trains == "both":
                new = {k: down[f"{name}.{k}"] for k in ("A", "B")}
            else:
                new = dict(redrawn[name] if redrawn else server.factors[name], **{zero: down[f"{name}.{zero}"]})
            if m.merges:  # the round's start had a zero product: the whole product is the update
                server.model.get_submodule(name).weight += s.scale * (new["B"] @ new["A"])
            else:
                server.factors[name] = new


def global_state(server: Server) -> dict[str, torch.Tensor]:
    """Everything the server holds between rounds: W ("model.<name>") and the global factors
    ("factor.<layer>.<A|B>"); ``load_global_state`` restores it."""
    out = {f"model.{k}": v.detach().clone() for k, v in server.model.state_dict().items()}
    for layer, f in server.factors.items():
        out.update({f"factor.{layer}.{k}": v.detach().clone() for k, v in f.items()})
    return out


def load_global_state(server: Server, state: dict[str, torch.Tensor]) -> None:
    server.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    for layer in list(server.factors):
        server.factors[layer] = {k: state[f"factor.{layer}.{k}"].to(server.factors[layer][k])
                                 for k in ("A", "B")}


def global_model_state(server: Server) -> dict[str, torch.Tensor]:
    """The global model as a plain state dict of the model (``config_model``'s keys): W, plus s B A merged into
    each layer where the method keeps global factors; what the federation has learned, loadable as a base model."""
    state = {k: v.detach().clone() for k, v in server.model.state_dict().items()}
    for layer, f in server.factors.items():
        state[f"{layer}.weight"] += server.s.scale * (f["B"] @ f["A"])
    return state


def _global_model(server: Server) -> nn.Module:
    """The server's model for evaluation: W, plus s B A where the method keeps global factors."""
    if not server.factors:
        return server.model
    run = _client_run(server)
    _set_factors(run.model, server.layers, [server.factors], stacked=False)
    return run.model


def rounds_to(records: list[dict], target: float, key: str = "test_acc_b") -> int | None:
    """The first round whose ``key`` reaches ``target``; None if none does."""
    return next((r["round"] for r in records if r[key] >= target), None)


def megabytes(numbers: int, dtype: torch.dtype = torch.float32) -> float:
    return numbers * torch.finfo(dtype).bits / 8 / 2 ** 20 if dtype.is_floating_point else math.nan
