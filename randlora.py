"""RandLoRA (Albert et al., ICLR 2025): full-rank updates from frozen random bases.

Per layer, with d_min = min(out, in), d_max = max(out, in), rank r and N = ceil(d_min / r) bases,

    dW = scale * sum_{n=1..N} B_n diag(lambda_n) A diag(gamma_n)          (on the (d_max, d_min) side)

- A: (r, d_min), one random matrix shared by the N bases; B_n: (d_max, r), N distinct random matrices;
  both frozen, drawn once per model from the run's generator (N(0, 1), then divided by their std, as
  the paper's code does) and shared by every layer, each layer slicing what it needs, as in the
  paper's code and PEFT's ``RandLoraConfig``;
- lambda_n (r values) and gamma_n (d_min values) are the only trained parameters: lambda starts at 0
  (so the adapted model starts as the base model), gamma at 1 / d_max (PEFT's choice);
- the trained scaling sits on the smaller side of the layer: the update is built as a (d_max, d_min)
  matrix and transposed when out < in, so the trainable count is N * (r + d_min) per layer, and the
  update can reach rank d_min (full rank) whatever r is.

Layouts follow PEFT's so that its implementation can be fed the same tensors (a test does):
A_shared (r, D_min), B_shared (D_max, N_max, r), lambda (r, N), gamma (N, d_min). Term k of the sum
pairs column k of B.flatten(1) with row k of (lambda * A * gamma).flatten(0, 1); since the B columns
are i.i.d., that fixed pairing is the formula above with B_n's columns relabelled.
The scale is the suite's ``lora_scale`` rule (default "alpha", alpha = 1: scale 1; PEFT uses alpha / r).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lora import _set_submodule
from models import target_linears


def num_bases(d_min: int, rank: int) -> int:
    return math.ceil(d_min / rank)


def trainable_count(out_features: int, in_features: int, rank: int) -> int:
    d_min = min(out_features, in_features)
    n = num_bases(d_min, rank)
    return n * (rank + d_min)


def shared_dims(shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """(D_max, D_min) of the shared bases from the layers' (out, in): the largest out and the largest in
    over the layers (PEFT's rule)."""
    out_l, in_l = max(o for o, _ in shapes), max(i for _, i in shapes)
    return max(out_l, in_l), min(out_l, in_l)


def draw_bases(rank: int, d_max: int, d_min: int, generator: torch.Generator | None, device=None,
               dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared A (r, D_min) and B (D_max, N_max, r): N(0, 1) draws from ``generator``, each divided by its std."""
    a = torch.randn(rank, d_min, generator=generator, device=device, dtype=dtype)
    b = torch.randn(d_max, num_bases(d_min, rank), rank, generator=generator, device=device, dtype=dtype)
    return a / a.std(), b / b.std()


def small_update(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor) -> torch.Tensor:
    """sum_n B_n diag(lambda_n) A diag(gamma_n) as a (..., d_max, d_min) matrix; a leading run dimension
    on every argument is allowed. a: (..., r, d_min), b: (..., d_max, N, r), lam: (..., r, N), gam: (..., N, d_min)."""
    scaled = lam.unsqueeze(-1) * a.unsqueeze(-2) * gam.unsqueeze(-3)  # (..., r, N, d_min)
    return b.flatten(-2) @ scaled.flatten(-3, -2)


class RandLoRALinear(nn.Module):
    """``base(x) + x @ delta_weight().T`` with the base Linear frozen and slices of the shared bases as buffers."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, a_shared: torch.Tensor, b_shared: torch.Tensor):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        out, inp = base.out_features, base.in_features
        self.d_min, self.d_max, self.transposed = min(out, inp), max(out, inp), out < inp
        n = num_bases(self.d_min, rank)
        self.register_buffer("A", a_shared[:, :self.d_min].clone())  # (r, d_min)
        self.register_buffer("Bases", b_shared[:self.d_max, :n, :].clone())  # (d_max, N, r)
        w = base.weight
        self.lam = nn.Parameter(torch.zeros(rank, n, device=w.device, dtype=w.dtype))
        self.gam = nn.Parameter(torch.full((n, self.d_min), 1.0 / self.d_max, device=w.device, dtype=w.dtype))
        self.rank, self.scale = rank, scale

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        return self.lam, self.gam

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        d = small_update(self.A, self.Bases, self.lam, self.gam)
        return self.scale * (d.T if self.transposed else d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.delta_weight().T

    @torch.no_grad()
    def merge(self) -> None:
        self.base.weight += self.delta_weight()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, bases={self.lam.shape[1]}, scale={self.scale:g}, d_min={self.d_min}"


def wrap_randlora(model: nn.Module, rank: int, scale: float, generator: torch.Generator | None,
                  targets: list[str] | None = None) -> list[RandLoRALinear]:
    """Replace every nn.Linear that ``targets`` selects (as lora.wrap_linears) by a RandLoRALinear; one pair
    of shared bases, sized for the selected layers, drawn from ``generator``."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = target_linears(model, targets)
    w = targets[0][1].weight
    a, b = draw_bases(rank, *shared_dims([(m.out_features, m.in_features) for _, m in targets]), generator,
                      w.device, w.dtype)
    adapters = []
    for name, linear in targets:
        adapter = RandLoRALinear(linear, rank, scale, a, b)
        _set_submodule(model, name, adapter)
        adapters.append(adapter)
    return adapters
