"""Adaptation methods as small named strategies, in one registry.

A strategy says three things, and the adapter layer never asks which method it is in:

- ``trains``: which roles get gradients ("zero" = the factor that starts at zero, "random" = the
  one drawn at random; lora.py's ``sketch`` maps roles to A and B);
- ``merges``: whether the adapter is merged into the base weight every ``merge_every`` epochs;
- what a merge re-draws: the zero factor is always re-zeroed (so the function is unchanged) and
  the random factor is re-sampled. Methods that never merge never re-sample.

To add a variant, add one entry to METHODS (and its name to config.METHODS).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lora import LoRALinear


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # for plots and tables
    trains: tuple[str, ...]  # roles that get gradients: "zero" and/or "random"
    merges: bool  # merge + reset every merge_every epochs
    reference: str  # where it comes from

    def trainable_factors(self, adapter: LoRALinear) -> list[nn.Parameter]:
        return [adapter.zero_factor if role == "zero" else adapter.random_factor for role in self.trains]

    def prepare(self, adapters: list[LoRALinear]) -> list[nn.Parameter]:
        """Set requires_grad on each adapter's factors as the method says; return the trainable ones."""
        params = []
        for ad in adapters:
            wanted = self.trainable_factors(ad)
            for p in (ad.A, ad.B):
                p.requires_grad_(any(p is w for w in wanted))
            params.extend(wanted)
        return params

    def end_of_epoch(self, adapters: list[LoRALinear], epoch: int, merge_every: int,
                     generator: torch.Generator) -> bool:
        """Called after epoch ``epoch`` (1-based). Merges and resets when due; returns whether it did."""
        if not self.merges or epoch % merge_every != 0:
            return False
        for ad in adapters:
            ad.merge()
            ad.reset(generator, resample_random=True)
        return True


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
    ]
}


def display_order(method: str) -> int:
    """Where a method goes in tables and plots: base, fpft, then registry order, then anything else."""
    order = ["base", "fpft", *METHODS]
    return order.index(method) if method in order else len(order)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}") from None
