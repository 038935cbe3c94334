"""Agreement with an independent implementation: Hugging Face PEFT's LoRA on the same nn.Linear."""
from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")  # in requirements-dev.txt; CI installs it

from lora import LoRALinear  # noqa: E402
from raclora.factors import lora_scale


class One(torch.nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def peft_lora(lin, rank, alpha, scaling):
    """PEFT's LoraLayer around a copy of ``lin`` with the scale our ``scaling`` rule gives.

    PEFT scales by lora_alpha / r (or lora_alpha / sqrt(r) with use_rslora); our "alpha" rule
    (scale = alpha, the published RAC-LoRA code) is PEFT with lora_alpha = alpha * r.
    """
    peft_alpha = {"alpha": alpha * rank, "alpha/r": alpha, "alpha/sqrt(r)": alpha}[scaling]
    cfg = peft.LoraConfig(r=rank, lora_alpha=peft_alpha, target_modules=["lin"], lora_dropout=0.0,
                          use_rslora=scaling == "alpha/sqrt(r)", bias="none")
    return peft.get_peft_model(One(copy.deepcopy(lin)), cfg)


@pytest.mark.parametrize("scaling", ["alpha", "alpha/r", "alpha/sqrt(r)"])
@pytest.mark.parametrize("rank", [1, 3, 8])
@pytest.mark.parametrize("shape", [(784, 64), (64, 5)])
def test_forward_and_merged_weight_match_peft(scaling, rank, shape):
    g = torch.Generator().manual_seed(rank)
    lin = torch.nn.Linear(*shape).double()
    alpha = 1.5
    ours = LoRALinear(copy.deepcopy(lin), rank, lora_scale(scaling, alpha, rank), "left")
    theirs = peft_lora(lin, rank, alpha, scaling).double()
    layer = theirs.base_model.model.lin
    A = torch.randn(rank, shape[0], generator=g, dtype=torch.float64)
    B = torch.randn(shape[1], rank, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ours.A.copy_(A), ours.B.copy_(B)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    assert layer.scaling["default"] == pytest.approx(ours.scale)
    x = torch.randn(16, shape[0], generator=g, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.delta_weight(), layer.get_delta_weight("default"), rtol=1e-12, atol=1e-12)
    merged = theirs.merge_and_unload().lin.weight
    ours.merge()
    torch.testing.assert_close(ours.base.weight, merged, rtol=1e-12, atol=1e-12)
