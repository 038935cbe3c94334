"""PiSSA and DoRA (issue 25): agreement with PEFT's layers, the function kept at the start and by merges, and the
trainable counts against their formulas. (Stacked equals alone, the factors each method trains and merge + reset
keeping the function are tested for every method of the registry in test_stack.py and test_adapters.py.)"""
from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")  # in requirements-dev.txt; CI installs it

from lora import DoRALinear, LoRALinear, wrap_linears  # noqa: E402
from models import count_trainable  # noqa: E402
from raclora.factors import lora_scale, principal_factors, row_norms  # noqa: E402
from raclora.methods import METHODS  # noqa: E402
from test_peft_agreement import One  # noqa: E402

DT = torch.float64


def peft_layer(lin, rank, alpha, **config):
    """PEFT's LoRA layer (scale alpha / r) around a copy of ``lin``, with LoraConfig's ``config``."""
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0, bias="none", **config)
    model = peft.get_peft_model(One(copy.deepcopy(lin)), cfg)
    return model, model.base_model.model.lin


# --- DoRA ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("shape", [(784, 64), (64, 5)])
def test_dora_matches_peft_forward_gradients_and_merge(rank, shape):
    """Same weights and inputs: outputs, the gradients of A, B and m (the norm detached in both), the update and
    the merged weight agree with PEFT's DoRA layer (use_dora=True) to 1e-10 in float64."""
    g = torch.Generator().manual_seed(rank)
    lin = torch.nn.Linear(*shape).to(DT)
    alpha = 2.0
    ours = DoRALinear(copy.deepcopy(lin), rank, lora_scale("alpha/r", alpha, rank), "right")
    model, layer = peft_layer(lin, rank, alpha, use_dora=True)
    model.to(DT)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, ours.m, rtol=0, atol=1e-12)
    A = torch.randn(rank, shape[0], generator=g, dtype=DT) / shape[0] ** 0.5
    B = torch.randn(shape[1], rank, generator=g, dtype=DT) / rank
    m = ours.m.detach() * (1 + 0.1 * torch.randn(shape[1], generator=g, dtype=DT))
    with torch.no_grad():
        ours.A.copy_(A), ours.B.copy_(B), ours.m.copy_(m)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
        layer.lora_magnitude_vector["default"].weight.copy_(m)
    assert layer.scaling["default"] == pytest.approx(ours.scale)
    x = torch.randn(16, shape[0], generator=g, dtype=DT)
    target = torch.randn(16, shape[1], generator=g, dtype=DT)
    y_ours, y_peft = ours(x), model(x)
    torch.testing.assert_close(y_ours, y_peft, rtol=0, atol=1e-10)
    ((y_ours - target) ** 2).sum().backward()
    ((y_peft - target) ** 2).sum().backward()
    for mine, theirs in ((ours.A, layer.lora_A["default"].weight), (ours.B, layer.lora_B["default"].weight),
                         (ours.m, layer.lora_magnitude_vector["default"].weight)):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=1e-10)
    # PEFT's get_delta_weight is the LoRA part, scale * B @ A, which the merge then rescales by m / ||W0 + it||
    torch.testing.assert_close(LoRALinear.delta_weight(ours), layer.get_delta_weight("default"), rtol=0, atol=1e-10)
    merged = model.merge_and_unload().lin.weight
    ours.merge()
    torch.testing.assert_close(ours.base.weight, merged, rtol=0, atol=1e-10)


def test_dora_starts_as_the_base_and_a_merged_chain_link_restarts_its_magnitude():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(20, 7).to(DT)
    x = torch.randn(9, 20, generator=g, dtype=DT)
    ours = DoRALinear(copy.deepcopy(lin), 3, 0.5, "left")
    ours.reset(g)
    assert torch.equal(ours(x), lin(x))  # m is W0's row norms: the layer is W0 exactly
    with torch.no_grad():
        ours.A.normal_(generator=g), ours.m.mul_(1.5)
    before = ours(x)
    METHODS["cola_dora"].merge_and_reset([ours], g)
    torch.testing.assert_close(ours(x), before, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.m, row_norms(ours.base.weight), rtol=0, atol=0)  # the new link starts at 1
    assert not ours.A.any()  # the zero factor re-zeroed


# --- PiSSA ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank,shape", [(1, (784, 64)), (4, (784, 64)), (4, (64, 5)), (8, (64, 5))])
def test_pissa_matches_peft_initialisation(rank, shape):
    """A, B and the residual base weight as PEFT's init_lora_weights="pissa" makes them. PEFT makes them in float32
    only (it refuses a float64 layer), so this compares float32 to float32: they are the same bits (the same SVD and
    products); a rank above min(out, in) keeps
    PEFT's min(out, in) singular vectors, with zero rows (and columns) beyond them."""
    lin = torch.nn.Linear(*shape)
    alpha = 3.0
    ours = LoRALinear(copy.deepcopy(lin), rank, lora_scale("alpha/r", alpha, rank), "left")
    ours.principal_init_()
    _, layer = peft_layer(lin, rank, alpha, init_lora_weights="pissa")
    k = min(rank, *shape)
    tol = dict(rtol=0, atol=0)
    torch.testing.assert_close(ours.A[:k], layer.lora_A["default"].weight[:k], **tol)
    torch.testing.assert_close(ours.B[:, :k], layer.lora_B["default"].weight[:, :k], **tol)
    torch.testing.assert_close(ours.base.weight, layer.base_layer.weight, **tol)
    assert not ours.A[k:].any() and not ours.B[:, k:].any()


@pytest.mark.parametrize("rank", [1, 3])
def test_pissa_factors_are_the_principal_part_and_keep_the_function(rank):
    """In float64: scale * B @ A is W's best rank-r approximation (its top singular triplets), the residual plus it
    is W, and a model wrapped for PiSSA computes what the base computes, to 1e-10; a merge re-computes the factors
    from the merged weight and keeps the function too."""
    g = torch.Generator().manual_seed(rank)
    w = torch.randn(12, 30, generator=g, dtype=DT)
    a, b, residual = principal_factors(w, rank, scale=0.7)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(0.7 * b @ a, (u[:, :rank] * s[:rank]) @ vh[:rank], rtol=0, atol=1e-10)
    torch.testing.assert_close(residual + 0.7 * b @ a, w, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.linalg.svdvals(residual)[:12 - rank], s[rank:], rtol=0, atol=1e-10)

    base = torch.nn.Sequential(torch.nn.Linear(30, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4)).to(DT)
    x = torch.randn(8, 30, generator=g, dtype=DT)
    model = copy.deepcopy(base)
    adapters = wrap_linears(model, rank, 0.7, "left", "gaussian", g)
    METHODS["pissa"].initialise(adapters)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-10)
    with torch.no_grad():
        for ad in adapters:
            ad.A.add_(0.1 * torch.randn(ad.A.shape, generator=g, dtype=DT))
    before = model(x)
    METHODS["cola_pissa"].merge_and_reset(adapters, g)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-10)
    for ad in adapters:  # the new link starts from the merged weight's principal part
        a, b, _ = principal_factors(ad.base.weight + ad.delta_weight(), rank, 0.7)
        torch.testing.assert_close(ad.delta_weight(), b @ a * 0.7, rtol=0, atol=1e-10)


# --- trainable counts ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 2, 8])
@pytest.mark.parametrize("method,sketch,count", [
    # the MLP 784-64-64-5: LoRA's r (in + out) per layer = 1045 r; a left sketch trains A (r in: 912 r), a right
    # one B (r out: 133 r); DoRA adds each layer's out magnitudes, 64 + 64 + 5 = 133
    ("pissa", None, lambda r: 1045 * r), ("cola_pissa", None, lambda r: 1045 * r),
    ("dora", "left", lambda r: 1045 * r + 133), ("cola_dora", "right", lambda r: 1045 * r + 133),
    ("rac_dora", "left", lambda r: 912 * r + 133), ("rac_dora", "right", lambda r: 133 * r + 133)])
def test_trainable_counts_match_their_formulas(base_model, method, sketch, count, rank):
    from engine.build import build_run
    g = torch.Generator().manual_seed(0)
    run = build_run(base_model, method, sketch, [rank], [g], [1.0], lr=1e-3, total_steps=1)
    params = [p for group in run.params for p in group["params"]]
    assert count_trainable(run.model) == sum(p.numel() for p in params) == count(rank)


@pytest.mark.parametrize("method,why", [("pissa", "init_lora_weights='pissa'"), ("cola_pissa", "pissa")])
def test_the_peft_controller_refuses_pissa_in_one_line(method, why):
    from raclora.peft_chain import ChainConfig, ChainError
    with pytest.raises(ChainError, match=f"method '{method}' does not act on LoRA's two factors") as e:
        ChainConfig(method=method)
    assert why in str(e.value) and "\n" not in str(e.value) and "allowed: lora, cola" in str(e.value)
