"""One function builds a run: base model -> adapters -> the method's training hooks, for either engine.

The sweep (sweep.Trainer), the tests and the benchmarks build runs here, so that what a run is stays
written once: ``build_run(...)`` returns the model to train, what the optimizer trains, and the keyword
arguments (merges, optimizer resets, learning-rate schedule) to pass to train.train (one run) or
stack.train_stack (R runs at once).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lora import wrap_linears
from raclora.methods import get_method
from data import TaskSpec
from models import build_model, model_settings, set_generator
from randlora import wrap_randlora
from engine.stack import StackedModel


def config_model(cfg, generator: torch.Generator | None, device, spec: TaskSpec | None = None) -> nn.Module:
    """The model ``cfg.model`` (with the config's settings) for the task ``spec`` (by default the config's tasks A
    and B: ``cfg.task_spec()``); weights drawn from ``generator``, or left for a state dict to fill when it is None."""
    spec = cfg.task_spec() if spec is None else spec
    return build_model(cfg.model, model_settings(cfg), spec.shape, spec.classes, generator, device)


@dataclass
class Run:
    model: nn.Module  # a copy of the base model (one run) or a StackedModel of R copies
    params: list  # what the optimizer trains: parameters, or AdamW parameter groups (LoRA+)
    hooks: dict  # keyword arguments of train.train / stack.train_stack (on_epoch_end, lr_lambda, ...)


def build_run(base: nn.Module, method: str, sketch: str | None, ranks: list[int | None],
              generators: list[torch.Generator], scales: list[float], *, random_init: str = "gaussian",
              stacked: bool = False, targets: list[str] | None = None, **method_kw) -> Run:
    """Build one run (``stacked=False``: one generator, one rank) or a stack of R runs (one generator,
    rank and scale per run) from ``base``, which is left unchanged.

    ``method`` is "fpft" (every parameter trains, no hooks) or a name of the registry in methods.py;
    ``targets`` selects the Linear layers that get adapters (models.targeted; None = every one);
    ``method_kw`` are Method.training's keyword arguments (lr, total_steps, merge_every, ...). Each run's
    random draws (its factors now, its dropout masks and re-sampled factors later) come from its own
    generator, in the order the run alone makes them.
    """
    if stacked:
        model = StackedModel(base, len(generators))
    else:
        if len(generators) != 1:
            raise ValueError(f"one run takes one generator, got {len(generators)}")
        model = copy.deepcopy(base)
        set_generator(model, generators[0])
    if method == "fpft":
        return Run(model, list(model.parameters()), {})
    m = get_method(method)
    if not m.uses_sketch:  # PiSSA's factors come from the base weight (Method.initialise), AdaLoRA's are its own
        sketch = "left"
    if m.one_rank_stacks and len(set(ranks)) != 1:
        raise ValueError(f"a stack of {method} holds one rank, got {sorted(set(ranks))}")
    layer_ranks = [m.layer_rank(r, **method_kw) for r in ranks]  # AdaLoRA's layers start above the run's rank
    if stacked:
        adapters = (model.wrap_randlora(ranks[0], scales, generators, targets) if m.adapter == "randlora"
                    else model.wrap(layer_ranks, scales, sketch, random_init, generators, targets, layer=m.adapter))
    else:
        g = generators[0]
        adapters = (wrap_randlora(model, ranks[0], scales[0], g, targets) if m.adapter == "randlora"
                    else wrap_linears(model, layer_ranks[0], scales[0], sketch, random_init, g, targets,
                                      layer=m.adapter))
    params, hooks = m.training(adapters, None if stacked else generators[0], target_rank=ranks[0], **method_kw)
    return Run(model, params, hooks)
