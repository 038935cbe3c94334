"""The low-rank adapter: what the update is, never when it is merged (that is the method's job).

A LoRALinear wraps a frozen ``nn.Linear`` W0 (out x in) and adds ``scale * B @ A`` with
A: (r, in) and B: (out, r). Which factor is random, which trains and when to merge are
decided by a method strategy (raclora/methods.py); the layer only knows *roles*:

- the ``zero`` factor starts at zero, so the adapted model equals the base model at init;
- the ``random`` factor is drawn by ``random_init``.

``sketch`` maps roles to factors: "left" = B random, A zero (the paper's "(Zero, Gaussian)":
the update B @ A lies in the column space of the random B, a left sketch); "right" = A random,
B zero ("(Gaussian, Zero)": the update's rows lie in the row space of A).
"""
from __future__ import annotations

import torch
from torch import nn

from models import target_linears
import torch.nn.functional as F

from raclora import adalora
from raclora.factors import ROLES, FactorRoles, init_factor_, magnitude_scaled, principal_factors, row_norms


class LoRALinear(FactorRoles, nn.Module):
    """``base(x) + scale * (x @ A.T) @ B.T`` with the base Linear frozen.

    Contract: ``merge()`` then ``reset()`` leaves the function unchanged (up to float rounding),
    because merge moves ``delta_weight()`` into the base weight and reset makes the zero factor
    zero again.
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float, sketch: str = "left",
                 random_init: str = "gaussian"):
        super().__init__()
        if sketch not in ROLES:
            raise ValueError(f"unknown sketch {sketch!r}; allowed: {', '.join(ROLES)}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.A = nn.Parameter(torch.zeros(rank, base.in_features, device=w.device, dtype=w.dtype))  # (r, in)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))  # (out, r)
        self.rank = rank
        self.scale = scale
        self.sketch = sketch
        self.random_init = random_init
        self.zero_name, self.random_name = ROLES[sketch]

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        return self.A, self.B

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, in) -> (N, out)
        return self.base(x) + self.scale * ((x @ self.A.T) @ self.B.T)

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        return self.scale * (self.B @ self.A)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + scale * B @ A. The factors are left as they are: call reset() next."""
        self.base.weight += self.delta_weight()

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None, resample_random: bool = True) -> None:
        """Zero the zero factor; re-draw the random factor from ``generator`` if asked."""
        init_factor_(self.zero_factor, "zero", None)
        if resample_random:
            init_factor_(self.random_factor, self.random_init, generator)

    @torch.no_grad()
    def principal_init_(self) -> None:
        """PiSSA: A and B from the top-``rank`` singular vectors of the base weight, the base weight replaced by the
        residual (raclora.factors.principal_factors); the function is unchanged (up to float rounding)."""
        a, b, residual = principal_factors(self.base.weight, self.rank, self.scale)
        self.A.copy_(a)
        self.B.copy_(b)
        self.base.weight.copy_(residual)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, sketch={self.sketch}, random_init={self.random_init}"


class DoRALinear(LoRALinear):
    """DoRA (Liu et al., 2024): ``m * (W0 + scale * B @ A) / ||W0 + scale * B @ A||`` applied to x, plus the bias,
    with the trained magnitude m (out,) and the norm of each output's row (raclora.factors.row_norms) treated as a
    constant (detached, the paper's section 4.3 and PEFT's DoraLinearLayer). m starts as the base weight's row
    norms, so the layer starts as the base.

    ``merge()`` puts the whole adapted weight into W0; ``reset()`` then re-zeroes the zero factor, re-draws the
    random one and re-starts m as the new W0's row norms: the function is unchanged, and a chain of DoRA links
    (COLA-style) is defined.
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float, sketch: str = "left",
                 random_init: str = "gaussian"):
        super().__init__(base, rank, scale, sketch, random_init)
        self.m = nn.Parameter(row_norms(base.weight.detach()).clone())  # (out,)

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        return self.A, self.B, self.m

    def weight_now(self) -> torch.Tensor:  # (out, in): the weight the layer applies
        return magnitude_scaled(self.base.weight + super().delta_weight(), self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, in) -> (N, out)
        return F.linear(x, self.weight_now(), self.base.bias)

    def delta_weight(self) -> torch.Tensor:  # (out, in): what a merge adds to W0
        return self.weight_now() - self.base.weight

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- m * (W0 + scale * B @ A) / ||W0 + scale * B @ A||. Call reset() next."""
        self.base.weight.copy_(self.weight_now())

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None, resample_random: bool = True) -> None:
        super().reset(generator, resample_random)
        self.m.copy_(row_norms(self.base.weight))


class AdaLoRALinear(LoRALinear):
    """AdaLoRA (Zhang et al., 2023; raclora.adalora): ``base(x) + scale * x @ (A * E).T @ B.T`` with Q = A (r, in),
    the singular values E (r,) and P = B (out, r), as PEFT's SVDLinear (its ``scaling / (ranknum + 1e-5)`` is
    ``scale``). ``reset`` draws A and B from N(0, 0.02^2) (A first, then B) and zeroes E, so the layer starts as the
    base. The buffers ``avg_*``, ``unc_*`` and ``kept`` are the rank allocator's (adalora.score_buffers); the
    allocator (``rank_allocator``) masks E's entries to the budget during training."""

    rank_allocator = adalora.RankAllocator  # what Method.training builds over these layers

    def __init__(self, base: nn.Linear, rank: int, scale: float, sketch: str = "left",
                 random_init: str = "gaussian"):
        super().__init__(base, rank, scale, sketch, random_init)
        self.E = nn.Parameter(self.A.new_zeros(rank))  # (r,)
        adalora.score_buffers(self)

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        return self.A, self.E, self.B

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, in) -> (N, out)
        return self.base(x) + self.scale * ((x @ (self.A * self.E.unsqueeze(-1)).T) @ self.B.T)

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        return adalora.delta(self.A, self.E, self.B, self.scale)

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None, resample_random: bool = True) -> None:
        """E zeroed (the function becomes the base's); A and B re-drawn from ``generator`` if asked."""
        self.E.zero_()
        if resample_random:
            self.A.normal_(0.0, adalora.INIT_STD, generator=generator)
            self.B.normal_(0.0, adalora.INIT_STD, generator=generator)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, kept={int(self.kept.sum())}"


LAYERS = {"lora": LoRALinear, "dora": DoRALinear, "adalora": AdaLoRALinear}  # a method's ``adapter`` -> its layer (RandLoRA's: randlora.py)


def wrap_linears(model: nn.Module, rank: int, scale: float, sketch: str, random_init: str,
                 generator: torch.Generator | None, targets: list[str] | None = None,
                 layer: str = "lora") -> list[LoRALinear]:
    """Replace every nn.Linear in ``model`` that ``targets`` selects (models.targeted: presets or module
    names, PEFT's ``target_modules``; None = every one), in place, by a LoRALinear (``layer`` "dora": a DoRALinear)
    around it, freeze all other parameters, draw the random factors from ``generator`` and return the adapters in
    module order."""
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = []
    for name, linear in target_linears(model, targets):
        adapter = LAYERS[layer](linear, rank, scale, sketch, random_init)
        adapter.reset(generator)
        _set_submodule(model, name, adapter)
        adapters.append(adapter)
    return adapters


def adapters_of(model: nn.Module) -> list[LoRALinear]:  # DoRALinear layers too
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def _set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
