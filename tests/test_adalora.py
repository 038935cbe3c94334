"""AdaLoRA (raclora/adalora.py, lora.AdaLoRALinear and its stacked form) against PEFT's AdaLoraModel: the same base
weights, factors and batches give the same outputs, penalties, importance-driven rank patterns, factors, deltas and
merged weights after every step, in float64; and the schedule, counts and refusals of the lab's own."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.build import build_run
from lora import AdaLoRALinear, adapters_of
from models import count_trainable
from raclora.adalora import RankAllocator, Schedule
from raclora.methods import METHODS
from train import MethodHooks

DT = torch.float64
ALPHA, INIT_R, TARGET_R = 2.0, 3, 2


class Output:
    """What PEFT's AdaLoraModel.forward needs of a model's output to add its orthogonality penalty: a ``loss``."""

    def __init__(self, logits, loss):
        self.logits, self.loss = logits, loss


class Net(nn.Module):
    """Three Linear layers (the names PEFT's target_modules picks), a loss when given labels."""

    def __init__(self, g: torch.Generator):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 10), nn.Linear(10, 8), nn.Linear(8, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)

    def forward(self, x, labels=None):
        logits = self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        return Output(logits, None if labels is None else F.cross_entropy(logits, labels))


def peft_adalora(base: Net, schedule: Schedule, orth: float):
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, lora_alpha=ALPHA, lora_dropout=0.0,
                        target_modules=["fc1", "fc2", "fc3"], tinit=schedule.tinit, tfinal=schedule.tfinal,
                        deltaT=schedule.interval, beta1=schedule.beta1, beta2=schedule.beta2, orth_reg_weight=orth,
                        total_step=schedule.total)
    # built on a float32 copy, then moved: on a float64 base PEFT 0.21.2 re-registers ranknum as it moves the
    # adapter to the base layer's dtype, and the new Parameter trains (AdamW would then change the scaling)
    torch.manual_seed(0)  # PEFT draws A and B from torch's global generator
    model = get_peft_model(copy.deepcopy(base).float(), cfg).to(base.fc1.weight.dtype)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "ranknum" in n)
    return model


def peft_layers(model) -> list:
    return [m for n, m in model.named_modules() if n.endswith(("fc1", "fc2", "fc3")) and hasattr(m, "lora_E")]


def lab_adalora(base: Net, peft_model, schedule: Schedule, orth: float):
    """The lab's AdaLoRA on a copy of ``base``: its layers take PEFT's initial factors (A, B drawn by PEFT, E = 0)."""
    model = copy.deepcopy(base)
    scale = ALPHA / (INIT_R + 1e-5)  # PEFT's scaling / (ranknum + 1e-5)
    frac = dict(adalora_warmup=schedule.tinit / schedule.total + 1e-12,
                adalora_final=schedule.tfinal / schedule.total + 1e-12)
    run = build_run(model, "adalora", None, [TARGET_R], [torch.Generator().manual_seed(0)], [scale],
                    lr=1e-2, total_steps=schedule.total, adalora_interval=schedule.interval,
                    adalora_orth_weight=orth, adalora_beta1=schedule.beta1, adalora_beta2=schedule.beta2,
                    adalora_init_ratio=INIT_R / TARGET_R, **frac)
    with torch.no_grad():
        for ours, theirs in zip(adapters_of(run.model), peft_layers(peft_model)):
            ours.A.copy_(theirs.lora_A["default"])
            ours.B.copy_(theirs.lora_B["default"])
            ours.E.copy_(theirs.lora_E["default"].view(-1))
    return run


SCHEDULE = Schedule(total=40, tinit=4, tfinal=12, interval=3)


@pytest.mark.parametrize("orth", [0.5, 0.0])
def test_adalora_matches_peft_step_by_step(orth):
    g = torch.Generator().manual_seed(3)  # a seed whose budget ends spread unevenly over the layers (both weights)
    base = Net(g).to(DT)
    x, y = torch.randn(64, 12, generator=g, dtype=DT), torch.randint(0, 4, (64,), generator=g)
    theirs = peft_adalora(base, SCHEDULE, orth)
    run = lab_adalora(base, theirs, SCHEDULE, orth)
    assert run.hooks["on_step_end"].__self__.schedule == SCHEDULE  # the fractions gave PEFT's step counts
    ours = run.model
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=0, atol=1e-12)  # E = 0: both the base
    opt_t = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    opt_o = torch.optim.AdamW(run.params, lr=1e-2, weight_decay=0.01)
    hooks = MethodHooks(opt_o, **{k: v for k, v in run.hooks.items() if k != "on_epoch_end"})
    masked_at = []
    for step in range(SCHEDULE.total + 5):  # past total_step: the final pattern is applied on
        idx = torch.randperm(64, generator=g)[:16]
        out = theirs.base_model(x[idx], labels=y[idx])  # AdaLoraModel.forward: the loss and its penalty
        loss = F.cross_entropy(ours(x[idx]).logits, y[idx])
        torch.testing.assert_close(hooks.objective(loss), out.loss, rtol=0, atol=1e-10)  # task loss + penalty
        opt_t.zero_grad()
        opt_o.zero_grad()
        out.loss.backward()
        hooks.objective(loss).backward()
        opt_t.step()
        opt_o.step()
        theirs.base_model.update_and_allocate(step)
        hooks.after_step()
        pattern = theirs.peft_config["default"].rank_pattern
        for name, a, b in zip(("fc1", "fc2", "fc3"), adapters_of(ours), peft_layers(theirs)):
            torch.testing.assert_close(a.A, b.lora_A["default"], rtol=0, atol=1e-10)
            torch.testing.assert_close(a.E, b.lora_E["default"].view(-1), rtol=0, atol=1e-10)
            torch.testing.assert_close(a.B, b.lora_B["default"], rtol=0, atol=1e-10)
            if pattern is not None:
                key = next(k for k in pattern if k.startswith(f"{name}.") or f".{name}." in k)
                assert a.kept.tolist() == pattern[key], (step, name)
        if pattern is not None and pattern != (masked_at[-1][1] if masked_at else None):
            masked_at.append((step, copy.deepcopy(pattern)))
    kept = [sum(v) for v in theirs.peft_config["default"].rank_pattern.values()]
    assert sum(kept) == TARGET_R * 3 and len(set(kept)) > 1  # the budget reached, unevenly spread over the layers
    assert len(masked_at) >= 2  # the pattern changed as the budget fell
    assert [r for r in hooks.columns()[0]["ranks"].split()] == [str(k) for k in kept]
    for a, b in zip(adapters_of(ours), peft_layers(theirs)):
        torch.testing.assert_close(a.delta_weight(), b.get_delta_weight("default"), rtol=0, atol=1e-10)
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=0, atol=1e-10)
    merged = theirs.merge_and_unload()
    for a in adapters_of(ours):
        a.merge()
    for name, a in zip(("fc1", "fc2", "fc3"), adapters_of(ours)):
        torch.testing.assert_close(a.base.weight, getattr(merged, name).weight, rtol=0, atol=1e-10)


def test_the_budget_schedule_is_peft_s():
    from peft.tuners.adalora.layer import RankAllocator as PeftAllocator

    base = Net(torch.Generator().manual_seed(0))
    for schedule in (SCHEDULE, Schedule(total=100, tinit=0, tfinal=0, interval=1), Schedule(50, 10, 30, 7)):
        theirs = peft_adalora(base, schedule, 0.5)
        alloc = PeftAllocator(theirs.base_model.model, theirs.peft_config["default"], "default")
        got = [schedule.budget(t, INIT_R * 3, TARGET_R * 3) for t in range(schedule.total + 3)]
        assert got == [alloc.budget_schedule(t) for t in range(schedule.total + 3)]
    with pytest.raises(ValueError, match="no steps to prune in"):
        Schedule(total=10, tinit=5, tfinal=5, interval=1)


def test_a_target_rank_at_or_above_the_initial_one_is_refused():
    layers = [AdaLoRALinear(nn.Linear(4, 3), 2, 1.0)]
    with pytest.raises(ValueError, match="target rank below the initial one"):
        RankAllocator(layers, 2, SCHEDULE)


def test_layer_and_counts(base_model):
    """AdaLoRA's layers start at ceil(1.5 x rank), as the base (E = 0); A, E and B all train: the count of its
    formula, (in + out + 1) x initial rank per layer."""
    m = METHODS["adalora"]
    assert [m.layer_rank(r) for r in (1, 2, 4, 8)] == [2, 3, 6, 12]
    assert m.layer_rank(10, 1.1) == 11 and METHODS["lora"].layer_rank(4) == 4
    x = torch.randn(7, 784, generator=torch.Generator().manual_seed(0))
    for rank in (1, 2, 4, 8):
        run = build_run(base_model, "adalora", None, [rank], [torch.Generator().manual_seed(0)], [1.0],
                        lr=1e-3, total_steps=100)
        r0 = m.layer_rank(rank)
        assert [ad.A.shape[0] for ad in adapters_of(run.model)] == [r0] * 3
        assert count_trainable(run.model) == r0 * ((784 + 64 + 1) + (64 + 64 + 1) + (64 + 5 + 1))
        torch.testing.assert_close(run.model(x), base_model(x), rtol=0, atol=0)


def test_the_peft_controller_refuses_adalora_in_one_line():
    from raclora.peft_chain import ChainConfig, ChainError
    with pytest.raises(ChainError, match="method 'adalora' does not act on LoRA's two factors") as e:
        ChainConfig(method="adalora")
    assert "AdaLoraConfig" in str(e.value) and "\n" not in str(e.value)
