"""The training loop: early stopping, best weights kept, determinism, batching."""
from __future__ import annotations

import copy

import torch

from data import Split, Task, batches
from conftest import mlp
from models import set_generator
from train import evaluate, train


def synthetic_task(seed=0, n=600):
    g = torch.Generator().manual_seed(seed)
    def split(m):
        return Split(torch.randn(m, 784, generator=g), torch.randint(0, 5, (m,), generator=g))
    return Task(split(n), split(200), split(200))


def fit(task, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    model = mlp([64, 64], 0.1, g, "cpu")
    set_generator(model, g)
    args = dict(lr=2e-4, weight_decay=0.01, batch_size=128, max_epochs=4, patience=10, generator=g)
    args.update(kw)
    return model, train(model, list(model.parameters()), task, **args)


def test_same_seed_same_run_different_seed_different_run():
    task = synthetic_task()
    _, r1 = fit(task, seed=3)
    _, r2 = fit(task, seed=3)
    _, r3 = fit(task, seed=4)
    assert [c["train_loss"] for c in r1.curve] == [c["train_loss"] for c in r2.curve]
    assert [c["train_loss"] for c in r1.curve] != [c["train_loss"] for c in r3.curve]


def test_early_stopping_counts_epochs_without_improvement():
    # lr = 0 and no weight decay: the validation loss never goes below epoch 1's
    _, rec = fit(synthetic_task(), lr=0.0, weight_decay=0.0, max_epochs=50, patience=3)
    assert rec.epochs == 4 and rec.best_epoch == 1


def test_best_weights_are_kept():
    # random labels and a large step: the model overfits and the validation loss rises
    task = synthetic_task(n=300)
    model, rec = fit(task, lr=3e-2, max_epochs=15, patience=15)
    assert rec.epochs == 15
    assert rec.best_epoch < rec.epochs
    best = rec.curve[rec.best_epoch - 1]
    assert best["val_loss"] == min(c["val_loss"] for c in rec.curve) == rec.best_val_loss
    val_loss, val_acc = evaluate(model, task.val, task.spec.objective)
    assert abs(val_loss - best["val_loss"]) < 1e-6 and abs(val_acc - best["val_acc"]) < 1e-9


def test_on_epoch_end_is_called_and_counted():
    calls = []
    _, rec = fit(synthetic_task(), max_epochs=3, on_epoch_end=lambda e: calls.append(e) or e % 2 == 0)
    assert calls == [1, 2, 3] and rec.merges == 1
    assert [c["merged"] for c in rec.curve] == [False, True, False]


def test_reset_optimizer_on_merge_clears_adam_state():
    seen = []
    orig_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(max((int(s["step"]) for s in self.state.values()), default=0))
        return orig_step(self, *a, **k)

    torch.optim.AdamW.step = spy
    try:
        fit(synthetic_task(n=256), max_epochs=2, batch_size=128, on_epoch_end=lambda e: True,
            reset_optimizer_on_merge=True)
        steps_reset = list(seen)
        seen.clear()
        fit(synthetic_task(n=256), max_epochs=2, batch_size=128, on_epoch_end=lambda e: True)
        steps_kept = list(seen)
    finally:
        torch.optim.AdamW.step = orig_step
    assert steps_reset == [0, 1, 0, 1]  # the step count restarts after the merge
    assert steps_kept == [0, 1, 2, 3]


def test_batches_are_a_permutation_cut_in_slices():
    g = torch.Generator().manual_seed(0)
    parts = batches(1000, 128, g, "cpu")
    assert [len(p) for p in parts] == [128] * 7 + [104]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(1000))
    again = batches(1000, 128, torch.Generator().manual_seed(0), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


def test_eval_mode_is_deterministic_and_restores_training_flag():
    task = synthetic_task()
    g = torch.Generator().manual_seed(0)
    model = mlp([64, 64], 0.5, g, "cpu")
    set_generator(model, g)
    model.train()
    a, b = evaluate(model, task.val, task.spec.objective), evaluate(copy.deepcopy(model), task.val, task.spec.objective)
    assert a == b and model.training


def test_a_run_never_touches_the_global_rng():
    from lora import wrap_linears
    from raclora.methods import METHODS

    before = torch.random.get_rng_state()
    g = torch.Generator().manual_seed(0)
    model = mlp([64, 64], 0.1, g, "cpu")
    set_generator(model, g)
    adapters = wrap_linears(model, 2, 1.0, "left", "kaiming", g)
    params = METHODS["rac_lora"].prepare(adapters)
    train(model, params, synthetic_task(), lr=2e-4, weight_decay=0.01, batch_size=128, max_epochs=2,
          patience=10, generator=g, on_epoch_end=lambda e: METHODS["rac_lora"].end_of_epoch(adapters, e, 1, g))
    assert torch.equal(torch.random.get_rng_state(), before)
