"""One plain training loop: AdamW, seeded mini-batches, early stopping on validation loss.

It knows nothing about adapters. A method that merges does so through ``on_epoch_end``, which
the loop calls after each epoch's training and before its evaluation. A run whose training loss
becomes non-finite stops at that step, before the step is taken, and is recorded as diverged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from data import Split, Task, batches
from engine.results import DIVERGED


@dataclass
class Record:
    """What one training run did. ``curve`` has one dict per epoch."""
    curve: list[dict] = field(default_factory=list)
    best_epoch: int = 0  # 1-based epoch whose weights were kept
    best_val_loss: float = float("inf")
    epochs: int = 0  # epochs actually run (early stopping may end before max_epochs)
    merges: int = 0  # how many times on_epoch_end reported a merge
    wall_s: float = 0.0  # seconds spent in the loop, evaluations included
    status: str = "finished"  # or DIVERGED: the training loss became nan or inf
    diverged_step: int | None = None  # the optimizer step (from 1) whose loss was not finite; None if finished



def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """model(x) in passes of ``model.eval_batch`` examples (None: one pass); examples on dimension -2."""
    size = getattr(model, "eval_batch", None)
    if size is None or x.shape[0] <= size:
        return model(x)
    return torch.cat([model(x[i:i + size]) for i in range(0, x.shape[0], size)], dim=-2)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in [0, 1]) of ``model`` on ``split``, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    logits = logits_of(model, split.x)
    loss = F.cross_entropy(logits, split.y).item()
    acc = (logits.argmax(1) == split.y).float().mean().item()
    model.train(was_training)
    return loss, acc


def train(model: nn.Module, params: list[nn.Parameter], task: Task, *, lr: float, weight_decay: float,
          batch_size: int, max_epochs: int, patience: int, generator: torch.Generator,
          on_epoch_end: Callable[[int], bool] | None = None, reset_optimizer_on_merge: bool = False,
          on_step_end: Callable[[int], bool] | None = None, lr_lambda: Callable[[int], float] | None = None,
          progress: Callable[[dict], None] | None = None) -> Record:
    """Train ``params`` of ``model`` on ``task.train``; keep the weights of the lowest validation loss.

    Stops after ``patience`` epochs without a lower validation loss, or at ``max_epochs``, or at once
    when a batch's loss is not finite (``record.status`` DIVERGED; the unfinished epoch is not recorded).
    ``generator`` supplies the batch order (and the model's dropout masks, if it was given the same
    one). ``on_epoch_end(epoch)`` may change the model (merge) as long as it keeps its function; it
    returns True when it merged, and then the optimizer state is cleared if
    ``reset_optimizer_on_merge``; ``on_step_end(step)`` is the same after every optimizer step
    (steps counted from 1 over the whole run). ``lr_lambda(steps_taken)`` multiplies every
    group's learning rate (torch's LambdaLR). On return the model holds its best weights.
    """
    device = task.train.x.device
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if lr_lambda is not None else None
    step = 0
    record = Record()
    best_state = _snapshot(model)
    stale = 0  # epochs since the validation loss last improved
    t0 = time.perf_counter()
    x, y = task.train.x, task.train.y
    merges = 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        loss_sum = torch.zeros((), device=device, dtype=x.dtype)  # summed on device: no host sync per step
        for idx in batches(len(task.train), batch_size, generator, device):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if not torch.isfinite(loss):  # stop before the step: the kept weights stay finite
                record.status, record.diverged_step = DIVERGED, step + 1
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * idx.numel()
            step += 1
            if on_step_end is not None and on_step_end(step):
                merges += 1
                if reset_optimizer_on_merge:
                    optimizer.state.clear()
            if scheduler is not None:
                scheduler.step()
        if record.status == DIVERGED:
            break
        if on_epoch_end is not None and on_epoch_end(epoch):
            merges += 1
            if reset_optimizer_on_merge:
                optimizer.state.clear()  # AdamW re-creates zeroed moments and step counts lazily
        merged = merges > record.merges
        record.merges = merges
        val_loss, val_acc = evaluate(model, task.val)
        _, test_acc = evaluate(model, task.test)
        row = {"epoch": epoch, "train_loss": loss_sum.item() / len(task.train), "val_loss": val_loss,
               "val_acc": val_acc, "test_acc": test_acc, "merged": merged}
        record.curve.append(row)
        record.epochs = epoch
        if val_loss < record.best_val_loss:
            record.best_val_loss, record.best_epoch, stale = val_loss, epoch, 0
            best_state = _snapshot(model)
        else:
            stale += 1
        if progress is not None:
            progress(row)
        if stale >= patience:
            break
    model.load_state_dict(best_state)
    record.wall_s = time.perf_counter() - t0
    return record


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
