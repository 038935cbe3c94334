"""The adapter and the method strategies: function preserved, right factors trained, right counts."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from raclora.factors import SCALINGS
from lora import LoRALinear, adapters_of, wrap_linears
from raclora.factors import lora_scale
from raclora.methods import METHODS
from models import count_trainable, set_generator

# the methods on LoRALinear, DoRALinear and AdaLoRALinear, with each sketch where the method has one
ALL = [(m, s) for m in METHODS if METHODS[m].adapter in ("lora", "dora", "adalora")
       for s in (("left", "right") if METHODS[m].uses_sketch else (None,))]
SKETCHED = [(m, s) for m, s in ALL if s is not None]


def adapt(model, method, sketch, rank=2, scale=1.0, random_init="gaussian", seed=0):
    g = torch.Generator().manual_seed(seed)
    m = METHODS[method]
    adapters = wrap_linears(model, rank, scale, sketch or "left", random_init, g, layer=m.adapter)
    m.initialise(adapters)
    params = m.prepare(adapters)
    return adapters, params, g


def perturb_trained(params, seed=5):
    """Stand-in for training: give every trainable factor non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method,sketch", SKETCHED)  # exactly: the zero factor adds 0 (PiSSA: tests/test_pissa_dora.py)
@pytest.mark.parametrize("random_init", ["gaussian", "kaiming"])
def test_output_equals_base_at_init(base_model, inputs, method, sketch, random_init):
    expected = base_model(inputs)
    model = copy.deepcopy(base_model)
    adapt(model, method, sketch, random_init=random_init)
    assert len(adapters_of(model)) == 3
    torch.testing.assert_close(model(inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method,sketch", ALL)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_merge_then_reset_keeps_outputs(base_model, inputs, method, sketch, scaling):
    # float64, so that the tolerance can be tight: the identity is exact up to rounding
    model, inputs = copy.deepcopy(base_model).double(), inputs.double()
    adapters, params, g = adapt(model, method, sketch, rank=4, scale=lora_scale(scaling, 2.0, 4))
    perturb_trained(params)
    before = model(inputs)
    assert not torch.allclose(before, base_model.double()(inputs), atol=1e-3)  # the adapters do something
    METHODS[method].merge_and_reset(adapters, g)
    torch.testing.assert_close(model(inputs), before, rtol=1e-10, atol=1e-10)
    for ad in adapters:
        assert sketch is None or torch.count_nonzero(ad.zero_factor) == 0


@pytest.mark.parametrize("method,sketch", ALL)
def test_one_step_changes_only_declared_factors(base_model, inputs, method, sketch):
    model = copy.deepcopy(base_model).train()
    adapters, params, g = adapt(model, method, sketch)
    set_generator(model, g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    loss = F.cross_entropy(model(inputs), torch.arange(32) % 5)
    loss.backward()
    opt.step()
    after = model.state_dict()
    # written out independently of the registry: which factor each method/sketch must train
    both = {"lora", "cola", "lora_plus", "cola_plus", "relora", "pissa", "cola_pissa", "dora", "cola_dora"}
    factors = (["A", "E", "B"] if method == "adalora"  # Q, Lambda and P
               else ["A", "B"] if method in both else [{"left": "A", "right": "B"}[sketch]])
    factors += ["m"] if method in {"dora", "cola_dora", "rac_dora"} else []  # DoRA's magnitudes
    expected = {f"net.{i}.{f}" for i in (0, 3, 6) for f in factors}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == expected


@pytest.mark.parametrize("method,sketch", SKETCHED)  # (a PiSSA merge also re-computes the residual: test_pissa_dora)
def test_base_weights_change_only_by_merges(base_model, method, sketch):
    model = copy.deepcopy(base_model)
    adapters, params, g = adapt(model, method, sketch)
    perturb_trained(params)
    w0 = [ad.base.weight.clone() for ad in adapters]
    deltas = [ad.delta_weight().detach().clone() for ad in adapters]
    m = METHODS[method]  # ReLoRA merges after optimizer steps, the others at epoch ends
    merged = m.after_step(adapters, 1, 1, g) if m.step_merges else m.end_of_epoch(adapters, 1, 1, g)
    assert merged == m.merges
    for ad, w, d in zip(adapters, w0, deltas):
        torch.testing.assert_close(ad.base.weight, w + d if merged else w)
        torch.testing.assert_close(ad.base.bias, ad.base.bias)  # biases are never touched
        assert not ad.base.weight.requires_grad and not ad.base.bias.requires_grad


@pytest.mark.parametrize("sketch", ["left", "right"])
@pytest.mark.parametrize("method,resamples", [("rac_lora", True), ("cola", True),
                                              ("asymmetric_lora", False), ("lora", False)])
def test_random_factor_resampling(base_model, method, resamples, sketch):
    model = copy.deepcopy(base_model)
    adapters, params, g = adapt(model, method, sketch)
    seen = [[ad.random_factor.detach().clone()] for ad in adapters]
    for epoch in range(1, 4):
        METHODS[method].end_of_epoch(adapters, epoch, merge_every=1, generator=g)
        for s, ad in zip(seen, adapters):
            s.append(ad.random_factor.detach().clone())
    for s in seen:
        same = [torch.equal(a, b) for a, b in zip(s[:-1], s[1:])]
        assert same == [not resamples] * 3


def test_merge_every_spaces_merges(base_model):
    model = copy.deepcopy(base_model)
    adapters, _, g = adapt(model, "rac_lora", "left")
    merged = [METHODS["rac_lora"].end_of_epoch(adapters, e, merge_every=3, generator=g) for e in range(1, 10)]
    assert merged == [False, False, True] * 3


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
@pytest.mark.parametrize("method,sketch,per_rank", [
    ("lora", "left", 1045), ("lora", "right", 1045), ("cola", "left", 1045), ("cola", "right", 1045),
    ("asymmetric_lora", "left", 912), ("rac_lora", "left", 912),
    ("asymmetric_lora", "right", 133), ("rac_lora", "right", 133)])
def test_trainable_parameter_counts(base_model, method, sketch, per_rank, rank):
    assert count_trainable(base_model) == 54_725  # FPFT trains everything
    model = copy.deepcopy(base_model)
    _, params, _ = adapt(model, method, sketch, rank=rank)
    assert count_trainable(model) == sum(p.numel() for p in params) == per_rank * rank


def test_delta_weight_and_forward_formula():
    lin = torch.nn.Linear(6, 4)
    ad = LoRALinear(lin, rank=3, scale=0.7, sketch="left")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ad.A.copy_(torch.randn(3, 6, generator=g))
        ad.B.copy_(torch.randn(4, 3, generator=g))
    x = torch.randn(5, 6, generator=g)
    torch.testing.assert_close(ad.delta_weight(), 0.7 * ad.B @ ad.A)
    torch.testing.assert_close(ad(x), x @ (lin.weight + 0.7 * ad.B @ ad.A).T + lin.bias)


def test_sketch_roles():
    lin = torch.nn.Linear(6, 4)
    g = torch.Generator().manual_seed(0)
    left = LoRALinear(lin, 2, 1.0, "left")
    left.reset(g)
    assert torch.count_nonzero(left.A) == 0 and torch.count_nonzero(left.B) == 8  # B random: left sketch
    right = LoRALinear(torch.nn.Linear(6, 4), 2, 1.0, "right")
    right.reset(g)
    assert torch.count_nonzero(right.B) == 0 and torch.count_nonzero(right.A) == 12


def test_kaiming_init_bounds():
    from raclora.factors import init_factor_

    t = init_factor_(torch.empty(64, 784), "kaiming", torch.Generator().manual_seed(0))
    bound = 1 / 784 ** 0.5
    assert t.abs().max() <= bound and t.abs().max() > 0.95 * bound  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    g1 = init_factor_(torch.empty(500, 500), "gaussian", torch.Generator().manual_seed(0))
    assert abs(g1.std().item() - 1.0) < 0.01 and abs(g1.mean().item()) < 0.01


def test_scaling_rules():
    assert lora_scale("alpha", 2.0, 4) == 2.0
    assert lora_scale("alpha/r", 2.0, 4) == 0.5
    assert lora_scale("alpha/sqrt(r)", 2.0, 4) == 1.0


def test_same_seed_same_factors(base_model):
    a, b = copy.deepcopy(base_model), copy.deepcopy(base_model)
    ads_a, _, _ = adapt(a, "rac_lora", "left", seed=7)
    ads_b, _, _ = adapt(b, "rac_lora", "left", seed=7)
    ads_c, _, _ = adapt(copy.deepcopy(base_model), "rac_lora", "left", seed=8)
    assert all(torch.equal(x.B, y.B) for x, y in zip(ads_a, ads_b))
    assert not torch.equal(ads_a[0].B, ads_c[0].B)
