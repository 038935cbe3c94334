"""Layers for training from scratch (scratch.py), each for R runs at once in the stacked engine.

A stack holds runs of one form and one rank (the seeds differ), so nothing is padded. Every layer
has a leading run dimension, draws run i's initial values from ``generators[i]`` in the order the
run alone (R = 1) draws them, and offers what stack.train_stack needs of a layer: ``ranks``,
``keep_runs``, ``trainable_count``.

Forms (``build`` makes an n_in-hidden-n_out MLP of one form; the task gives n_in and n_out):

- ``full``: nn.Linear layers (stack.StackedLinear), nn.Linear's default initialisation.
- ``lowrank``: W = U V, U (out, r), V (r, in), both U(-1/sqrt(r), 1/sqrt(r)) (the rank-dependent
  initialisation of the LoRALinear study), bias as nn.Linear's.
- ``lowrank_ae``: nn.Linear(in, r) then nn.Linear(r, out), both default-initialised, no non-linearity
  between them (the "autoencoder" form): W = U V plus an inner bias c, U(V x + c) + b.
- ``lte`` (LoRA-the-Explorer, Huh et al. 2024): a full weight W (nn.Linear's init) that changes only
  at merges, and N LoRA heads (A_n (r, in), B_n (out, r)), head n trained on the n-th of N contiguous
  shards of every batch: y_n = W x_n + b + s B_n A_n x_n. A merge (every T steps, by the caller)
  sets W <- W + s mean_n B_n A_n, then B_n = 0 and A_n is drawn afresh (LTE's "reset" variant;
  A_n: orthonormal rows times sqrt(in / r), LTE's initialisation). Evaluation uses W + s mean_n B_n A_n,
  the weights a merge would make. The bias is trained directly.
- ``lora``: the same layer with one head of rank N r: a single LoRA head at LTE's trainable count.
- ``galore``: the full form; the difference is the optimizer (galore.py).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.stack import StackedLinear, StackedModel, _replace_parameters, _Stacked


def _uniform(shape, bound: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.empty(shape, device=device).uniform_(-bound, bound, generator=g)


def linear_init(out: int, inp: int, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear(inp, out)'s default weight and bias, U(+-1/sqrt(in)) each, drawn from ``g``."""
    bound = inp ** -0.5
    return _uniform((out, inp), bound, g, device), _uniform((out,), bound, g, device)


def orthogonal_rows(r: int, inp: int, g: torch.Generator, device) -> torch.Tensor:
    """(r, inp) with orthonormal rows times sqrt(inp / r) (LTE's head initialisation), from ``g``."""
    q, upper = torch.linalg.qr(torch.randn(inp, r, generator=g, device=device))
    q = q * torch.sign(torch.diagonal(upper)).where(torch.diagonal(upper) != 0, torch.ones((), device=device))
    return q.T * (inp / r) ** 0.5


class _RunsLayer(_Stacked):
    """What every layer here shares: one rank for all runs, and dropping runs from the stack."""

    rank: int

    @property
    def runs(self) -> int:
        return self.bias.shape[0]

    @property
    def ranks(self) -> list[int]:
        return [self.rank] * self.runs

    @ranks.setter
    def ranks(self, value: list[int]) -> None:  # StackedModel.restore sets it; one rank per stack here
        if value and set(value) != {self.rank}:
            raise ValueError(f"a stack of this layer holds one rank ({self.rank}), got {value}")

    @torch.no_grad()
    def keep_runs(self, rows: torch.Tensor) -> dict[nn.Parameter, nn.Parameter]:
        return _replace_parameters(self, lambda name, p: p[rows])

    def trainable_count(self, i: int) -> int:
        return sum(p[i].numel() for p in self.parameters() if p.requires_grad)


class StackedFactorised(_RunsLayer):
    """R runs of a Linear whose weight is U V of rank r: form "lowrank" or "lowrank_ae" (module docstring)."""

    def __init__(self, inp: int, out: int, rank: int, form: str, generators: list[torch.Generator], device):
        super().__init__()
        if form not in ("lowrank", "lowrank_ae"):
            raise ValueError(f"unknown factorised form {form!r}; allowed: lowrank, lowrank_ae")
        self.rank, self.form = rank, form
        us, vs, cs, bs = [], [], [], []
        for g in generators:
            if form == "lowrank":  # U, V, then the bias, as a run alone draws them
                bound = rank ** -0.5
                us.append(_uniform((out, rank), bound, g, device))
                vs.append(_uniform((rank, inp), bound, g, device))
                bs.append(_uniform((out,), inp ** -0.5, g, device))
            else:  # nn.Linear(inp, rank) then nn.Linear(rank, out), each weight then bias
                v, c = linear_init(rank, inp, g, device)
                u, b = linear_init(out, rank, g, device)
                us.append(u), vs.append(v), cs.append(c), bs.append(b)
        self.U = nn.Parameter(torch.stack(us))  # (R, out, r)
        self.V = nn.Parameter(torch.stack(vs))  # (R, r, in)
        self.c = nn.Parameter(torch.stack(cs)) if cs else None  # (R, r), the inner bias of lowrank_ae
        self.bias = nn.Parameter(torch.stack(bs))  # (R, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (R, N, in), or (N, in) shared -> (R, N, out)
        h = x @ self.V.transpose(1, 2)  # (R, N, r)
        if self.c is not None:
            h = h + self.c.unsqueeze(1)
        return torch.baddbmm(self.bias.unsqueeze(1), h, self.U.transpose(1, 2))

    def weight(self) -> torch.Tensor:  # (R, out, in), of rank <= r
        return self.U @ self.V

    def extra_repr(self) -> str:
        return f"runs={self.runs}, in={self.V.shape[2]}, out={self.U.shape[1]}, rank={self.rank}, form={self.form}"


class StackedLTE(_RunsLayer):
    """R runs of an LTE layer with ``heads`` LoRA heads of rank r (module docstring)."""

    def __init__(self, inp: int, out: int, rank: int, heads: int, scale: float, generators: list[torch.Generator],
                 device):
        super().__init__()
        self.rank, self.heads, self.scale = rank, heads, scale
        ws, bs, As = [], [], []
        for g in generators:  # the weight and bias, then each head's A (B starts at zero)
            w, b = linear_init(out, inp, g, device)
            ws.append(w), bs.append(b)
            As.append(torch.stack([orthogonal_rows(rank, inp, g, device) for _ in range(heads)]))
        self.weight = nn.Parameter(torch.stack(ws), requires_grad=False)  # (R, out, in): changed by merges only
        self.bias = nn.Parameter(torch.stack(bs))  # (R, out)
        self.A = nn.Parameter(torch.stack(As))  # (R, N, r, in)
        self.B = nn.Parameter(torch.zeros(len(generators), heads, out, rank, device=device))  # (R, N, out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.dim() == 2:  # the merged function: W + s mean_n B_n A_n
            w = self.weight + self.delta_weight()
            return (x @ w.transpose(1, 2)) + self.bias.unsqueeze(1)
        h = torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))  # (R, b, out)
        shards = x.tensor_split(self.heads, dim=1)  # head n sees the n-th contiguous shard of the batch
        low = [(s @ self.A[:, n].transpose(1, 2)) @ self.B[:, n].transpose(1, 2) for n, s in enumerate(shards)]
        return h + self.scale * torch.cat(low, dim=1)

    def head_deltas(self) -> torch.Tensor:  # (R, N, out, in): s B_n A_n
        return self.scale * (self.B @ self.A)

    def delta_weight(self) -> torch.Tensor:  # (R, out, in): what a merge adds, the heads' mean
        return self.head_deltas().mean(1)

    @torch.no_grad()
    def merge(self, generators: list[torch.Generator]) -> None:
        """W += s mean_n B_n A_n; then B_n = 0 and each A_n re-drawn from its run's generator."""
        self.weight += self.delta_weight()
        self.B.zero_()
        inp = self.A.shape[-1]
        for i, g in enumerate(generators):
            for n in range(self.heads):
                self.A[i, n] = orthogonal_rows(self.rank, inp, g, self.A.device)

    def extra_repr(self) -> str:
        return (f"runs={self.runs}, in={self.A.shape[-1]}, out={self.B.shape[2]}, heads={self.heads}, "
                f"rank={self.rank}, scale={self.scale}")


# the forms ``build`` makes (galore: the full MLP, trained by galore.py's optimizer); scratch.py sweeps them
FORMS = ("full", "lowrank", "lowrank_ae", "lte", "lora", "galore")


class ScratchModel(StackedModel):
    """A Sequential of stacked layers and ReLUs: R runs of one from-scratch MLP."""
    row_wise, eval_batch, fold_adapters = True, None, False  # as models.MLP

    def __init__(self, layers: list[nn.Module]):
        nn.Module.__init__(self)
        body = []
        for layer in layers[:-1]:
            body += [layer, nn.ReLU()]
        self.body = nn.Sequential(*body, layers[-1])

    @property
    def linears(self) -> list[nn.Module]:
        return [m for m in self.body if not isinstance(m, nn.ReLU)]

    def lte_layers(self) -> list[StackedLTE]:
        return [m for m in self.body if isinstance(m, StackedLTE)]


def build(form: str, hidden: list[int], rank: int | None, generators: list[torch.Generator], device, *,
          n_in: int, n_out: int, lte_heads: int = 4) -> ScratchModel:
    """R = len(generators) runs of the ``form`` MLP n_in-hidden-n_out, layers drawn first to last."""
    dims = [n_in, *hidden, n_out]
    layers = []
    for inp, out in zip(dims[:-1], dims[1:]):
        if form in ("full", "galore"):
            w, b = zip(*(linear_init(out, inp, g, device) for g in generators))
            lin = StackedLinear(torch.stack(w), torch.stack(b))
            layers.append(lin)
        elif form in ("lowrank", "lowrank_ae"):
            layers.append(StackedFactorised(inp, out, rank, form, generators, device))
        elif form == "lte":
            layers.append(StackedLTE(inp, out, rank, lte_heads, 1.0, generators, device))
        elif form == "lora":  # LTE's baseline: one head holding all N heads' rank
            layers.append(StackedLTE(inp, out, rank * lte_heads, 1, 1.0, generators, device))
        else:
            raise ValueError(f"unknown form {form!r}")
    return ScratchModel(layers)
