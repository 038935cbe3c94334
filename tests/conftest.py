"""Shared fixtures: a small seeded MLP and inputs, and the MNIST tasks loaded once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import build_model

ROOT = Path(__file__).resolve().parent.parent


def mlp(hidden, dropout: float, generator, device="cpu"):
    """The suite's MLP for tasks A/B (models.build_model "mlp") with these hidden widths and dropout."""
    from data import DIGITS

    return build_model("mlp", dict(hidden=list(hidden), dropout=dropout), DIGITS.shape, DIGITS.classes, generator,
                       device)


@pytest.fixture
def base_model():
    """The 784-64-64-5 MLP with nn.Linear-style weights drawn from a seeded generator, in eval mode."""
    g = torch.Generator().manual_seed(1234)
    model = mlp([64, 64], 0.1, g, "cpu")
    with torch.no_grad():  # non-trivial biases too, so that a wrong merge cannot hide behind zeros
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture
def inputs():
    return torch.randn(32, 784, generator=torch.Generator().manual_seed(99))


@pytest.fixture(scope="session")
def mnist_tasks():
    from data import load_tasks

    return load_tasks(ROOT / "data", 5000, 0, "cpu")
