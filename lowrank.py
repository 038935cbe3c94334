"""Layers for training from scratch (scratch.py), each for R runs at once in the stacked engine.

A stack holds runs of one form and one rank (the seeds differ), so nothing is padded. Every layer
has a leading run dimension, draws run i's initial values from ``generators[i]`` in the order the
run alone (R = 1) draws them, and offers what stack.train_stack needs of a layer: ``ranks``,
``keep_runs``, ``trainable_count``.

Forms (``build`` makes an n_in-hidden-n_out MLP of one form, the task giving n_in and n_out; ``build_gpt``
the registry's gpt with every Linear, the head included, in the form: its embeddings, positions and
LayerNorms train in full in every form):

- ``full``: nn.Linear layers (stack.StackedLinear), nn.Linear's default initialisation (the gpt: its own,
  models.build_model's, which draws every Linear as nn.Linear does).
- ``lowrank``: W = U V, U (out, r), V (r, in), both U(-1/sqrt(r), 1/sqrt(r)) (the rank-dependent
  initialisation of the LoRALinear study), bias as nn.Linear's.
- ``lowrank_ae``: nn.Linear(in, r) then nn.Linear(r, out), both default-initialised, no non-linearity
  between them (the "autoencoder" form): W = U V plus an inner bias c, U(V x + c) + b.
- ``lte`` (LoRA-the-Explorer, Huh et al. 2024): a full weight W (the full form's init) that changes only
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

import models
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


def _rows(x: torch.Tensor, f) -> torch.Tensor:
    """f applied to x (R, N, ..., in) viewed as (R, rows, in); the result viewed back as (R, N, ..., out)."""
    if x.dim() == 3:
        return f(x)
    y = f(x.reshape(x.shape[0], -1, x.shape[-1]))
    return y.view(*x.shape[:-1], y.shape[-1])


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (R, N, ..., in), or (N, in) shared -> (R, N, ..., out)
        if x.dim() == 2:
            return self._forward3(x)
        return _rows(x, self._forward3)

    def _forward3(self, x: torch.Tensor) -> torch.Tensor:  # (R, M, in) or (M, in) -> (R, M, out)
        h = x @ self.V.transpose(1, 2)  # (R, M, r)
        if self.c is not None:
            h = h + self.c.unsqueeze(1)
        return torch.baddbmm(self.bias.unsqueeze(1), h, self.U.transpose(1, 2))

    def weight(self) -> torch.Tensor:  # (R, out, in), of rank <= r
        return self.U @ self.V

    def extra_repr(self) -> str:
        return f"runs={self.runs}, in={self.V.shape[2]}, out={self.U.shape[1]}, rank={self.rank}, form={self.form}"


class StackedLTE(_RunsLayer):
    """R runs of an LTE layer with ``heads`` LoRA heads of rank r on the initial weight (R, out, in) and bias
    (R, out) (module docstring); each run's heads' A drawn from its generator (B starts at zero)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, rank: int, heads: int, scale: float,
                 generators: list[torch.Generator]):
        super().__init__()
        self.rank, self.heads, self.scale = rank, heads, scale
        runs, out, inp = weight.shape
        As = [torch.stack([orthogonal_rows(rank, inp, g, weight.device) for _ in range(heads)]) for g in generators]
        self.weight = nn.Parameter(weight, requires_grad=False)  # (R, out, in): changed by merges only
        self.bias = nn.Parameter(bias)  # (R, out)
        self.A = nn.Parameter(torch.stack(As))  # (R, N, r, in)
        self.B = nn.Parameter(torch.zeros(runs, heads, out, rank, device=weight.device, dtype=weight.dtype))  # (R, N, out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (R, b, ..., in), or (M, in) shared -> (R, b, ..., out)
        if not self.training or x.dim() == 2:  # the merged function: W + s mean_n B_n A_n
            w = self.weight + self.delta_weight()
            if x.dim() == 2:
                return (x @ w.transpose(1, 2)) + self.bias.unsqueeze(1)
            return _rows(x, lambda x3: torch.baddbmm(self.bias.unsqueeze(1), x3, w.transpose(1, 2)))
        h = _rows(x, lambda x3: torch.baddbmm(self.bias.unsqueeze(1), x3, self.weight.transpose(1, 2)))
        runs, b = x.shape[:2]
        if b % self.heads == 0:  # equal shards: every head of every run in one batched product
            xs = x.reshape(runs * self.heads, -1, x.shape[-1])  # (R N, b/N ..., in): run i's shard n at i N + n
            a = self.A.reshape(runs * self.heads, self.rank, -1).transpose(1, 2)  # (R N, in, r)
            low = torch.bmm(torch.bmm(xs, a), self.B.reshape(runs * self.heads, -1, self.rank).transpose(1, 2))
            return h + self.scale * low.view(h.shape)
        shards = x.tensor_split(self.heads, dim=1)  # head n sees the n-th contiguous shard of the batch's examples
        low = [_rows(s, lambda s3, n=n: (s3 @ self.A[:, n].transpose(1, 2)) @ self.B[:, n].transpose(1, 2))
               for n, s in enumerate(shards)]
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


HEADED = ("lte", "lora")  # the forms with LTE's heads: their runs sweep the head count


def form_layer(form: str, weight: torch.Tensor, bias: torch.Tensor, rank: int | None, heads: int,
               generators: list[torch.Generator]) -> nn.Module:
    """The stacked layer of ``form`` in place of a Linear whose initial weight (R, out, in) and bias (R, out) are
    given (the full form's): full and galore train them, lte and lora put their heads on them (lora: one head
    of rank heads * r), lowrank and lowrank_ae draw their own factors and bias from ``generators`` instead."""
    if form in ("full", "galore"):
        return StackedLinear(weight, bias)
    if form in ("lowrank", "lowrank_ae"):
        _, out, inp = weight.shape
        return StackedFactorised(inp, out, rank, form, generators, weight.device)
    if form == "lte":
        return StackedLTE(weight, bias, rank, heads, 1.0, generators)
    if form == "lora":  # LTE's baseline: one head holding all N heads' rank
        return StackedLTE(weight, bias, rank * heads, 1, 1.0, generators)
    raise ValueError(f"unknown form {form!r}; allowed: {', '.join(FORMS)}")


def build(form: str, hidden: list[int], rank: int | None, generators: list[torch.Generator], device, *,
          n_in: int, n_out: int, lte_heads: int = 4) -> ScratchModel:
    """R = len(generators) runs of the ``form`` MLP n_in-hidden-n_out, layers drawn first to last (each run's
    draws of a layer: the full form's weight and bias, if the form starts from them, then the form's own)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; allowed: {', '.join(FORMS)}")
    dims = [n_in, *hidden, n_out]
    layers = []
    for inp, out in zip(dims[:-1], dims[1:]):
        if form in ("lowrank", "lowrank_ae"):  # no full weight drawn: the factors are the layer's only draws
            w, b = torch.empty(len(generators), out, inp, device=device), None
        else:
            w, b = (torch.stack(t) for t in zip(*(linear_init(out, inp, g, device) for g in generators)))
        layers.append(form_layer(form, w, b, rank, lte_heads, generators))
    return ScratchModel(layers)


class ScratchGPT(StackedModel):
    """R runs of the registry's gpt trained from scratch, every Linear (the head too) in one form (build_gpt)."""

    @property
    def linears(self) -> list[nn.Module]:  # the form's layers, in module order (what train_stack's restore reads)
        return [m for m in self.body.modules() if isinstance(m, (StackedLinear, _RunsLayer))]

    @property
    def runs(self) -> int:
        return self.linears[0].runs

    def lte_layers(self) -> list[StackedLTE]:
        return [m for m in self.body.modules() if isinstance(m, StackedLTE)]

    def matrices(self) -> list[nn.Parameter]:
        """The Linear weights (R, out, in) of the full-size forms: what GaLore projects (not the embeddings)."""
        return [m.weight for m in self.body.modules() if type(m) is StackedLinear]


def build_gpt(form: str, settings: dict, shape: tuple[int, ...], classes: int, rank: int | None, heads: int,
              generators: list[torch.Generator], device) -> ScratchGPT:
    """R = len(generators) runs of the gpt (models.build_model with ``settings``) in ``form``. Run i's draws: the
    whole gpt as build_model draws it from ``generators[i]``, then, Linear by Linear in module order, the form's
    own (form_layer), as the run alone (R = 1) draws them."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; allowed: {', '.join(FORMS)}")
    plains = [models.build_model("gpt", settings, shape, classes, g, device) for g in generators]
    model = ScratchGPT(plains[0], len(generators))
    state = {f"body.{k}": torch.stack([p.state_dict()[k] for p in plains]) for k in plains[0].state_dict()}
    model.load_state_dict(state)
    for name, m in list(model.body.named_modules()):
        if type(m) is StackedLinear:
            layer = form_layer(form, m.weight.detach(), m.bias.detach(), rank, heads, generators)
            owner, _, attr = name.rpartition(".")
            setattr(model.body.get_submodule(owner) if owner else model.body, attr, layer)
    return model
