"""The stacked engine against the plain one: run i of a stack is run i trained alone by train.train()."""
from __future__ import annotations

import pytest
import torch

from data import Split, Task
from engine.build import build_run
from raclora.methods import METHODS
from conftest import mlp
from models import count_trainable
from engine.stack import StackedModel, evaluate_stack, train_stack
from train import evaluate, train

DT = torch.float64  # float64, so that agreement can be asked to 1e-10 after several epochs
KW = dict(weight_decay=0.01, batch_size=64, max_epochs=6, patience=2)
SEEDS, RANKS, SCALE = [3, 4, 5, 6], [1, 2, 4, 2], 0.5
# 5 steps an epoch (300 examples, batch 64): ReLoRA merges every 3 steps, so mid-epoch and at epoch ends
# AdaLoRA prunes every 2 steps from step 4 to 21 (warm-up 3 steps, the final 9)
METHOD_KW = dict(total_steps=30, merge_every=1, loraplus_ratio=4.0, relora_every=3, relora_warmup=2,
                 adalora_interval=2)


def noisy_task(seed=0, n=300):
    """Half-random labels and a large step: validation losses turn up at different epochs per run,
    so early stopping takes runs out of the stack one by one."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(784, 5, generator=g, dtype=DT)

    def split(m):
        x = torch.randn(m, 784, generator=g, dtype=DT)
        y = torch.where(torch.rand(m, generator=g) < 0.5, (x @ w).argmax(1), torch.randint(0, 5, (m,), generator=g))
        return Split(x, y)
    return Task(split(n), split(100), split(100))


@pytest.fixture(scope="module")
def task():
    return noisy_task()


@pytest.fixture(scope="module")
def base():
    return mlp([64, 64], 0.1, torch.Generator().manual_seed(11), "cpu").to(DT)


def plain_copy(base):
    model = mlp([64, 64], 0.1, None, "cpu").to(DT)
    model.load_state_dict(base.state_dict())
    return model


def alone(base, task, method, sketch, rank, seed, lr):
    """One run the plain way: a copy of the MLP + lora.wrap_linears + train.train() (build.build_run)."""
    g = torch.Generator().manual_seed(seed)
    run = build_run(base, method, sketch, [rank], [g], [None if rank is None else SCALE * rank], lr=lr, **METHOD_KW)
    record = train(run.model, run.params, task, lr=lr, generator=g, **{**KW, **run.hooks})
    return run.model, record


def stacked(base, task, method, sketch, ranks, seeds, lr):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    run = build_run(base, method, sketch, ranks, gens, [None if r is None else SCALE * r for r in ranks],
                    stacked=True, lr=lr, **METHOD_KW)
    records = train_stack(run.model, run.params, task, generators=gens, lr=lr, **{**KW, **run.hooks})
    return run.model, records


def assert_same_runs(base, task, method, sketch, lr):
    ranks = [2] * len(SEEDS) if method != "fpft" and METHODS[method].one_rank_stacks else RANKS  # RandLoRA, AdaLoRA
    model, records = stacked(base, task, method, sketch, ranks, SEEDS, lr)
    assert len({r.epochs for r in records}) > 1, "the runs should stop at different epochs"
    assert min(r.epochs for r in records) < KW["max_epochs"]
    for i, (rank, seed) in enumerate(zip(ranks, SEEDS)):
        ref, rec = alone(base, task, method, sketch, rank, seed, lr)
        assert_run_is_alone(model, i, records[i], ref, rec, task)


def assert_run_is_alone(model, i, got, ref, rec, task):
    """Run i of the stacked ``model`` (its record ``got``) against the same run alone (``ref``, ``rec``), float64:
    weights, epochs, early stop, merges, every curve value, trainable count and evaluation."""
    state = model.run_state(i)
    want = ref.state_dict()
    assert state.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(state[k], want[k], rtol=0, atol=1e-10, msg=f"run {i} {k}")
    assert (got.epochs, got.best_epoch, got.merges) == (rec.epochs, rec.best_epoch, rec.merges)
    assert len(got.curve) == len(rec.curve)
    for a, b in zip(got.curve, rec.curve):
        assert a["epoch"] == b["epoch"] and a["merged"] == b["merged"]
        for k in ("train_loss", "val_loss", "val_acc", "test_acc"):
            assert a[k] == pytest.approx(b[k], abs=1e-10), (i, a["epoch"], k)
    assert model.trainable_count(i) == count_trainable(ref)
    loss, acc = evaluate_stack(model, task.test, task.spec.objective)
    ref_loss, ref_acc = evaluate(ref, task.test, task.spec.objective)
    assert loss[i].item() == pytest.approx(ref_loss, abs=1e-10) and acc[i].item() == ref_acc


@pytest.mark.parametrize("method,sketch", [(m, s) for m in METHODS
                                           for s in (["left", "right"] if METHODS[m].uses_sketch else [None])])
def test_every_method_stacked_equals_alone(base, task, method, sketch):
    # LoRA+ trains B at 4x the rate, ReLoRA re-warms often, RandLoRA's update is full-size: smaller rates
    # keep their runs from blowing up (float64 rounding would be amplified past the tolerance) and their
    # early stops at different epochs
    m = METHODS[method]
    slow = m.step_merges or m.adapter == "randlora"
    assert_same_runs(base, task, method, sketch, lr=3e-3 if slow else 1e-2 if m.b_lr_ratio else 3e-2)


def test_fpft_stacked_equals_alone(base, task):
    assert_same_runs(base, task, "fpft", None, lr=3e-3)


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].adapter in ("lora", "dora")])
def test_rank_padding_stays_zero(base, task, method):
    model, _ = stacked(base, task, method, "left", [1, 3], [0, 1], lr=3e-2)
    for lin in model.linears:
        assert lin.A[0, 1:].abs().max() == 0 and lin.B[0, :, 1:].abs().max() == 0
        assert lin.A[1].abs().max() > 0 or lin.B[1].abs().max() > 0


def test_stacked_model_starts_as_the_base(base, task):
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    model = StackedModel(base, 2)
    model.wrap([2, 1], [1.0, 1.0], "left", "gaussian", gens)
    loss, acc = evaluate_stack(model, task.test, task.spec.objective)
    ref_loss, ref_acc = evaluate(base, task.test, task.spec.objective)
    assert loss.tolist() == pytest.approx([ref_loss] * 2, abs=1e-12) and acc.tolist() == [ref_acc] * 2
    batched = model.eval()(task.test.x.expand(2, -1, -1))  # the (R, N, in) path agrees with the shared one
    torch.testing.assert_close(batched, model(task.test.x), rtol=0, atol=1e-12)


def test_dropout_needs_one_generator_per_run(base):
    model = StackedModel(base, 2).train()
    model.set_generators([torch.Generator()])
    with pytest.raises(RuntimeError, match="one generator per run"):
        model(torch.zeros(2, 3, 784, dtype=DT))
