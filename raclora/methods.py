"""Adaptation methods as small named strategies, in one registry.

A strategy says three things, and the adapter layer never asks which method it is in:

- ``trains``: which roles get gradients ("zero" = the factor that starts at zero, "random" = the
  one drawn at random; factors.py's ROLES map a ``sketch`` to A and B);
- ``merges``: whether the adapter is merged into the base weight every ``merge_every`` epochs;
- what a merge re-draws: the zero factor is always re-zeroed (so the function is unchanged) and
  the random factor is re-sampled. Methods that never merge never re-sample;
- how the factors start (``init``): one zero and one random (the sketch), or PiSSA's principal singular
  vectors of the base weight, which a merge re-computes from the merged weight;
- and, for the optimizer: per-factor learning rates (``b_lr_ratio``, LoRA+), merges every so many
  optimizer steps instead of epochs with the optimizer state reset and a re-warming learning-rate
  schedule (``step_merges``, ReLoRA).
- AdaLoRA's (``adapter`` "adalora"): its layer starts each run at ``layer_rank`` (above the run's rank), a penalty
  joins the loss (``penalty``: the orthogonality of P and Q), and a rank allocator (raclora/adalora.py, which the
  layer names: ``rank_allocator``) masks triplets after every step down to the run's rank per layer on average;
  each epoch's curve entry gets the ranks kept per layer (``report``).

Every engine (the lab's train.py one run at a time and engine/stack.py many at once, and peft_chain.py on
PEFT's layers) drives the same strategy, through ``optimizer_groups``, ``end_of_epoch``, ``after_step`` and
``lr_lambda``, on any adapter with the ``Adapter`` interface below.
To add a variant, add one entry to METHODS: it is the one list of method names (every config reads it).
Importing this module imports no torch (the types below are only annotations).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn


class Adapter(Protocol):
    """What a method drives: two factors ``A`` (r, in) and ``B`` (out, r) with their roles (factors.FactorRoles),
    ``merge()`` (the delta into the base weight), ``reset()`` (zero factor re-zeroed, random one re-drawn) and, for
    PiSSA, ``principal_init_()`` (A, B from the base weight's top singular vectors).
    lora.LoRALinear, engine/stack.py's stacked layer and peft_chain.PeftFactors are such adapters."""
    A: nn.Parameter
    B: nn.Parameter
    zero_factor: nn.Parameter
    random_factor: nn.Parameter

    def adapter_parameters(self) -> tuple[nn.Parameter, ...]: ...

    def merge(self) -> None: ...

    def reset(self, generator: torch.Generator | None, resample_random: bool = True) -> None: ...


ADALORA_INIT_RATIO = 1.5  # AdaLoRA's initial rank / its target rank (PEFT's defaults init_r 12, target_r 8)


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # for plots and tables
    trains: tuple[str, ...]  # roles that get gradients: "zero" and/or "random"
    merges: bool  # merge + reset every merge_every epochs (or every relora_every steps if step_merges)
    reference: str  # where it comes from
    b_lr_ratio: bool = False  # LoRA+: factor B learns at loraplus_ratio x the learning rate of A
    # the layer it needs: "lora" (A, B: lora.LoRALinear), "dora" (A, B and the magnitude m: lora.DoRALinear),
    # "adalora" (P = B, Lambda = E, Q = A: lora.AdaLoRALinear) or "randlora" (the lab's randlora.py)
    adapter: str = "lora"
    # how A and B start: "sketch" (the zero and the random factor, factors.ROLES) or "pissa" (both from the base
    # weight's top singular vectors, the base replaced by the residual: factors.principal_factors; no sketch)
    init: str = "sketch"
    step_merges: bool = False  # ReLoRA: merge every relora_every steps, reset AdamW, re-warm the learning rate
    settings: tuple[str, ...] = ()  # the config fields only this method reads: they enter its runs' hashes only

    @property
    def uses_sketch(self) -> bool:
        """Whether ``sketch`` (which of A, B is random) means anything for this method."""
        return self.adapter in ("lora", "dora") and self.init == "sketch"

    @property
    def one_rank_stacks(self) -> bool:
        """Whether a stack of this method holds runs of one rank only (RandLoRA's layers differ in shape by rank;
        AdaLoRA's budget is a run's rank across all layers), where other stacks mix ranks by zero-padding."""
        return self.adapter in ("randlora", "adalora")

    def layer_rank(self, rank: int, adalora_init_ratio: float = ADALORA_INIT_RATIO, **_) -> int:
        """The rank a run of rank ``rank`` gives its layers: AdaLoRA's initial rank ceil(ratio x rank), the
        budget then falling to ``rank`` per layer on average (PEFT's init_r beside target_r: its defaults 12 and 8
        are the ratio 1.5); ``rank`` for the rest. Other keywords (a method's settings) are ignored."""
        if self.adapter != "adalora":
            return rank
        return math.ceil(round(adalora_init_ratio * rank, 9))  # (1.1 x 10 is 11.000000000000002 in floats)

    @property
    def low_rank(self) -> bool:
        """Whether the update has the rank the run asks for (RandLoRA's is full rank)."""
        return self.adapter != "randlora"

    def trainable_factors(self, adapter: Adapter) -> list[nn.Parameter]:
        roles = {"zero": lambda: adapter.zero_factor, "random": lambda: adapter.random_factor}
        return [roles[role]() if role in roles else getattr(adapter, role) for role in self.trains]

    def prepare(self, adapters: list[Adapter]) -> list[nn.Parameter]:
        """Set requires_grad on each adapter's factors as the method says; return the trainable ones."""
        params = []
        for ad in adapters:
            wanted = self.trainable_factors(ad)
            for p in ad.adapter_parameters():
                p.requires_grad_(any(p is w for w in wanted))
            params.extend(wanted)
        return params

    def optimizer_groups(self, adapters: list[Adapter], lr: float, loraplus_ratio: float) -> list[dict]:
        """``prepare``, then the trainable factors as AdamW parameter groups (LoRA+: B at lr x ratio)."""
        params = self.prepare(adapters)
        if not self.b_lr_ratio:
            return [{"params": params}]
        b = [ad.B for ad in adapters if ad.B.requires_grad]
        return [{"params": [p for p in params if all(p is not q for q in b)]},
                {"params": b, "lr": lr * loraplus_ratio}]

    @property
    def resets_optimizer(self) -> bool:
        """Whether every merge clears AdamW's moments whatever reset_optimizer_on_merge says."""
        return self.step_merges

    def end_of_epoch(self, adapters: list[Adapter], epoch: int, merge_every: int,
                     generator: torch.Generator) -> bool:
        """Called after epoch ``epoch`` (1-based). Merges and resets when due; returns whether it did."""
        if not self.merges or self.step_merges or epoch % merge_every != 0:
            return False
        return self.merge_and_reset(adapters, generator)

    def after_step(self, adapters: list[Adapter], step: int, every: int, generator: torch.Generator) -> bool:
        """Called after optimizer step ``step`` (1-based, counted over the whole run); ReLoRA merges here."""
        if not self.step_merges or step % every != 0:
            return False
        return self.merge_and_reset(adapters, generator)

    def initialise(self, adapters: list[Adapter]) -> None:
        """Give the factors this method's start (``init``): PiSSA's re-computes them from each base weight; the
        sketch's were drawn when the adapters were made."""
        if self.init == "pissa":
            for ad in adapters:
                ad.principal_init_()

    def merge_and_reset(self, adapters: list[Adapter], generator) -> bool:
        """Every adapter's update into its base weight, then a fresh start (the function is unchanged): the zero
        factor re-zeroed and the random one re-drawn from ``generator`` (PiSSA: the factors re-computed from the
        merged weight); returns True."""
        for ad in adapters:
            ad.merge()
            if self.init == "pissa":
                ad.principal_init_()
            else:
                ad.reset(generator, resample_random=True)
        return True

    def training(self, adapters, generator: torch.Generator | None, *, lr: float, total_steps: int,
                 merge_every: int = 1, loraplus_ratio: float = 16.0, relora_every: int = 200,
                 relora_warmup: int = 20, reset_optimizer_on_merge: bool = False, target_rank: int | None = None,
                 adalora_init_ratio: float = ADALORA_INIT_RATIO, adalora_warmup: float = 0.1, adalora_final: float = 0.3,
                 adalora_interval: int = 10, adalora_beta1: float = 0.85, adalora_beta2: float = 0.85,
                 adalora_orth_weight: float = 0.5) -> tuple[list[dict], dict]:
        """Everything a training loop needs to apply this method: (AdamW parameter groups, keyword
        arguments of train.train / stack.train_stack). ``generator``: the run's generator for the
        plain engine; None for the stacked engine, whose loop passes each call the generators of the
        runs still training. ``target_rank``: the run's rank (AdaLoRA's budget per layer; its layers hold
        ``layer_rank`` of it); the ``adalora_`` settings are AdaLoraConfig's (config.py says what each is)."""
        def bind(hook):
            return (lambda n: hook(n, generator)) if generator is not None else hook

        self.initialise(adapters)
        hooks = dict(on_epoch_end=bind(lambda e, g: self.end_of_epoch(adapters, e, merge_every, g)),
                     reset_optimizer_on_merge=reset_optimizer_on_merge or self.resets_optimizer,
                     lr_lambda=self.lr_lambda(total_steps, relora_every, relora_warmup))
        if self.step_merges:
            hooks["on_step_end"] = bind(lambda s, g: self.after_step(adapters, s, relora_every, g))
        if self.adapter == "adalora":
            hooks.update(self._allocation(adapters, target_rank, total_steps, adalora_warmup, adalora_final,
                                          adalora_interval, adalora_beta1, adalora_beta2, adalora_orth_weight))
        return self.optimizer_groups(adapters, lr, loraplus_ratio), hooks

    @staticmethod
    def _allocation(adapters, target_rank, total_steps, warmup, final, interval, beta1, beta2, orth_weight) -> dict:
        """AdaLoRA's hooks: the rank allocator after every step, the orthogonality penalty in the loss, the ranks
        kept per layer in every curve entry (a text of one count per adapted layer, in module order)."""
        if target_rank is None:
            raise ValueError("AdaLoRA needs the run's target rank")
        allocator = type(adapters[0]).rank_allocator.of_settings(adapters, target_rank, total_steps, warmup, final,
                                                                  interval, beta1, beta2)
        hooks = dict(on_step_end=allocator.after_step,
                     report=lambda: [{"ranks": " ".join(map(str, r))} for r in allocator.ranks()])
        if orth_weight > 0:
            hooks["penalty"] = lambda: orth_weight * allocator.orthogonality()
        return hooks

    def lr_lambda(self, total_steps: int, every: int, warmup: int) -> Callable[[int], float] | None:
        """ReLoRA's jagged schedule, as a LambdaLR multiplier of the step count: a cosine decay to 10 %
        of the learning rate over the run, times a linear warm-up over ``warmup`` steps that restarts
        at every merge. None for the other methods (a constant learning rate)."""
        if not self.step_merges:
            return None

        def factor(step: int) -> float:  # step = optimizer steps taken so far
            warm = min(1.0, (step % every + 1) / warmup)
            cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))
            return warm * (0.1 + 0.9 * cosine)
        return factor


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("lora", "LoRA", trains=("zero", "random"), merges=False,
               reference="Hu et al., 2021"),
        Method("cola", "COLA", trains=("zero", "random"), merges=True,
               reference="Xia et al., 2024 (Chain of LoRA)"),
        Method("asymmetric_lora", "AsymmLoRA", trains=("zero",), merges=False,
               reference="Zhu et al., 2024 (asymmetry in low-rank adapters)"),
        Method("rac_lora", "RAC-LoRA", trains=("zero",), merges=True,
               reference="Malinovsky et al., 2024 (arXiv:2410.08305)"),
        Method("lora_plus", "LoRA+", trains=("zero", "random"), merges=False, b_lr_ratio=True,
               settings=("loraplus_ratio",), reference="Hayou et al., 2024 (LoRA+)"),
        Method("cola_plus", "COLA+", trains=("zero", "random"), merges=True, b_lr_ratio=True,
               settings=("loraplus_ratio",),
               reference="COLA with LoRA+'s learning rates (Xia et al., 2024; Hayou et al., 2024)"),
        Method("relora", "ReLoRA", trains=("zero", "random"), merges=True, step_merges=True,
               settings=("relora_every", "relora_warmup"), reference="Lialin et al., ICLR 2024 (ReLoRA)"),
        Method("randlora", "RandLoRA", trains=("lam", "gam"), merges=False, adapter="randlora",
               reference="Albert et al., ICLR 2025 (RandLoRA)"),
        Method("pissa", "PiSSA", trains=("A", "B"), merges=False, init="pissa",
               reference="Meng et al., NeurIPS 2024 (PiSSA)"),
        Method("cola_pissa", "COLA-PiSSA", trains=("A", "B"), merges=True, init="pissa",
               reference="PiSSA chained COLA-style: merge, then the factors re-computed from the merged weight"),
        Method("dora", "DoRA", trains=("zero", "random", "m"), merges=False, adapter="dora",
               reference="Liu et al., ICML 2024 (DoRA)"),
        Method("cola_dora", "COLA-DoRA", trains=("zero", "random", "m"), merges=True, adapter="dora",
               reference="DoRA chained COLA-style: merge, the zero factor re-zeroed, m re-started as the row norms"),
        Method("rac_dora", "RAC-DoRA", trains=("zero", "m"), merges=True, adapter="dora",
               reference="DoRA chained RAC-style: the random factor frozen and re-drawn at each merge"),
        Method("adalora", "AdaLoRA", trains=("A", "E", "B"), merges=False, adapter="adalora",
               settings=("adalora_init_ratio", "adalora_warmup", "adalora_final", "adalora_interval", "adalora_beta1",
                         "adalora_beta2", "adalora_orth_weight"),
               reference="Zhang et al., ICLR 2023 (AdaLoRA)"),
    ]
}


def methods_reading(field_name: str) -> tuple[str, ...]:
    """The registry's methods that read the config field ``field_name`` (a Method's ``settings``): only their runs
    hash it (each study's ``arg(..., only={"method": methods_reading(...)})``)."""
    return tuple(m.name for m in METHODS.values() if field_name in m.settings)


def display_order(method: str) -> int:
    """Where a method goes in tables and plots: base, fpft, then registry order, then anything else."""
    order = ["base", "fpft", *METHODS]
    return order.index(method) if method in order else len(order)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}") from None
