"""A federated round's local training: each client runs ``epochs`` of random reshuffling over its own shard
with AdamW (a fresh optimizer every round), mean cross-entropy per batch.

``train_client`` trains one client alone on a plain model (what a Flower client does); ``train_clients``
trains every client of a round at once as one stack of the stacked engine (engine/stack.py), each client a
run with its own shard and generator. Client i of the stack makes the draws client i alone makes, in the
same order (its batch permutation at the start of each of its epochs, then its dropout masks, one layer
after the other), so the two agree (float64: to rounding; tests/test_fed.py):

- shards differ in size, so clients take different numbers of steps and their last batch of an epoch is
  short. The stack pads every batch to the longest one: padded examples are masked out of the loss (zero
  gradient) and draw no dropout mask (StackedDropout.valid);
- a client that has taken all its steps leaves the stack, its final weights kept, as train_stack drops a run
  that stopped early. Until then every client of the stack has taken as many steps as the stack, so the
  AdamW step count (shared by the rows of a tensor) is each client's own.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from data import Objective
from engine.stack import StackedModel, _keep_rows
from models import set_generator
from raclora.errors import check_loss
from train import adamw


def client_steps(shard_size: int, batch_size: int, epochs: int) -> int:
    return epochs * math.ceil(shard_size / batch_size)


def train_client(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor,
                 shard: torch.Tensor, generator: torch.Generator, *, objective: Objective, epochs: int,
                 batch_size: int, lr: float, weight_decay: float) -> float:
    """Train ``params`` of ``model`` on x[shard] under the task's ``objective``, every draw (batch order,
    dropout masks) from ``generator``; returns the mean training loss of the last epoch. A loss that is not
    finite stops it before that step is taken (raclora.errors.Diverged, with the client's step)."""
    optimizer = adamw(params, lr, weight_decay)  # the training loops' AdamW (train.adamw)
    set_generator(model, generator)
    model.train()
    shard = shard.to(x.device)
    n = shard.numel()
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator, device=x.device)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = shard[perm[start:start + batch_size]]
            loss = objective.loss(model(x[idx]), y[idx])
            step += 1
            check_loss(loss, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * idx.numel()
    return total / n


def train_clients(model: StackedModel, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor,
                  shards: list[torch.Tensor], generators: list[torch.Generator], *, objective: Objective, epochs: int,
                  batch_size: int, lr: float, weight_decay: float) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """train_client for every client of the stack at once (client i = run i, ``shards[i]``,
    ``generators[i]``). Returns each client's final state (StackedModel.run_state: the plain model's names)
    and the mean training loss of its last epoch. Any client's loss not finite stops the round before that
    step (Diverged): the round's aggregate would be nan."""
    runs = model.runs
    if not len(shards) == len(generators) == runs:
        raise ValueError(f"need one shard and one generator per run: {len(shards)}, {len(generators)} for {runs}")
    optimizer = adamw(params, lr, weight_decay)  # the training loops' AdamW (train.adamw)
    model.train()
    shards = [s.to(x.device) for s in shards]
    sizes = [s.numel() for s in shards]
    per_epoch = [math.ceil(n / batch_size) for n in sizes]
    total_steps = [epochs * k for k in per_epoch]
    states: list[dict | None] = [None] * runs
    losses = [0.0] * runs
    epoch_loss = [0.0] * runs
    perms: list[torch.Tensor | None] = [None] * runs
    active = list(range(runs))  # stack row -> client
    for step in range(max(total_steps)):
        batches = []
        for c in active:
            k = step % per_epoch[c]  # this client's batch within its epoch
            if k == 0:  # a new epoch of its own: its permutation first, as alone
                perms[c] = torch.randperm(sizes[c], generator=generators[c], device=x.device)
                epoch_loss[c] = 0.0
            batches.append(shards[c][perms[c][k * batch_size:(k + 1) * batch_size]])
        valid = [b.numel() for b in batches]
        longest = max(valid)
        idx = torch.stack([torch.cat([b, b[:1].expand(longest - b.numel())]) for b in batches])  # (live, longest)
        mask = torch.arange(longest, device=x.device) < torch.tensor(valid, device=x.device).unsqueeze(1)
        model.set_generators([generators[c] for c in active], valid)
        logits = model(x[idx])  # (live, longest, classes) or, for token sequences, (live, longest, T, V)
        per_example = objective.losses(logits.flatten(0, 1), y[idx].flatten(0, 1)).view(idx.shape)
        per_run = (per_example * mask).sum(1) / mask.sum(1)  # each client's mean over its real examples
        check_loss(per_run, step + 1)
        optimizer.zero_grad(set_to_none=True)
        per_run.sum().backward()
        optimizer.step()
        for row, c in enumerate(active):
            epoch_loss[c] += per_run[row].item() * valid[row]
        done = [row for row, c in enumerate(active) if step + 1 == total_steps[c]]
        if done:
            for row in done:
                c = active[row]
                states[c] = {k: v.detach().clone() for k, v in model.run_state(row).items()}
                losses[c] = epoch_loss[c] / sizes[c]
            keep = [row for row in range(len(active)) if row not in done]
            if not keep:
                break
            _keep_rows(model, optimizer, torch.tensor(keep, device=x.device))
            active = [active[row] for row in keep]
    model.set_generators([generators[c] for c in active])
    return states, losses
