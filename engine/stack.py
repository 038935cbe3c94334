"""The stacked engine: R runs trained at once as one model whose tensors carry a leading run dimension.

Run i of a stack is the same computation as that run trained alone by train.train() on the plain
model of models.py + lora.py; only the arithmetic is batched:

- every weight is (R, out, in), every bias (R, out), every adapter factor (R, r_max, in) / (R, out, r_max),
  every embedding table (R, V, d); layers use batched matrix products (``torch.baddbmm``);
- each run draws from its own torch.Generator, in the order the run alone would: its random
  factors at wrapping, at the start of each epoch its batch permutation, at each step its dropout
  masks (one layer after the other), at each merge its re-sampled factors (layer by layer);
- the loss is the sum over runs of each run's mean loss, so each run's gradient is its own, and
  AdamW is elementwise, so one optimizer over stacked tensors is R independent optimizers;
- runs of different ranks share a stack by zero-padding the factors to the stack's largest rank:
  padded entries start at zero, get exactly zero gradient and stay zero, so they change nothing;
- each run keeps its own early stopping: its best weights are kept, and a run that stops is taken
  out of the stack (tensors and optimizer state alike), so it no longer costs anything.

``tests/test_stack.py`` checks run-by-run agreement with train.train() for every registered method.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from data import Objective, Split, Task
from raclora import adalora
from raclora.factors import ROLES, FactorRoles, init_factor_, magnitude_scaled, principal_factors, row_norms
from lora import _set_submodule
from models import Positions, SeededDropout, Tokens, targeted
from randlora import draw_bases, num_bases, shared_dims, small_update
from raclora.errors import DIVERGED, Diverged, first_divergence
from train import MethodHooks, Record, adamw, logits_of, speed_setting


class StackedDropout(nn.Module):
    """SeededDropout for R runs: run i's mask is drawn from ``generators[i]`` with the run-alone shape."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.generators: list[torch.Generator] | None = None
        # examples of each run's batch that are real (None: all): a run whose batch is shorter than the stack's
        # (padded) draws masks for its own examples only, as it would alone
        self.valid: list[int] | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (R, N, ...)
        if not self.training or self.p == 0.0:
            return h
        if self.generators is None or len(self.generators) != h.shape[0]:
            raise RuntimeError("StackedDropout needs one generator per run: call set_generators(model, gens)")
        if self.valid is None:
            u = torch.empty_like(h)
            for row, g in zip(u, self.generators):  # each row: the draws torch.rand(row.shape, generator=g) makes
                row.uniform_(generator=g)
        else:
            u = torch.ones_like(h)  # padding is kept (it is masked out of the loss)
            for row, g, n in zip(u, self.generators, self.valid):
                row[:n].uniform_(generator=g)
        return h * u.ge_(self.p) / (1.0 - self.p)  # the mask 1.0 / 0.0 in place, as SeededDropout makes it

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _Stacked(nn.Module):
    """A layer of R runs: every parameter and buffer carries the run dimension first."""

    @property
    def runs(self) -> int:
        return next(self.parameters()).shape[0]

    @torch.no_grad()
    def keep_runs(self, rows: torch.Tensor) -> dict[nn.Parameter, nn.Parameter]:
        """Keep only the runs at positions ``rows``; returns {old parameter: its replacement}.

        New Parameter objects, not new ``.data``: autograd remembers a leaf's shape.
        """
        swap = _replace_parameters(self, lambda name, p: p[rows])
        for name, buf in list(self.named_buffers(recurse=False)):  # scale, and RandLoRA's bases
            setattr(self, name, buf[rows])
        return swap

    def run_state(self, i: int, prefix: str) -> dict[str, torch.Tensor]:
        """Run i's tensors under the names the plain model's layer gives them."""
        return {prefix + name: p[i] for name, p in self.named_parameters(recurse=False)}

    def trainable_count(self, i: int) -> int:
        """Run i's trainable parameters."""
        return sum(p[i].numel() for p in self.parameters(recurse=False) if p.requires_grad)


class StackedLayerNorm(_Stacked):
    """R nn.LayerNorm over the last dimension: weight and bias (R, d)."""

    def __init__(self, plain: nn.LayerNorm, runs: int):
        super().__init__()
        self.weight, self.bias, self.eps = _expand(plain.weight, runs), _expand(plain.bias, runs), plain.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (R, ..., d)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight.view(shape) + self.bias.view(shape)


class StackedTokens(_Stacked):
    """models.Tokens for R runs: class tokens (R, d), positions (R, T, d)."""

    def __init__(self, plain: nn.Module, runs: int):
        super().__init__()
        self.cls, self.pos = _expand(plain.cls, runs), _expand(plain.pos, runs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (R, N, P, d) -> (R, N, P + 1, d)
        runs, n, _, d = x.shape
        cls = self.cls.view(runs, 1, 1, d).expand(runs, n, 1, d)
        return torch.cat([cls, x], dim=-2) + self.pos.unsqueeze(1)


class StackedEmbedding(_Stacked):
    """nn.Embedding for R runs: tables (R, V, d), run i's token ids looked up in run i's own table. Full
    fine-tuning trains each run's table; an adapted stack keeps them frozen (the base model's, in every run)."""

    def __init__(self, plain: nn.Embedding, runs: int):
        super().__init__()
        if plain.padding_idx is not None or plain.max_norm is not None or plain.scale_grad_by_freq or plain.sparse:
            raise TypeError("only an nn.Embedding without padding_idx, max_norm, scale_grad_by_freq or sparse "
                            "has a stacked form")
        self.weight = _expand(plain.weight, runs)  # (R, V, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (R, ...) int64 ids -> (R, ..., d)
        runs, vocab = self.weight.shape[:2]
        # one lookup in the (R*V, d) table of every run: run r's token v is its row r*V + v
        offsets = torch.arange(0, runs * vocab, vocab, device=x.device).view(runs, *(1,) * (x.dim() - 1))
        return F.embedding(x + offsets, self.weight.flatten(0, 1))


class StackedPositions(_Stacked):
    """models.Positions for R runs: positions (R, context, d)."""

    def __init__(self, plain: Positions, runs: int):
        super().__init__()
        self.weight = _expand(plain.weight, runs)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (R, N, T, d) -> (R, N, T, d)
        return h + self.weight[:, :h.shape[-2]].unsqueeze(1)


class StackedLinear(_Stacked):
    """R independent Linear layers: weight (R, out, in), bias (R, out), ordinary (trainable) parameters,
    as full fine-tuning trains them. StackedLoRALinear and StackedRandLoRALinear add an adapter."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (R, out, in)
        self.bias = nn.Parameter(bias)  # (R, out)
        self.ranks: list[int] = []  # each run's adapter rank; [] = no adapter

    def _frozen_base(self) -> None:
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)

    def weight_now(self) -> torch.Tensor:  # (R, out, in): the weight the layer applies
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (R, ..., in), one batch per run, or (N, in) shared by every run; returns (R, ..., out)."""
        if x.dim() == 2:  # evaluation: one product for all runs, (N, in) @ (in, R*out), adapter folded in
            h = (x @ self.weight_now().flatten(0, 1).T).view(x.shape[0], self.runs, -1).transpose(0, 1)
            return h + self.bias.unsqueeze(1)
        return self._rows(x, lambda x3: torch.baddbmm(self.bias.unsqueeze(1), x3, self.weight.transpose(1, 2)))

    @staticmethod
    def _rows(x: torch.Tensor, f) -> torch.Tensor:
        """f applied to x viewed as (R, rows, in); the result viewed back as (R, ..., out)."""
        if x.dim() == 3:
            return f(x)
        y = f(x.reshape(x.shape[0], -1, x.shape[-1]))
        return y.view(*x.shape[:-1], y.shape[-1])

    @torch.no_grad()
    def keep_runs(self, rows: torch.Tensor) -> dict[nn.Parameter, nn.Parameter]:
        swap = super().keep_runs(rows)
        self.ranks = [self.ranks[i] for i in rows.tolist()] if self.ranks else []
        return swap

    def extra_repr(self) -> str:
        return f"runs={self.runs}, in={self.weight.shape[2]}, out={self.weight.shape[1]}, ranks={self.ranks}"


class _StackedAdapter(StackedLinear):
    """What every adapted stacked layer shares: the frozen base, W + delta applied, merge adds delta into W."""

    def weight_now(self) -> torch.Tensor:
        return self.weight + self.delta_weight()

    def delta_weight(self) -> torch.Tensor:  # (R, out, in)
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        self.weight += self.delta_weight()


class StackedLoRALinear(FactorRoles, _StackedAdapter):
    """R frozen Linear layers, each with a low-rank adapter ``scale_i * B_i @ A_i``: factors A (R, r_max, in)
    and B (R, out, r_max), zero-padded to the stack's largest rank.

    The adapter interface is that of lora.LoRALinear (A, B, zero_factor, random_factor, delta_weight,
    merge, reset), with the run dimension in front and one generator per run where LoRALinear takes one
    generator, so the method strategies of methods.py drive both without knowing which they drive.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, ranks: list[int], scales: list[float], sketch: str,
                 random_init: str, generators: list[torch.Generator]):
        super().__init__(weight, bias)
        if sketch not in ROLES:
            raise ValueError(f"unknown sketch {sketch!r}; allowed: {', '.join(ROLES)}")
        if len(ranks) != self.runs or len(scales) != self.runs or len(generators) != self.runs:
            raise ValueError(f"need one rank, scale and generator per run ({self.runs})")
        self._frozen_base()
        r, (out, inp), kw = max(ranks), self.weight.shape[1:], dict(device=self.weight.device, dtype=self.weight.dtype)
        self.A = nn.Parameter(torch.zeros(self.runs, r, inp, **kw))
        self.B = nn.Parameter(torch.zeros(self.runs, out, r, **kw))
        self.register_buffer("scale", torch.tensor(scales, **kw).view(-1, 1, 1))
        self.same_scale = float(scales[0]) if len(set(scales)) == 1 else None
        self.ranks = list(ranks)
        self.sketch, self.random_init = sketch, random_init
        self.zero_name, self.random_name = ROLES[sketch]
        self.fold = False  # forward through W + delta in one product (set by StackedModel.wrap)
        self.reset(generators)

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        return self.A, self.B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return super().forward(x)
        return self._rows(x, self._forward3)

    def _forward3(self, x: torch.Tensor) -> torch.Tensor:  # (R, N, in) -> (R, N, out)
        if self.fold:  # one product with W + delta (the model's fold_adapters)
            return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight_now().transpose(1, 2))
        h = torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))
        xa = x @ self.A.transpose(1, 2)  # (R, N, r)
        if self.same_scale is not None:  # one scale for every run: fold it into the product
            return torch.baddbmm(h, xa, self.B.transpose(1, 2), alpha=self.same_scale)
        return h + self.scale * (xa @ self.B.transpose(1, 2))

    def delta_weight(self) -> torch.Tensor:  # (R, out, in)
        return self.scale * (self.B @ self.A)

    @torch.no_grad()
    def reset(self, generators: list[torch.Generator], resample_random: bool = True) -> None:
        """Zero the zero factor; re-draw each run's random factor (its own rank only) from its generator."""
        self.zero_factor.zero_()
        if not resample_random:
            return
        factor = self.random_factor
        for i, (rank, g) in enumerate(zip(self.ranks, generators)):
            # draw into a fresh tensor of the run-alone shape, so the draws are the run-alone draws
            if self.random_name == "A":
                factor[i, :rank] = init_factor_(torch.empty_like(factor[i, :rank]), self.random_init, g)
            else:
                factor[i, :, :rank] = init_factor_(torch.empty_like(factor[i, :, :rank]), self.random_init, g)

    @torch.no_grad()
    def principal_init_(self) -> None:
        """PiSSA, run by run as lora.LoRALinear.principal_init_ makes it (each run's own rank; padding stays 0)."""
        for i, r in enumerate(self.ranks):
            self.A[i, :r], self.B[i, :, :r], self.weight[i] = principal_factors(self.weight[i], r, float(self.scale[i]))

    def run_state(self, i: int, prefix: str) -> dict[str, torch.Tensor]:
        """Run i's tensors under the names lora.LoRALinear gives them (padding cut off)."""
        r = self.ranks[i]
        return {prefix + "base.weight": self.weight[i], prefix + "base.bias": self.bias[i],
                prefix + "A": self.A[i, :r], prefix + "B": self.B[i, :, :r]}

    def trainable_count(self, i: int) -> int:
        r_max, r = self.A.shape[1], self.ranks[i]
        return sum(p[i].numel() // r_max * r for p in (self.A, self.B) if p.requires_grad)


class StackedDoRALinear(StackedLoRALinear):
    """lora.DoRALinear for R runs: the magnitudes m (R, out) beside the factors; each run's layer applies
    ``m_i * (W_i + delta_i) / ||W_i + delta_i||`` (row norms, detached), in one product."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, ranks: list[int], scales: list[float], sketch: str,
                 random_init: str, generators: list[torch.Generator]):
        super().__init__(weight, bias, ranks, scales, sketch, random_init, generators)
        self.m = nn.Parameter(row_norms(self.weight.detach()).clone())  # (R, out)

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        return self.A, self.B, self.m

    def weight_now(self) -> torch.Tensor:  # (R, out, in)
        return magnitude_scaled(self.weight + super().delta_weight(), self.m)

    def _forward3(self, x: torch.Tensor) -> torch.Tensor:  # (R, N, in) -> (R, N, out)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight_now().transpose(1, 2))

    def delta_weight(self) -> torch.Tensor:
        return self.weight_now() - self.weight

    @torch.no_grad()
    def reset(self, generators: list[torch.Generator], resample_random: bool = True) -> None:
        super().reset(generators, resample_random)
        if getattr(self, "m", None) is not None:  # (StackedLoRALinear.__init__ resets before m exists)
            self.m.copy_(row_norms(self.weight))

    def run_state(self, i: int, prefix: str) -> dict[str, torch.Tensor]:
        return {**super().run_state(i, prefix), prefix + "m": self.m[i]}

    def trainable_count(self, i: int) -> int:
        return super().trainable_count(i) + (self.m.shape[1] if self.m.requires_grad else 0)


class StackedAdaLoRALinear(StackedLoRALinear):
    """lora.AdaLoRALinear for R runs of one rank (an AdaLoRA stack holds one rank: the budget is per run, across
    layers): E (R, r) beside A (R, r, in) and B (R, out, r), the allocator's buffers with the run dimension first
    (keep_runs slices them with the rest); each run's A and B drawn from its generator as the plain layer draws them."""

    rank_allocator = adalora.RankAllocator

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, ranks: list[int], scales: list[float], sketch: str,
                 random_init: str, generators: list[torch.Generator]):
        if len(set(ranks)) != 1:
            raise ValueError(f"an AdaLoRA stack holds one rank, got {sorted(set(ranks))}")
        super().__init__(weight, bias, ranks, scales, sketch, random_init, generators)  # draws A and B (reset)
        self.E = nn.Parameter(self.A.new_zeros(self.runs, ranks[0]))
        adalora.score_buffers(self)

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        return self.A, self.E, self.B

    def _forward3(self, x: torch.Tensor) -> torch.Tensor:  # (R, N, in) -> (R, N, out)
        h = torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))
        return h + self.scale * ((x @ (self.A * self.E.unsqueeze(-1)).transpose(1, 2)) @ self.B.transpose(1, 2))

    def delta_weight(self) -> torch.Tensor:  # (R, out, in)
        return adalora.delta(self.A, self.E, self.B, self.scale)

    @torch.no_grad()
    def reset(self, generators: list[torch.Generator], resample_random: bool = True) -> None:
        if hasattr(self, "E"):  # (StackedLoRALinear.__init__ draws A and B before E exists)
            self.E.zero_()
        if resample_random:
            for i, g in enumerate(generators):  # run i draws A then B from its generator, as it would alone
                self.A[i] = torch.empty_like(self.A[i]).normal_(0.0, adalora.INIT_STD, generator=g)
                self.B[i] = torch.empty_like(self.B[i]).normal_(0.0, adalora.INIT_STD, generator=g)

    def run_state(self, i: int, prefix: str) -> dict[str, torch.Tensor]:
        """Run i's tensors under the names lora.AdaLoRALinear gives them, its allocator's buffers included."""
        return {**super().run_state(i, prefix), prefix + "E": self.E[i],
                **{prefix + name: b[i] for name, b in self.named_buffers(recurse=False) if name != "scale"}}

    def trainable_count(self, i: int) -> int:
        return sum(p[i].numel() for p in self.adapter_parameters() if p.requires_grad)


class StackedRandLoRALinear(_StackedAdapter):
    """R frozen Linear layers with RandLoRA (one rank for the stack): slices of each run's shared bases,
    a_shared (R, r, D_min) and b_shared (R, D_max, N_max, r), as randlora.RandLoRALinear takes them, and
    the trained lam (R, r, N), gam (R, N, d_min)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, rank: int, scales: list[float],
                 a_shared: torch.Tensor, b_shared: torch.Tensor):
        super().__init__(weight, bias)
        self._frozen_base()
        out, inp = self.weight.shape[1:]
        self.d_min, self.d_max, self.transposed = min(out, inp), max(out, inp), out < inp
        n, kw = num_bases(self.d_min, rank), dict(device=self.weight.device, dtype=self.weight.dtype)
        self.register_buffer("A", a_shared[:, :, :self.d_min].clone())
        self.register_buffer("Bases", b_shared[:, :self.d_max, :n, :].clone())
        self.lam = nn.Parameter(torch.zeros(self.runs, rank, n, **kw))
        self.gam = nn.Parameter(torch.full((self.runs, n, self.d_min), 1.0 / self.d_max, **kw))
        self.register_buffer("scale", torch.tensor(scales, **kw).view(-1, 1, 1))
        self.ranks = [rank] * self.runs

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]:
        return self.lam, self.gam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return super().forward(x)
        # the update is full-size anyway: one product with W + dW
        w = self.weight_now().transpose(1, 2)
        return self._rows(x, lambda x3: torch.baddbmm(self.bias.unsqueeze(1), x3, w))

    def delta_weight(self) -> torch.Tensor:  # (R, out, in)
        d = small_update(self.A, self.Bases, self.lam, self.gam)  # (R, d_max, d_min)
        return self.scale * (d.transpose(1, 2) if self.transposed else d)

    def run_state(self, i: int, prefix: str) -> dict[str, torch.Tensor]:
        """Run i's tensors under the names randlora.RandLoRALinear gives them."""
        return {prefix + "base.weight": self.weight[i], prefix + "base.bias": self.bias[i],
                prefix + "A": self.A[i], prefix + "Bases": self.Bases[i], prefix + "lam": self.lam[i],
                prefix + "gam": self.gam[i]}

    def trainable_count(self, i: int) -> int:
        return sum(p[i].numel() for p in (self.lam, self.gam) if p.requires_grad)


def _copies(p: torch.Tensor, runs: int) -> torch.Tensor:
    """R copies of a plain tensor: (R, *p.shape)."""
    return p.detach().expand(runs, *p.shape).clone()


def _expand(p: torch.Tensor, runs: int) -> nn.Parameter:
    """R copies of a plain parameter, trainable as p is."""
    return nn.Parameter(_copies(p, runs), requires_grad=p.requires_grad)


STACKED_LAYERS = {"lora": StackedLoRALinear, "dora": StackedDoRALinear, "adalora": StackedAdaLoRALinear}  # lora.LAYERS' stacked forms

# plain layer type -> its stacked form (a layer with parameters that is not here cannot be stacked)
STACKED = {
    nn.Linear: lambda m, runs: StackedLinear(_copies(m.weight, runs), _copies(m.bias, runs)),
    nn.LayerNorm: StackedLayerNorm,
    Tokens: StackedTokens,
    nn.Embedding: StackedEmbedding,
    Positions: StackedPositions,
    SeededDropout: lambda m, runs: StackedDropout(m.p),
}


class StackedModel(nn.Module):
    """R copies of a model of models.py: a copy of the model with every layer swapped for its stacked form
    (STACKED), under the same names, so that the model's own forward runs R runs at once."""

    def __init__(self, plain: nn.Module, runs: int):
        super().__init__()
        self.body = copy.deepcopy(plain)
        self.row_wise, self.eval_batch, self.fold_adapters = plain.row_wise, plain.eval_batch, plain.fold_adapters
        for name, m in list(self.body.named_modules()):
            if type(m) in STACKED:
                _set_submodule(self.body, name, STACKED[type(m)](m, runs))
            elif any(True for _ in m.parameters(recurse=False)):
                raise TypeError(f"cannot stack {name} ({type(m).__name__}): only "
                                f"{', '.join(t.__name__ for t in STACKED)} have a stacked form")

    example_dim = 1  # outputs (R, N, ...): the examples follow the run dimension (train.logits_of)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (R, N, features) or (R, N, T) token ids, one batch per run, or a split's (N, features) or (N, T)
        shared by every run; returns (R, N, classes) or (R, N, T, V) logits."""
        if x.dim() == 2 and not self.row_wise:  # a shared input: one view of it per run
            x = x.expand(self.runs, *x.shape)
        return self.body(x)

    def _stacked(self) -> list[tuple[str, _Stacked]]:
        return [(n, m) for n, m in self.body.named_modules() if isinstance(m, _Stacked)]

    @property
    def linears(self) -> list[StackedLinear]:
        return [m for m in self.body.modules() if isinstance(m, StackedLinear)]

    @property
    def runs(self) -> int:
        return self.linears[0].runs

    def set_generators(self, generators: list[torch.Generator], valid: list[int] | None = None) -> None:
        """Each run's generator for its dropout masks, and (``valid``) how many examples of its batch are real."""
        for m in self.body.modules():
            if isinstance(m, StackedDropout):
                m.generators, m.valid = list(generators), (None if valid is None else list(valid))

    def _replace_linears(self, make, targets) -> list[StackedLinear]:
        """Freeze every parameter, swap each plain StackedLinear that ``targets`` selects (models.targeted),
        in module order, for ``make(weight, bias)``; return the new layers."""
        for p in self.parameters():
            p.requires_grad_(False)
        made = []
        for name, m in list(self.body.named_modules()):
            if type(m) is StackedLinear and targeted(name, targets):
                made.append(make(m.weight.detach(), m.bias.detach()))
                _set_submodule(self.body, name, made[-1])
        return made

    def wrap(self, ranks: list[int], scales: list[float], sketch: str, random_init: str,
             generators: list[torch.Generator], targets: list[str] | None = None,
             layer: str = "lora") -> list[StackedLoRALinear]:
        """Adapters on the targeted layers (``layer``: "lora", or "dora" for DoRA's), drawn layer by layer as
        lora.wrap_linears draws them; returns them."""
        kind = STACKED_LAYERS[layer]
        made = self._replace_linears(lambda w, b: kind(w, b, ranks, scales, sketch, random_init, generators), targets)
        for m in made:
            m.fold = self.fold_adapters
        return made

    def wrap_randlora(self, rank: int, scales: list[float], generators: list[torch.Generator],
                      targets: list[str] | None = None) -> list[StackedRandLoRALinear]:
        """RandLoRA on the targeted layers; each run's shared bases drawn as randlora.wrap_randlora draws them."""
        chosen = [m for n, m in self.body.named_modules() if type(m) is StackedLinear and targeted(n, targets)]
        d_max, d_min = shared_dims([tuple(lin.weight.shape[1:]) for lin in chosen])
        w = chosen[0].weight
        drawn = [draw_bases(rank, d_max, d_min, g, w.device, w.dtype) for g in generators]
        a, b = torch.stack([d[0] for d in drawn]), torch.stack([d[1] for d in drawn])
        return self._replace_linears(lambda w, bias: StackedRandLoRALinear(w, bias, rank, scales, a, b), targets)

    def keep_runs(self, rows: torch.Tensor) -> dict[nn.Parameter, nn.Parameter]:
        swap = {}
        for _, m in self._stacked():
            swap.update(m.keep_runs(rows))
        return swap

    @torch.no_grad()
    def restore(self, state: dict[str, torch.Tensor], ranks: list[list[int]]) -> None:
        """Undo keep_runs: take every tensor from ``state`` (a state_dict of all runs) and each layer's ranks."""
        for lin, r in zip(self.linears, ranks):
            lin.ranks = list(r)
        _replace_parameters(self, lambda name, p: state[name].clone())
        for name, _ in list(self.named_buffers()):
            module, attr = name.rsplit(".", 1)
            setattr(self.get_submodule(module), attr, state[name].clone())

    def run_state(self, i: int) -> dict[str, torch.Tensor]:
        """Run i as a state dict of the plain model (with LoRALinear / RandLoRALinear layers if adapted)."""
        state = {}
        for name, m in self._stacked():
            state.update(m.run_state(i, name + "."))
        return state

    def trainable_count(self, i: int) -> int:
        return sum(m.trainable_count(i) for _, m in self._stacked())


@torch.no_grad()
def evaluate_stack(model: StackedModel, split: Split, objective: Objective) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, metric) of every run on ``split`` under ``objective``, each an (R,) tensor, in eval mode."""
    was_training = model.training
    model.eval()
    logits = logits_of(model, split.x)  # (R, N, C) or, for sequences, (R, N, T, V)
    y = split.y.expand(logits.shape[0], *split.y.shape)  # (R, N) or (R, N, T)
    loss = objective.losses(logits, y).mean(1)
    acc = objective.correct(logits, y).mean(1)  # float32, as train.evaluate computes it
    model.train(was_training)
    return loss, acc


def train_stack(model: StackedModel, params: list[nn.Parameter], task: Task, *, generators: list[torch.Generator],
                lr: float, weight_decay: float, batch_size: int, max_epochs: int, patience: int,
                on_epoch_end: Callable[[int, list[torch.Generator]], bool] | None = None,
                reset_optimizer_on_merge: bool = False,
                on_step_end: Callable[[int, list[torch.Generator]], bool] | None = None,
                lr_lambda: Callable[[int], float] | None = None,
                penalty: Callable[[], torch.Tensor] | None = None, report: Callable[[], list[dict]] | None = None,
                progress: Callable[[int, int], None] | None = None,
                make_optimizer: Callable[[list], torch.optim.Optimizer] | None = None,
                epoch_steps: int = 0) -> list[Record]:
    """train.train() for every run of the stack at once; returns one Record per run, in stack order.

    ``on_epoch_end(epoch, generators)`` and ``on_step_end(step, generators)`` get the generators of
    the runs still training (the model holds just those runs). ``progress(epoch, runs_still_training)`` is called after each epoch.
    ``make_optimizer(params)`` replaces the default AdamW(params, lr, weight_decay) (train.adamw; an optimizer whose
    state is elementwise or per matrix, so that the runs stay independent). ``epoch_steps`` > 0 makes an epoch
    (an evaluation, a curve entry) that many optimizer steps instead of one pass over the training split: the
    passes run on across epochs, each a fresh permutation drawn when the last one is used up (a long split
    still gets a curve with many points). Each curve entry also holds ``step`` (optimizer steps so far),
    ``wall_s`` (each run's share of the stack's training seconds so far, evaluations left out) and
    ``test_loss``. On return the model holds every run, each at its best weights.
    """
    runs = model.runs
    if len(generators) != runs:
        raise ValueError(f"need one generator per run: {len(generators)} for {runs} runs")
    device = task.train.x.device
    optimizer = (make_optimizer(params) if make_optimizer is not None
                 else adamw(params, lr, weight_decay))
    # every run of the stack steps and merges at the same times: one set of hooks (train.MethodHooks) for all
    hooks = MethodHooks(optimizer, on_epoch_end, on_step_end, reset_optimizer_on_merge, lr_lambda, penalty, report)
    merges_at_epoch_start = 0
    records = [Record() for _ in range(runs)]
    best = {k: v.detach().clone() for k, v in model.state_dict().items()}  # every run, at its best so far
    ranks = [list(lin.ranks) for lin in model.linears]
    active = list(range(runs))  # stack row -> run index
    gens = list(generators)
    stale = [0] * runs
    t0 = time.perf_counter()
    x, y, n = task.train.x, task.train.y, len(task.train)
    objective = task.spec.objective  # the task's loss and metric
    dtype = next(model.parameters()).dtype  # of the losses, whatever the inputs are (token ids: int64)
    steps = epoch_steps or -(-n // batch_size)  # optimizer steps an epoch: by default one pass over the split
    at, train_s = n, 0.0  # where the next batch of the pass starts (n: draw a new pass); training seconds so far
    per_step = speed_setting().check == "step"  # test the losses for divergence at every step (else once an epoch)

    def leave(found: list[Diverged | None]) -> bool:
        """As train.train: the live rows with a Diverged in ``found`` are recorded as diverged at its step (their
        unfinished epoch not recorded) and leave the stack; False when no run is left."""
        nonlocal active, gens, perms, loss_sum
        keep = [r for r, d in enumerate(found) if d is None]
        for row, d in enumerate(found):
            if d is not None:
                records[active[row]].status, records[active[row]].diverged_step = DIVERGED, d.step
        active, gens = [active[r] for r in keep], [gens[r] for r in keep]
        if active and len(keep) < len(found):
            _keep_rows(model, optimizer, torch.tensor(keep, device=device))
            model.set_generators(gens)
            perms, loss_sum = perms[keep], loss_sum[keep]
        return bool(active)

    for epoch in range(1, max_epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        model.set_generators(gens)
        loss_sum = torch.zeros(len(active), device=device, dtype=dtype)
        seen = 0  # examples of each run's batches this epoch
        losses_seen, first_step = [], hooks.step + 1  # this epoch's (live,) losses on the device (SPEED.check)
        # one buffer for every batch (no allocation per step), of the inputs' dtype: floats or int64 token ids
        buf = x.new_empty(len(active) * batch_size, *x.shape[1:])
        for _ in range(steps):
            if at >= n:  # a new pass over the training split
                perms = torch.stack([torch.randperm(n, generator=g, device=device) for g in gens])  # (live, n)
                at = 0
            idx = perms[:, at:at + batch_size]  # (live, b)
            at += batch_size
            flat = idx.flatten()
            xb = torch.index_select(x, 0, flat, out=buf[:flat.numel()])
            logits = model(xb.view(*idx.shape, *x.shape[1:]))  # (live, b, C) or (live, b, T, V)
            losses = objective.losses(logits.flatten(0, 1), y.index_select(0, flat))
            per_run = losses.view(idx.shape).mean(1)  # (live,): each run's mean loss over its batch
            bad = ~torch.isfinite(per_run)
            if per_step:  # one transfer a step (before)
                found = first_divergence([per_run.tolist()], hooks.step + 1)
                bad = bad if any(found) else None
            else:
                losses_seen.append(per_run.detach())
            optimizer.zero_grad(set_to_none=True)
            total = hooks.objective(per_run)  # (live,): each run's loss and its method's penalty
            (total if bad is None else total.where(~bad, 0.0)).sum().backward()
            if bad is not None:  # a non-finite row steps on a zero gradient; rows never mix,
                _zero_rows(optimizer, bad)  # so the other runs take exactly the step they take alone
            optimizer.step()
            loss_sum += per_run.detach() * idx.shape[1]
            seen += idx.shape[1]
            hooks.after_step(gens)
            if per_step and any(found) and not leave(found):
                break
        if losses_seen:  # SPEED.check "epoch": every step's losses read back at once
            leave(first_divergence(torch.stack(losses_seen).tolist(), first_step))
        if not active:
            break
        live = len(active)
        hooks.after_epoch(epoch, gens)
        train_s += time.perf_counter() - t_epoch
        val_loss, val_acc = evaluate_stack(model, task.val, objective)
        test_loss, test_acc = evaluate_stack(model, task.test, objective)
        columns = [(loss_sum / seen).tolist(), val_loss.tolist(), val_acc.tolist(), test_acc.tolist(),
                   test_loss.tolist()]
        improved, stopped = [], []
        merged = hooks.merges > merges_at_epoch_start
        merges_at_epoch_start = hooks.merges
        extra = hooks.columns(live)
        for row, (run, tl, vl, va, ta, tel) in enumerate(zip(active, *columns)):
            rec = records[run]
            rec.curve.append({"epoch": epoch, "train_loss": tl, "val_loss": vl, "val_acc": va,
                              "test_acc": ta, "merged": merged, "step": hooks.step, "wall_s": train_s / runs,
                              "test_loss": tel, **extra[row]})
            rec.epochs, rec.merges = epoch, hooks.merges
            if vl < rec.best_val_loss:
                rec.best_val_loss, rec.best_epoch, stale[run] = vl, epoch, 0
                improved.append(row)
            else:
                stale[run] += 1
            if stale[run] >= patience:
                stopped.append(row)
        if improved:
            _copy_rows(best, model.state_dict(), [active[r] for r in improved], improved)
        if progress is not None:
            progress(epoch, live - len(stopped))
        if stopped:
            keep = [r for r in range(live) if r not in stopped]
            if not keep:
                break
            _keep_rows(model, optimizer, torch.tensor(keep, device=device))
            active, gens = [active[r] for r in keep], [gens[r] for r in keep]
            perms = perms[keep]  # a pass that runs on into the next epoch (epoch_steps)
    model.restore(best, ranks)  # every run back in the stack, at its best weights
    wall = time.perf_counter() - t0
    for rec in records:
        rec.wall_s = wall / runs  # each run's share of the stack's time
    return records


@torch.no_grad()
def _zero_rows(optimizer: torch.optim.Optimizer, rows: torch.Tensor) -> None:
    """Zero the gradient of the runs ``rows`` (a (live,) bool mask) in every stacked parameter, on the device (no
    host sync: a filled mask, where ``grad[rows] = 0`` would read the mask back)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.masked_fill_(rows.view(-1, *[1] * (p.grad.dim() - 1)), 0.0)


@torch.no_grad()
def _copy_rows(dst: dict[str, torch.Tensor], src: dict[str, torch.Tensor], dst_rows: list[int],
               src_rows: list[int]) -> None:
    d, s = torch.tensor(dst_rows), torch.tensor(src_rows)
    for k, v in src.items():
        dst[k][d.to(dst[k].device)] = v[s.to(v.device)]


def _replace_parameters(module: nn.Module, make) -> dict[nn.Parameter, nn.Parameter]:
    """Replace every parameter of ``module`` (and below) by Parameter(make(qualified name, old tensor))."""
    swap = {}
    for name, p in list(module.named_parameters()):
        owner, _, attr = name.rpartition(".")
        new = nn.Parameter(make(name, p.detach()), requires_grad=p.requires_grad)
        setattr(module.get_submodule(owner) if owner else module, attr, new)
        swap[p] = new
    return swap


def _keep_rows(model: StackedModel, optimizer: torch.optim.Optimizer, rows: torch.Tensor) -> None:
    """Drop the runs that stopped from the model and from AdamW's moments (step counts are shared)."""
    runs = model.runs
    swap = model.keep_runs(rows)
    for group in optimizer.param_groups:
        group["params"] = [swap.get(p, p) for p in group["params"]]
    for old, new in swap.items():
        if old in optimizer.state:
            optimizer.state[new] = {k: v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == runs else v
                                    for k, v in optimizer.state.pop(old).items()}
