"""GaLore (Zhao et al., ICML 2024): Adam whose moments live in a rank-r subspace of each weight's gradient.

For a weight matrix W (m, n) with gradient G, every ``update_every`` steps (from the first) the
projection P is recomputed from the SVD of G on the smaller side:

- m >= n: P = the top-r right singular vectors, (r, n); the projected gradient is R = G P^T, (m, r);
- m <  n: P = the top-r left singular vectors, (m, r); R = P^T G, (r, n).

Adam runs on R (moments of R's shape: the optimizer state has rank r), and its normalised step N
is projected back (N P, or P N), multiplied by ``scale`` and applied with the bias-corrected step
size. Decoupled weight decay follows the step. Parameters of a group without "rank" (biases) get
the same Adam without projection. A parameter may carry leading dimensions (..., m, n): each
trailing matrix is an independent weight (the runs of a stack), with its own SVD.

The update rule is that of the authors' package galore-torch (its AdamW with proj_type "std");
``tests/test_scratch.py`` checks one and several steps against it.
"""
from __future__ import annotations

import math

import torch


class GaLoreAdamW(torch.optim.Optimizer):
    """Param groups with keys ``rank``, ``update_every`` and ``scale`` are projected; others are plain Adam."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        if lr <= 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"bad GaLoreAdamW settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @staticmethod
    def projection(grad: torch.Tensor, rank: int) -> torch.Tensor:
        """P of the module docstring for ``grad`` (..., m, n): (..., r, n) if m >= n, else (..., m, r)."""
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        p = vh[..., :rank, :] if grad.shape[-2] >= grad.shape[-1] else u[..., :, :rank]
        return p.to(grad.dtype)

    @staticmethod
    def project(grad: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        right = grad.shape[-2] >= grad.shape[-1]
        return grad @ p.transpose(-2, -1) if right else p.transpose(-2, -1) @ grad

    @staticmethod
    def project_back(low: torch.Tensor, p: torch.Tensor, full_shape: torch.Size) -> torch.Tensor:
        right = full_shape[-2] >= full_shape[-1]
        return low @ p if right else p @ low

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                grad, state = w.grad, self.state[w]
                if "step" not in state:
                    state["step"] = 0
                rank = group.get("rank")
                if rank is not None:
                    if state["step"] % group["update_every"] == 0:  # a fresh subspace; the moments are kept
                        state["projection"] = self.projection(grad, rank)
                    grad = self.project(grad, state["projection"])
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)  # (..., m, r) or (..., r, n) when projected
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                update = m / v.sqrt().add_(group["eps"])
                if rank is not None:
                    update = self.project_back(update, state["projection"], w.shape) * group["scale"]
                w.add_(update, alpha=-step_size)
                if group["weight_decay"] > 0:
                    w.add_(w, alpha=-group["lr"] * group["weight_decay"])
        return loss


def state_numel(optimizer: torch.optim.Optimizer) -> int:
    """Numbers held in the optimizer's state tensors (moments, projections, momentum buffers; not step counts)."""
    return sum(t.numel() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)
