"""What a low-rank adapter's factors are, whatever layer holds them: the scale in front of B @ A, how a
factor is initialised, and which factor a sketch makes zero and which random (its *roles*).

The lab's own adapter (lora.py's LoRALinear), the stacked engine's layer (engine/stack.py) and PEFT's layers
(peft_chain.py) all read their factors through these roles, so that a method (methods.py) drives any of them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

SCALINGS = ("alpha", "alpha/r", "alpha/sqrt(r)")  # lora_scale's rules
RANDOM_INITS = ("gaussian", "kaiming")  # the non-zero factor's initialisers; the other one always starts at zero


def lora_scale(scaling: str, alpha: float, rank: int) -> float:
    """The factor in front of B @ A: "alpha" (published RAC-LoRA code), "alpha/r" (LoRA), "alpha/sqrt(r)" (rsLoRA)."""
    if scaling == "alpha":
        return float(alpha)
    if scaling == "alpha/r":
        return alpha / rank
    if scaling == "alpha/sqrt(r)":
        return alpha / math.sqrt(rank)
    raise ValueError(f"unknown scaling {scaling!r}; allowed: {', '.join(SCALINGS)}")


def init_factor_(t: torch.Tensor, kind: str, generator: torch.Generator | None) -> torch.Tensor:
    """Fill ``t`` in place, drawing only from ``generator``.

    zero:     all zeros.
    gaussian: N(0, 1), as the published RAC-LoRA code draws its random factor.
    kaiming:  ``kaiming_uniform_(a=sqrt(5))`` with fan_in = t.shape[1], i.e. U(-1/sqrt(fan_in), +1/sqrt(fan_in)).
              That is nn.Linear's own default weight init, the one microsoft/LoRA and PEFT use for
              lora_A: treating the factor as a Linear weight keeps its output at the scale of its
              input, where N(0, 1) grows it by sqrt(fan_in).
    """
    with torch.no_grad():
        if kind == "zero":
            return t.zero_()
        if kind == "gaussian":
            return t.normal_(0.0, 1.0, generator=generator)
        if kind == "kaiming":
            return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    raise ValueError(f"unknown initialiser {kind!r}; allowed: zero, {', '.join(RANDOM_INITS)}")


ROLES = {  # sketch -> (factor that starts at zero, factor that is drawn at random)
    "left": ("A", "B"),
    "right": ("B", "A"),
}


class FactorRoles:
    """``zero_factor`` / ``random_factor`` from the ``zero_name`` / ``random_name`` a sketch sets
    (see ROLES); shared by LoRALinear and the stacked layer of engine/stack.py."""
    zero_name: str
    random_name: str

    @property
    def zero_factor(self) -> nn.Parameter:
        return getattr(self, self.zero_name)

    @property
    def random_factor(self) -> nn.Parameter:
        return getattr(self, self.random_name)


def principal_factors(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA's initialisation (Meng et al., 2024) of a (out, in) weight W, as PEFT's ``init_lora_weights="pissa"``
    makes it: W = U S V^T (torch.linalg.svd), A = diag(sqrt(S_r / scale)) V_r^T (r, in), B = U_r diag(sqrt(S_r /
    scale)) (out, r), so that scale * B @ A is W's best rank-r approximation; returns (A, B, the residual W - scale *
    B @ A, the frozen base). No random draw. (PEFT computes it in float32 whatever the weight's dtype; here in it.)"""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    k = min(rank, s.numel())  # a rank above min(out, in): the factors' extra rows stay zero (PEFT cuts them off)
    root = (s[:k] / scale).sqrt()
    a, b = weight.new_zeros(rank, weight.shape[1]), weight.new_zeros(weight.shape[0], rank)
    a[:k], b[:, :k] = root.unsqueeze(1) * vh[:k], u[:, :k] * root
    return a, b, weight - scale * b @ a


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """DoRA's norm (Liu et al., 2024) of a (..., out, in) weight: the L2 norm of each output's row, (..., out), as
    PEFT's ``DoraLinearLayer.get_weight_norm`` takes it (``torch.linalg.norm(W, dim=1)`` of a Linear's weight)."""
    return torch.linalg.norm(weight, dim=-1)


def magnitude_scaled(weight: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """DoRA's applied weight: each output row of ``weight`` (..., out, in) re-scaled to the magnitude ``m`` (...,
    out), the norm treated as a constant (detached, as the paper's section 4.3 and PEFT do)."""
    return (m / row_norms(weight).detach()).unsqueeze(-1) * weight
