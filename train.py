"""One plain training loop: AdamW, seeded mini-batches, early stopping on validation loss.

It knows nothing about adapters. A method that merges does so through ``on_epoch_end``, which
the loop calls after each epoch's training and before its evaluation. A run whose training loss
becomes non-finite is recorded as diverged at that step, keeps the weights of its best epoch and stops; the
loop sees it at the end of the epoch (one transfer of the epoch's losses) or, with Speed.check "step", at the step.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch
from torch import nn

from data import Objective, Split, Task, batches
from raclora.errors import check_loss, DIVERGED, Diverged, first_divergence


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



@dataclass(frozen=True)
class Speed:
    """How both training loops (train below, engine/stack.train_stack) do their work, never what they compute
    (issue 24): each switch's default is the faster way; the other value is what the loops did before, kept so that
    bench/ can time before and after side by side in one process (``--before``) and tests/test_speed_paths.py can
    compare the two paths. Set it for a block with ``with speed(adamw="for-loop"): ...``."""
    # AdamW's implementation (torch.optim.AdamW): "foreach" (multi-tensor: a few calls for all parameters, the very
    # arithmetic of the for-loop, bit for bit), "fused" (one kernel per parameter group; rounds differently, within
    # 1e-10 in float64) or "for-loop" (one call per parameter and operation: torch's CPU default, before)
    adamw: str = "foreach"
    # each batch gathered by index_select into one buffer allocated once per epoch (before: x[idx], a new tensor and
    # advanced indexing every step); bit for bit the same batches
    gather: bool = True
    # when the loops test the training loss for divergence (raclora.errors): "epoch" keeps every step's loss on
    # the device and reads them back once, at the epoch's end (no host sync in the step: on CUDA the host queues
    # steps ahead of the device), "step" reads each step's loss back before its backward (before). The same
    # records and kept weights either way: a run is recorded as diverged at its first non-finite step, its epoch
    # is not recorded, and it ends with the weights of its best epoch; on "epoch" the epoch's later steps are
    # taken on weights that are then dropped (a stack zeroes a non-finite row's loss and gradients at each step)
    check: str = "epoch"


SPEED = Speed()  # what the loops use now
BEFORE = Speed(adamw="for-loop", gather=False, check="step")  # every switch off: the loops as they were before issue 24
ADAMW = {"foreach": dict(foreach=True), "fused": dict(fused=True), "for-loop": dict(foreach=False)}
CHECKS = ("epoch", "step")  # Speed.check's values


@contextmanager
def speed(setting: Speed | None = None, **switches) -> Iterator[Speed]:
    """Within the block, the loops run with ``setting`` (default: the current one) and ``switches`` (fields of
    Speed) changed; restored after. ``with speed(BEFORE):`` times the loops as they were."""
    global SPEED
    if "adamw" in switches and switches["adamw"] not in ADAMW:
        raise ValueError(f"unknown AdamW implementation {switches['adamw']!r}; allowed: {', '.join(ADAMW)}")
    if "check" in switches and switches["check"] not in CHECKS:
        raise ValueError(f"unknown divergence check {switches['check']!r}; allowed: {', '.join(CHECKS)}")
    before = SPEED
    SPEED = replace(setting or SPEED, **switches)
    try:
        yield SPEED
    finally:
        SPEED = before


def speed_setting() -> Speed:
    """The switches the loops run with now (SPEED, as ``speed`` sets it for a block)."""
    return SPEED


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW over ``params`` (parameters or groups), in the implementation SPEED.adamw names."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **ADAMW[SPEED.adamw])


def gather_batch(t: torch.Tensor, idx: torch.Tensor, buf: torch.Tensor | None = None) -> torch.Tensor:
    """``t[idx]``: the rows ``idx`` (int64, (n,)) of ``t``. With SPEED.gather by index_select, into ``buf`` (at least
    n rows of ``t``'s shape and dtype, see batch_buffer) when given: the next gather overwrites those rows, so gather
    the next batch only after the last one's backward. Without it, advanced indexing (before)."""
    if not SPEED.gather:
        return t[idx]
    return t.index_select(0, idx) if buf is None else torch.index_select(t, 0, idx, out=buf[:idx.numel()])


def batch_buffer(x: torch.Tensor, rows: int) -> torch.Tensor | None:
    """The buffer gather_batch fills: ``rows`` examples of ``x``'s shape and dtype (None when SPEED.gather is off)."""
    return x.new_empty(rows, *x.shape[1:]) if SPEED.gather else None


class MethodHooks:
    """What a method does to a training loop, whichever loop it is (train below, engine/stack.train_stack):
    after every optimizer step, ``on_step_end(step, *args)`` (ReLoRA's merges) and the learning-rate schedule
    (``lr_lambda`` of the steps taken, torch's LambdaLR); after every epoch, ``on_epoch_end(epoch, *args)`` (the
    chains' merges). A hook returns True when it merged, and then AdamW's moments are cleared if
    ``reset_optimizer_on_merge``. ``args``: what the loop passes on (the stack: its live runs' generators).
    ``penalty()`` is added to the loss before each backward (AdaLoRA's orthogonality: a scalar, or one per run of a
    stack); the recorded training loss stays the task's. ``report()`` gives each epoch's curve entry more columns:
    one dict per run (one for a plain model, one per live run of a stack).
    Both loops call it at the same points, so that the arithmetic of a merge is written once."""

    def __init__(self, optimizer: torch.optim.Optimizer, on_epoch_end: Callable[..., bool] | None = None,
                 on_step_end: Callable[..., bool] | None = None, reset_optimizer_on_merge: bool = False,
                 lr_lambda: Callable[[int], float] | None = None,
                 penalty: Callable[[], torch.Tensor] | None = None, report: Callable[[], list[dict]] | None = None):
        self.optimizer, self.on_epoch_end, self.on_step_end = optimizer, on_epoch_end, on_step_end
        self.penalty, self.report = penalty, report
        self.reset_optimizer_on_merge = reset_optimizer_on_merge
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if lr_lambda is not None else None
        self.step = 0  # optimizer steps taken, over the whole run
        self.merges = 0  # merges the hooks reported

    def after_step(self, *args) -> None:
        self.step += 1
        if self.on_step_end is not None and self.on_step_end(self.step, *args):
            self._merged()
        if self.scheduler is not None:
            self.scheduler.step()

    def after_epoch(self, epoch: int, *args) -> None:
        if self.on_epoch_end is not None and self.on_epoch_end(epoch, *args):
            self._merged()

    def objective(self, loss: torch.Tensor) -> torch.Tensor:
        """What the backward differentiates: ``loss`` plus the method's penalty, if it has one."""
        return loss if self.penalty is None else loss + self.penalty()

    def columns(self, runs: int = 1) -> list[dict]:
        """The method's extra curve columns of the epoch, one dict for each of the ``runs`` runs (empty ones when it
        reports none)."""
        return [{} for _ in range(runs)] if self.report is None else self.report()

    def _merged(self) -> None:
        self.merges += 1
        if self.reset_optimizer_on_merge:
            self.optimizer.state.clear()  # AdamW re-creates zeroed moments and step counts lazily


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """model(x) in passes of ``model.eval_batch`` examples (None: one pass). ``x`` holds the examples on its
    first dimension, and so do the outputs, after a stack's run dimension (``model.example_dim``: 1)."""
    size = getattr(model, "eval_batch", None)
    if size is None or x.shape[0] <= size:
        return model(x)
    chunks = [model(x[i:i + size]) for i in range(0, x.shape[0], size)]
    return torch.cat(chunks, dim=getattr(model, "example_dim", 0))


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, objective: Objective) -> tuple[float, float]:
    """(mean loss, metric in [0, 1]) of ``model`` on ``split`` under the task's ``objective`` (classification:
    cross-entropy and accuracy), in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    logits = logits_of(model, split.x)
    loss = objective.loss(logits, split.y).item()
    acc = objective.correct(logits, split.y).mean().item()
    model.train(was_training)
    return loss, acc


def train(model: nn.Module, params: list[nn.Parameter], task: Task, *, lr: float, weight_decay: float,
          batch_size: int, max_epochs: int, patience: int, generator: torch.Generator,
          on_epoch_end: Callable[[int], bool] | None = None, reset_optimizer_on_merge: bool = False,
          on_step_end: Callable[[int], bool] | None = None, lr_lambda: Callable[[int], float] | None = None,
          penalty: Callable[[], torch.Tensor] | None = None, report: Callable[[], list[dict]] | None = None,
          progress: Callable[[dict], None] | None = None) -> Record:
    """Train ``params`` of ``model`` on ``task.train`` under the task's objective (``task.spec.objective``); keep
    the weights of the lowest validation loss.

    Stops after ``patience`` epochs without a lower validation loss, or at ``max_epochs``, or at once
    when a batch's loss is not finite (``record.status`` DIVERGED; the unfinished epoch is not recorded; SPEED.check:
    whether that is seen at the step or at the epoch's end).
    ``generator`` supplies the batch order (and the model's dropout masks, if it was given the same
    one). ``on_epoch_end(epoch)`` may change the model (merge) as long as it keeps its function; it
    returns True when it merged, and then the optimizer state is cleared if
    ``reset_optimizer_on_merge``; ``on_step_end(step)`` is the same after every optimizer step
    (steps counted from 1 over the whole run). ``lr_lambda(steps_taken)`` multiplies every
    group's learning rate (torch's LambdaLR); ``penalty`` and ``report``: MethodHooks'. On return the model holds
    its best weights.
    """
    device = task.train.x.device
    optimizer = adamw(params, lr, weight_decay)
    hooks = MethodHooks(optimizer, on_epoch_end, on_step_end, reset_optimizer_on_merge, lr_lambda, penalty, report)
    record = Record()
    best_state = _snapshot(model)
    stale = 0  # epochs since the validation loss last improved
    t0 = time.perf_counter()
    x, y = task.train.x, task.train.y
    objective = task.spec.objective  # the task's loss and metric (classification: cross-entropy, accuracy)
    dtype = next(model.parameters()).dtype  # of the losses, whatever the inputs are (token ids: int64)
    buf = batch_buffer(x, batch_size)  # every batch's examples, written in place (gather_batch)
    per_step = SPEED.check == "step"  # test the loss for divergence at every step (else once an epoch)
    for epoch in range(1, max_epochs + 1):
        model.train()
        loss_sum = torch.zeros((), device=device, dtype=dtype)  # summed on device: no host sync per step
        losses, first_step = [], hooks.step + 1  # this epoch's losses on the device (SPEED.check "epoch")
        for idx in batches(len(task.train), batch_size, generator, device):
            loss = objective.loss(model(gather_batch(x, idx, buf)), gather_batch(y, idx))
            if per_step:
                try:
                    check_loss(loss, hooks.step + 1)
                except Diverged as e:  # stop before the step: the kept weights stay finite
                    record.status, record.diverged_step = DIVERGED, e.step
                    break
            else:
                losses.append(loss.detach())
            optimizer.zero_grad(set_to_none=True)
            hooks.objective(loss).backward()
            optimizer.step()
            loss_sum += loss.detach() * idx.numel()
            hooks.after_step()
        if losses:  # one transfer an epoch; the weights after a non-finite step are never kept
            (bad,) = first_divergence(torch.stack(losses).unsqueeze(1).tolist(), first_step)
            if bad is not None:
                record.status, record.diverged_step = DIVERGED, bad.step
        if record.status == DIVERGED:
            break
        hooks.after_epoch(epoch)
        merged = hooks.merges > record.merges
        record.merges = hooks.merges
        val_loss, val_acc = evaluate(model, task.val, objective)
        _, test_acc = evaluate(model, task.test, objective)
        row = {"epoch": epoch, "train_loss": loss_sum.item() / len(task.train), "val_loss": val_loss,
               "val_acc": val_acc, "test_acc": test_acc, "merged": merged, **hooks.columns()[0]}
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
