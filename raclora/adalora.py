"""AdaLoRA (Zhang et al., ICLR 2023): the update as P Lambda Q, an orthogonality penalty on P and Q, and a rank
budget that importance scores hand out across the layers during training, as PEFT's ``AdaLoraModel`` computes them
(``peft.tuners.adalora``: ``SVDLinear``, ``RankAllocator``, ``AdaLoraModel.forward``/``update_and_allocate``).

An AdaLoRA adapter (lora.AdaLoRALinear, engine/stack.py's stacked form) holds, at its initial rank r:
``A`` (..., r, in) = Q (PEFT's lora_A), ``E`` (..., r) = the singular values Lambda (lora_E), ``B`` (..., out, r)
= P (lora_B), and the delta ``scale * B @ (A * E)`` (PEFT's ``scaling / (ranknum + 1e-5)`` is the lab's ``scale``).
Beside them, as buffers of the layer, the smoothed sensitivity and uncertainty of every entry of A, E and B and the
triplets kept (``kept``, (..., r) bool). ``...`` is nothing for one run and the run dimension for a stack: every
function here works on either, each run with its own budget.

The schedule (PEFT's ``budget_schedule``) over the run's ``total`` optimizer steps, step t counted from 0:
t <= tinit: all r triplets of every layer (the initial budget); tinit < t <= total - tfinal: the budget falls
cubically from the initial one to ``target`` x layers, and every ``interval``-th step the triplets of lowest score
across all layers are masked (their singular value set to 0); from t = total - tfinal on, the pattern of that step
is fixed and applied after every step. Scores are updated at every step before the final phase.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

INIT_STD = 0.02  # PEFT's reset_lora_parameters: A, B ~ N(0, 0.02^2), E = 0
SCORES = ("A", "E", "B")  # the factors whose entries are scored (PEFT: every lora_ parameter)


@dataclass(frozen=True)
class Schedule:
    """AdaLoraConfig's schedule: ``total`` optimizer steps (total_step), ``tinit`` steps before any pruning, the
    last ``tfinal`` steps at the target budget, a pruning every ``interval`` steps (deltaT) between; the score
    smoothing ``beta1``, ``beta2``."""
    total: int
    tinit: int
    tfinal: int
    interval: int
    beta1: float = 0.85
    beta2: float = 0.85

    def __post_init__(self):
        if self.tinit >= self.total - self.tfinal:
            raise ValueError(f"AdaLoRA's schedule leaves no steps to prune in: warm-up {self.tinit} + final "
                             f"{self.tfinal} steps of {self.total}; shorten them or train longer")

    @classmethod
    def of_fractions(cls, total: int, warmup: float, final: float, interval: int, beta1: float = 0.85,
                     beta2: float = 0.85) -> "Schedule":
        """The schedule with tinit and tfinal as fractions of ``total`` steps (whole steps, rounded down: fractions
        that sum below 1 always leave steps to prune in)."""
        return cls(total, math.floor(warmup * total), math.floor(final * total), interval, beta1, beta2)

    def budget(self, step: int, initial: int, target: int) -> tuple[int, bool]:
        """(budget, whether to mask now) at step ``step`` (from 0): PEFT's RankAllocator.budget_schedule."""
        if step <= self.tinit:
            return initial, False
        if step > self.total - self.tfinal:
            return target, True
        left = 1 - (step - self.tinit) / (self.total - self.tfinal - self.tinit)
        return int((initial - target) * left ** 3 + target), step % self.interval == 0


def delta(A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, scale) -> torch.Tensor:
    """scale * B @ (A * E): (..., out, in); ``scale`` a float or a (..., 1, 1) tensor."""
    return scale * (B @ (A * E.unsqueeze(-1)))


def orthogonality(adapters: list[nn.Module]) -> torch.Tensor:
    """PEFT's orthogonality penalty: the mean over every A and B of ||A A^T - I||_F and ||B^T B - I||_F; (...,)."""
    terms = []
    for ad in adapters:
        r = ad.A.shape[-2]
        eye = torch.eye(r, dtype=ad.A.dtype, device=ad.A.device)
        terms.append(torch.linalg.matrix_norm(ad.A @ ad.A.transpose(-1, -2) - eye))
        terms.append(torch.linalg.matrix_norm(ad.B.transpose(-1, -2) @ ad.B - eye))
    return torch.stack(terms).mean(0)


def score_buffers(layer: nn.Module) -> None:
    """Register the AdaLoRA buffers on ``layer`` (which holds A, E, B): each factor's smoothed sensitivity
    (``avg_A``, ...) and uncertainty (``unc_A``, ...), zero, and ``kept``, every triplet."""
    for name in SCORES:
        p = getattr(layer, name)
        layer.register_buffer(f"avg_{name}", torch.zeros_like(p.detach()))
        layer.register_buffer(f"unc_{name}", torch.zeros_like(p.detach()))
    layer.register_buffer("kept", torch.ones_like(layer.E.detach(), dtype=torch.bool))


class RankAllocator:
    """PEFT's RankAllocator and AdaLoraModel.update_and_allocate over the lab's adapters (lora.AdaLoRALinear or its
    stacked form): call ``after_step(step)`` after every optimizer step (step from 1, the gradients still there).
    Reads the factors and buffers from the layers each time, so a stack that drops runs needs nothing new here."""

    def __init__(self, adapters: list[nn.Module], target: int, schedule: Schedule):
        self.adapters, self.schedule = adapters, schedule
        self.initial = sum(ad.E.shape[-1] for ad in adapters)  # PEFT's init_bgt: every layer's initial rank
        self.target = target * len(adapters)  # target_bgt
        if not 0 < self.target < self.initial:
            raise ValueError(f"AdaLoRA needs a target rank below the initial one: {target} per layer of "
                             f"{self.initial // len(adapters)}")

    @classmethod
    def of_settings(cls, adapters: list[nn.Module], target: int, total: int, warmup: float, final: float,
                    interval: int, beta1: float, beta2: float) -> "RankAllocator":
        """The allocator with its schedule's warm-up and final phase as fractions of ``total`` steps."""
        return cls(adapters, target, Schedule.of_fractions(total, warmup, final, interval, beta1, beta2))

    def orthogonality(self) -> torch.Tensor:
        """The penalty on these adapters (``orthogonality``): (...,), one per run of a stack."""
        return orthogonality(self.adapters)

    @torch.no_grad()
    def after_step(self, step: int, *_) -> bool:
        """PEFT's update_and_allocate(global_step = step - 1); never a merge (returns False)."""
        t, s = step - 1, self.schedule
        end = s.total - s.tfinal
        if t < end:
            self._update_scores()
            budget, due = s.budget(t, self.initial, self.target)
            if due:
                self._mask_to(budget)
        elif t == end:
            self._mask_to(s.budget(t, self.initial, self.target)[0])
            for ad in self.adapters:  # PEFT's reset_ipt: the scores start again (they are no longer used)
                for name in SCORES:
                    getattr(ad, f"avg_{name}").zero_()
                    getattr(ad, f"unc_{name}").zero_()
        else:
            for ad in self.adapters:
                ad.E.masked_fill_(~ad.kept, 0.0)
        return False

    def _update_scores(self) -> None:
        b1, b2 = self.schedule.beta1, self.schedule.beta2
        for ad in self.adapters:
            for name in SCORES:
                p = getattr(ad, name)
                ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                avg, unc = getattr(ad, f"avg_{name}"), getattr(ad, f"unc_{name}")
                avg.mul_(b1).add_((1 - b1) * ipt)
                unc.mul_(b2).add_((1 - b2) * (ipt - avg).abs())

    def triplet_scores(self) -> list[torch.Tensor]:
        """Each layer's score of its r triplets, (..., r): E's + the mean of A's row + the mean of B's column."""
        out = []
        for ad in self.adapters:
            s = {name: getattr(ad, f"avg_{name}") * getattr(ad, f"unc_{name}") for name in SCORES}
            out.append(s["E"] + s["A"].mean(-1) + s["B"].mean(-2))
        return out

    def _mask_to(self, budget: int) -> None:
        """Keep the ``budget`` triplets of highest score across the layers (ties at the threshold masked, as PEFT)."""
        scores = self.triplet_scores()
        threshold = torch.cat(scores, dim=-1).kthvalue(self.initial - budget, dim=-1).values.unsqueeze(-1)
        for ad, score in zip(self.adapters, scores):
            ad.kept.copy_(score > threshold)
            ad.E.masked_fill_(~ad.kept, 0.0)

    def ranks(self) -> list[list[int]]:
        """The triplets each run keeps per layer: one list (a count per layer) per run (one for a plain model)."""
        counts = torch.stack([ad.kept.sum(-1) for ad in self.adapters], dim=-1)  # (..., layers)
        return counts.reshape(-1, len(self.adapters)).tolist()
