"""Tasks are modality-agnostic: a task declares its input shape (channels included), its targets and its
objective (loss and metric), and the engines train it without an edit — a 3-channel image task on the MLP and
the ViT, stacked equal to alone in float64, and a sequence task (next-token prediction, data.NEXT_TOKEN) on the plain loop.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data import CLASSIFICATION, DIGITS, NEXT_TOKEN, Split, Task, TaskSpec
from engine.build import build_run
from models import build_model
from train import evaluate, train

DT = torch.float64
RGB = TaskSpec(shape=(3, 8, 8), classes=4)  # a small CIFAR-shaped task: 3 channels of 8 x 8


def _task(spec: TaskSpec, n: int = 96, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)

    def split(m):
        return Split(torch.randn(m, spec.features, generator=g, dtype=DT), torch.randint(0, spec.classes, (m,), generator=g))
    return Task(split(n), split(32), split(32), spec)


def test_the_digits_tasks_declare_one_channel_and_classification():
    assert DIGITS.shape == (1, 28, 28) and DIGITS.features == 784 and DIGITS.image == (1, 28, 28)
    assert DIGITS.objective is CLASSIFICATION and CLASSIFICATION.metric == "accuracy"
    assert TaskSpec(shape=(16,), classes=10).image is None


@pytest.mark.parametrize("name,settings", [("mlp", dict(hidden=[16], dropout=0.1)),
                                           ("vit", dict(patch=4, dim=8, depth=1, heads=2, mlp_dim=16, dropout=0.1))])
def test_a_three_channel_image_task_trains_stacked_as_alone(name, settings):
    task = _task(RGB)
    base = build_model(name, settings, RGB.shape, RGB.classes, torch.Generator().manual_seed(1), "cpu").to(DT)
    if name == "vit":
        assert base.patch.in_features == 3 * 4 * 4  # every channel of a 4 x 4 patch
    kw = dict(lr=1e-2, weight_decay=0.0, batch_size=32, max_epochs=3, patience=10)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    stacked = build_run(base, "rac_lora", "left", [2, 2], gens, [1.0, 1.0], stacked=True, lr=1e-2, total_steps=9)
    from engine.stack import train_stack

    records = train_stack(stacked.model, stacked.params, task, generators=gens, **kw, **stacked.hooks)
    for i, seed in enumerate((5, 6)):
        g = torch.Generator().manual_seed(seed)
        alone = build_run(base, "rac_lora", "left", [2], [g], [1.0], lr=1e-2, total_steps=9)
        record = train(alone.model, alone.params, task, generator=g, **kw, **alone.hooks)
        assert [c["val_loss"] for c in record.curve] == pytest.approx([c["val_loss"] for c in records[i].curve],
                                                                       rel=1e-9, abs=1e-12)
        assert record.curve[-1]["test_acc"] == records[i].curve[-1]["test_acc"]


class Positions(nn.Module):
    """A toy sequence model: (N, T) inputs -> (N, T, V) logits, position by position."""

    def __init__(self, length: int, vocab: int):
        super().__init__()
        self.length, self.vocab = length, vocab
        self.net = nn.Linear(length, length * vocab)

    def forward(self, x):  # (..., N, T) -> (..., N, T, V)
        return self.net(x).unflatten(-1, (self.length, self.vocab))


def test_a_sequence_task_with_its_own_objective_trains_on_the_plain_loop():
    length, vocab = 6, 5
    spec = TaskSpec(shape=(length,), classes=vocab, objective=NEXT_TOKEN)
    g = torch.Generator().manual_seed(3)

    def split(m):  # the target at each position: the input's token there, shifted by one (learnable)
        tokens = torch.randint(0, vocab, (m, length), generator=g)
        return Split(tokens.to(DT), (tokens + 1) % vocab)
    task = Task(split(256), split(64), split(64), spec)
    model = Positions(length, vocab).to(DT)
    before = evaluate(copy.deepcopy(model), task.val, spec.objective)
    record = train(model, list(model.parameters()), task, lr=5e-2, weight_decay=0.0, batch_size=32, max_epochs=30,
                   patience=30, generator=torch.Generator().manual_seed(4))
    after = evaluate(model, task.val, spec.objective)
    assert record.epochs == 30 and after[0] < 0.5 * before[0]  # the loss the objective defines went down
    assert 0.0 <= after[1] <= 1.0 and after[1] > before[1]  # and its metric up


def test_next_token_losses_are_each_sequences_mean_over_its_positions():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(2, 3, 4, 5, generator=g, dtype=DT), torch.randint(0, 5, (2, 3, 4), generator=g)
    by_hand = torch.stack([torch.stack([F.cross_entropy(logits[r, n], targets[r, n]) for n in range(3)])
                           for r in range(2)])  # (R, N): each sequence's mean over its 4 positions
    torch.testing.assert_close(NEXT_TOKEN.losses(logits, targets), by_hand, rtol=0, atol=1e-12)
    torch.testing.assert_close(NEXT_TOKEN.loss(logits[0], targets[0]), by_hand[0].mean(), rtol=0, atol=1e-12)
    right = (logits.argmax(-1) == targets).to(torch.float32).mean(-1)
    torch.testing.assert_close(NEXT_TOKEN.correct(logits, targets), right)
