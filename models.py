"""The 784 -> 64 -> 64 -> 5 MLP of the RAC-LoRA MNIST experiment."""
from __future__ import annotations

import torch
from torch import nn


class SeededDropout(nn.Module):
    """Inverted dropout whose masks come from ``self.generator`` (set per run), never the global RNG.

    Same maths as nn.Dropout: keep each unit with probability 1 - p and scale kept units by 1/(1 - p).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.generator is None:
            raise RuntimeError("SeededDropout has no generator: call set_generator(model, g) before training")
        keep = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout for each hidden width, then a Linear head. Input: (N, 784) floats."""

    def __init__(self, hidden: list[int] | tuple[int, ...] = (64, 64), n_in: int = 784, n_out: int = 5,
                 dropout: float = 0.1):
        super().__init__()
        dims = [n_in, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(), SeededDropout(dropout)]
        layers.append(nn.Linear(dims[-1], n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 784) -> (N, n_out) logits
        return self.net(x)


def build_model(hidden, dropout: float, generator: torch.Generator | None, device) -> MLP:
    """An MLP on ``device`` whose weights are drawn from ``generator`` as nn.Linear would draw them.

    The module is built on the meta device, so torch's global RNG is never touched. With
    ``generator=None`` the weights are left uninitialised: only for loading a state dict next.
    """
    with torch.device("meta"):
        model = MLP(hidden, dropout=dropout)
    model = model.to_empty(device=device)
    if generator is not None:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    # nn.Linear.reset_parameters, with our generator: weight and bias U(+-1/sqrt(in))
                    bound = 1.0 / m.in_features ** 0.5
                    m.weight.uniform_(-bound, bound, generator=generator)
                    m.bias.uniform_(-bound, bound, generator=generator)
    return model


def set_generator(model: nn.Module, generator: torch.Generator) -> None:
    """Give every SeededDropout in ``model`` the run's generator."""
    for m in model.modules():
        if isinstance(m, SeededDropout):
            m.generator = generator


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
