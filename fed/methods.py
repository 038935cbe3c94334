"""The federated methods of issue 13, as small named strategies in one registry: what a client trains, what
goes up, what the server does, what comes down. Per adapted layer (W: out x in, A: r x in, B: out x r,
update scale s), with client weights w_i (their shares of the round's images):

| method | client trains | up | server | down |
|---|---|---|---|---|
| fedavg | every weight | full weights | sum_i w_i W_i | full weights |
| fedit | A and B, kept across rounds | A, B | A = sum w_i A_i, B = sum w_i B_i (inexact) | A, B |
| ffa_lora | the zero factor; the random one fixed for the run (shared seed) | trained factor | mean (exact) | mean |
| flora | A and B from a fresh start each round | A, B | stacks the factors, merges the exact sum into W | stacked factors |
| fed_rac_lora | the zero factor, from zero each round; the random one redrawn each round from its seed | trained factor | mean (exact), merged into W | mean + seed |

A client's update is the change it made to the layer's effective weight (W, or W + s B A). The server's rule
is exact when the update it applies is the weighted mean of the clients' updates: averaging both factors
(FedIT) is not, sum w_i B_i . sum w_i A_i != sum w_i B_i A_i, while a factor every client shares (FFA-LoRA,
Fed-RAC-LoRA) makes the mean of the other one exact: R . sum w_i Z_i = sum w_i R Z_i.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raclora.factors import ROLES


@dataclass(frozen=True)
class FedMethod:
    name: str
    label: str  # for plots and tables
    trains: str  # what a client trains: "all" (every weight), "both" (A and B) or "zero" (the zero factor)
    start: str  # a round's adapter: "none", "kept" (the server's last A, B), "fixed" (random factor fixed for the
    #             run, trained factor the server's last mean), "fresh" (a new init per client), "redrawn" (random
    #             factor from the round's seed, trained factor zero)
    server: str  # "mean_weights", "mean_factors" or "stack"
    merges: bool  # the server adds the round's update into W and the adapter starts over
    reference: str

    @property
    def uses_sketch(self) -> bool:
        """Whether ``sketch`` means anything: which factor is random (trained or not) and which starts at zero."""
        return self.trains != "all"


FED_METHODS: dict[str, FedMethod] = {m.name: m for m in [
    FedMethod("fedavg", "FedAvg (full fine-tuning)", "all", "none", "mean_weights", False,
              "McMahan et al., AISTATS 2017"),
    FedMethod("fedit", "FedIT", "both", "kept", "mean_factors", False, "Zhang et al., ICASSP 2024"),
    FedMethod("ffa_lora", "FFA-LoRA", "zero", "fixed", "mean_factors", False, "Sun et al., ICLR 2024"),
    FedMethod("flora", "FLoRA", "both", "fresh", "stack", True, "Wang et al., NeurIPS 2024"),
    FedMethod("fed_rac_lora", "Fed-RAC-LoRA", "zero", "redrawn", "mean_factors", True,
              "Malinovsky et al., 2024 (arXiv:2410.08305), Algorithm 2"),
]}


def get_fed_method(name: str) -> FedMethod:
    try:
        return FED_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown federated method {name!r}; allowed: {', '.join(FED_METHODS)}") from None


def _normalised(weights: list[float]) -> list[float]:
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"client weights must sum to a positive number, got {weights}")
    return [float(w) / total for w in weights]


def aggregate_layer(method: FedMethod, scale: float, start: dict[str, torch.Tensor], clients: list[dict],
                    weights: list[float]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One layer's server step. ``start``: the state the clients started from ({"W"} for fedavg, {"A", "B"}
    otherwise; for "fresh" starts, each client's own start is in its dict as "A0", "B0"); ``clients``: each
    client's state after local training; ``weights``: each client's images this round.

    Returns (the server's new state, the weighted mean of the clients' updates, the update the server
    applies), updates being (out, in) changes of the layer's effective weight.
    """
    w = _normalised(weights)
    if method.server == "mean_weights":
        new_w = sum(wi * c["W"] for wi, c in zip(w, clients))
        mean_update = sum(wi * (c["W"] - start["W"]) for wi, c in zip(w, clients))
        return {"W": new_w}, mean_update, new_w - start["W"]

    def product(c, a="A", b="B"):
        return scale * (c[b] @ c[a])

    before = [product(c, "A0", "B0") if method.start == "fresh" else product(start) for c in clients]
    mean_update = sum(wi * (product(c) - b0) for wi, c, b0 in zip(w, clients, before))
    if method.server == "stack":  # [w_1 B_1 ... w_K B_K] @ [A_1; ...; A_K] = sum_i w_i B_i A_i, exactly
        b_stack = torch.cat([wi * c["B"] for wi, c in zip(w, clients)], dim=1)
        a_stack = torch.cat([c["A"] for c in clients], dim=0)
        applied = scale * (b_stack @ a_stack) - sum(wi * b0 for wi, b0 in zip(w, before))
        return {"A": a_stack, "B": b_stack}, mean_update, applied
    new = {"A": sum(wi * c["A"] for wi, c in zip(w, clients)), "B": sum(wi * c["B"] for wi, c in zip(w, clients))}
    return new, mean_update, product(new) - product(start)


def aggregation_error(mean_updates: list[torch.Tensor], applied: list[torch.Tensor]) -> float:
    """||mean of the clients' updates - the update the server applied|| / ||mean of the clients' updates||,
    over every layer at once (Frobenius norms); 0.0 when the clients did not move."""
    num = sum(float((m - a).double().pow(2).sum()) for m, a in zip(mean_updates, applied)) ** 0.5
    den = sum(float(m.double().pow(2).sum()) for m in mean_updates) ** 0.5
    return num / den if den > 0 else 0.0


def communication(method: FedMethod, layers: list[tuple[int, int]], rank: int | None, sketch: str | None,
                  participants: int, model_numbers: int) -> tuple[int, int]:
    """(numbers sent up, numbers sent down) per participating client and round. ``layers``: the adapted
    layers' (out, in); ``model_numbers``: every parameter of the model (what fedavg sends); ``participants``:
    the clients of the round (FLoRA sends every client the stack of all their factors)."""
    if method.trains == "all":
        return model_numbers, model_numbers
    both = sum(rank * (inp + out) for out, inp in layers)
    if method.trains == "both":
        return both, both * (participants if method.server == "stack" else 1)
    zero = ROLES[sketch][0]  # the trained factor: A (r x in) for the left sketch, B (out x r) for the right
    trained = sum(rank * (inp if zero == "A" else out) for out, inp in layers)
    return trained, trained + (1 if method.start == "redrawn" else 0)  # Fed-RAC-LoRA also sends the round's seed
