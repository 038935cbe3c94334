"""LoRA+ and ReLoRA: the property that defines each, and LoRA+'s parameter groups against PEFT's."""
from __future__ import annotations

import copy

import pytest
import torch

from config import Config
from engine.settings import settings_hash
from data import Split, Task
from lora import wrap_linears
from raclora.methods import METHODS
from conftest import mlp
from models import set_generator
from train import train


def small_task(n=256):
    g = torch.Generator().manual_seed(0)
    return Task(*(Split(torch.randn(m, 784, generator=g), torch.randint(0, 5, (m,), generator=g))
                  for m in (n, 64, 64)))


def adapted(method, rank=2, sketch="right", seed=0):
    g = torch.Generator().manual_seed(seed)
    model = mlp([64, 64], 0.1, g, "cpu")
    set_generator(model, g)
    return model, wrap_linears(model, rank, 1.0, sketch, "kaiming", g), g


@pytest.mark.parametrize("method", ["lora_plus", "cola_plus"])
def test_loraplus_groups_match_peft(method):
    """Every trainable factor gets the learning rate PEFT's create_loraplus_optimizer gives it:
    A at lr, B at lr x ratio."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    lr, ratio = 2e-4, 16.0
    model, adapters, _ = adapted(method)
    groups, _ = METHODS[method].training(adapters, None, lr=lr, total_steps=10, loraplus_ratio=ratio)
    ours = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    mine = {(name, tuple(p.shape)): g["lr"] for g in ours.param_groups for p in g["params"]
            for name, q in model.named_parameters() if q is p}

    plain = mlp([64, 64], 0.1, torch.Generator().manual_seed(0), "cpu")
    cfg = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["net.0", "net.3", "net.6"], bias="none")
    pm = peft.get_peft_model(copy.deepcopy(plain), cfg)
    theirs_opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                           loraplus_weight_decay=0.01)
    theirs = {}
    for g in theirs_opt.param_groups:
        for p in g["params"]:
            name = next(n for n, q in pm.named_parameters() if q is p)
            layer = name.split(".")[3]  # base_model.model.net.<i>.lora_A.default.weight
            factor = "A" if "lora_A" in name else "B"
            theirs[(f"net.{layer}.{factor}", tuple(p.shape))] = g["lr"]
    assert mine == theirs
    assert sorted(set(mine.values())) == [lr, lr * ratio]


def test_relora_resets_adamw_and_rewarms_the_learning_rate():
    """ReLoRA merges every `every` steps; after each merge AdamW starts afresh (its step count
    restarts) and the learning rate climbs again from lr / warmup."""
    every, warmup, lr = 4, 3, 1e-3
    task = small_task(256)  # 2 steps an epoch at batch 128
    model, adapters, g = adapted("relora")
    groups, hooks = METHODS["relora"].training(adapters, g, lr=lr, total_steps=12, relora_every=every,
                                                relora_warmup=warmup)
    seen = []
    captured = {}

    class Spy(torch.optim.AdamW):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            captured["opt"] = self

    merge = hooks["on_step_end"]

    def on_step_end(step):
        opt = captured["opt"]
        adam_steps = {int(s["step"]) for s in opt.state.values()}
        seen.append((step, adam_steps, opt.param_groups[0]["lr"]))
        return merge(step)

    hooks["on_step_end"] = on_step_end
    original = torch.optim.AdamW
    torch.optim.AdamW = Spy
    try:
        rec = train(model, groups, task, weight_decay=0.0, batch_size=128, max_epochs=6, patience=100,
                    generator=g, lr=lr, **hooks)
    finally:
        torch.optim.AdamW = original
    assert rec.merges == 12 // every
    assert [s for s, _, _ in seen] == list(range(1, 13))
    for step, adam_steps, _ in seen:  # AdamW's own count = steps since the last merge
        assert adam_steps == {(step - 1) % every + 1}
    lrs = [r for _, _, r in seen]  # the rate used by step s
    f = METHODS["relora"].lr_lambda(12, every, warmup)
    assert lrs == pytest.approx([lr * f(s - 1) for s in range(1, 13)])
    assert lrs[0] == pytest.approx(lr / warmup * 1.0) and lrs[every] == pytest.approx(lr / warmup * f(every) * warmup)
    assert lrs[every] < lrs[every - 1]  # jagged: the rate drops back at each merge ...
    assert lrs[every + warmup - 1] > lrs[every]  # ... and climbs again


def test_relora_merges_keep_the_function_and_only_it_merges_by_steps():
    g = torch.Generator().manual_seed(0)
    model = mlp([64, 64], 0.1, g, "cpu").double()
    adapters = wrap_linears(model, 2, 1.0, "left", "kaiming", g)
    x = torch.randn(8, 784, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        for ad in adapters:
            ad.A.normal_(generator=g)
    model.eval()
    before = model(x)
    assert METHODS["relora"].after_step(adapters, 5, 5, g)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-10)
    assert not METHODS["relora"].after_step(adapters, 6, 5, g)
    assert not METHODS["relora"].end_of_epoch(adapters, 1, 1, g)  # epochs never merge ReLoRA
    assert not METHODS["cola"].after_step(adapters, 5, 5, g)  # steps never merge the others


def test_method_fields_enter_only_their_methods_hash():
    base, changed = Config(), Config(loraplus_ratio=4.0, relora_every=50)
    for m in ("lora", "cola", "asymmetric_lora", "rac_lora"):
        assert settings_hash(changed, "cpu", kind="adapter", method=m) == settings_hash(base, "cpu", kind="adapter", method=m)
    for m in ("lora_plus", "cola_plus", "relora"):
        assert settings_hash(changed, "cpu", kind="adapter", method=m) != settings_hash(base, "cpu", kind="adapter", method=m)


# --- RandLoRA ---------------------------------------------------------------------------------------
def randlora_model(rank, seed=0, dtype=torch.float64):
    from randlora import wrap_randlora

    g = torch.Generator().manual_seed(seed)
    model = mlp([64, 64], 0.0, g, "cpu").to(dtype).eval()
    return model, wrap_randlora(model, rank, 0.7, torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_randlora_counts_start_and_full_rank(rank):
    from randlora import trainable_count

    model, adapters = randlora_model(rank)
    params = METHODS["randlora"].prepare(adapters)
    dims = [(64, 784), (64, 64), (5, 64)]
    # N = ceil(d_min / r) bases; lambda: N x r, gamma: N x d_min, per layer
    want = sum(-(-min(o, i) // rank) * (rank + min(o, i)) for o, i in dims)
    assert sum(p.numel() for p in params) == want == sum(trainable_count(o, i, rank) for o, i in dims)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"net.{k}.{f}" for k in (0, 3, 6) for f in ("lam", "gam")}
    assert all(ad.delta_weight().abs().max() == 0 for ad in adapters)  # lambda = 0: the base model at start
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for ad in adapters:
            ad.lam.normal_(generator=g)
            ad.gam.normal_(generator=g)
    for ad in adapters:  # the update reaches full rank min(out, in), whatever r is
        assert torch.linalg.matrix_rank(ad.delta_weight()).item() == ad.d_min


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_randlora_forward_matches_peft(rank):
    """PEFT's RandLoRA fed the same shared bases, lambdas and gammas computes the same function."""
    peft = pytest.importorskip("peft")
    model, adapters = randlora_model(rank)
    plain = mlp([64, 64], 0.0, torch.Generator().manual_seed(0), "cpu").double().eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for ad in adapters:
            ad.lam.normal_(generator=g)
            ad.gam.normal_(generator=g)
    cfg = peft.RandLoraConfig(r=rank, target_modules=["net.0", "net.3", "net.6"], randlora_alpha=0.7 * rank,
                              randlora_dropout=0.0)  # PEFT scales by alpha / r
    pm = peft.get_peft_model(copy.deepcopy(plain), cfg).double().eval()
    layers = [m for _, m in pm.named_modules() if hasattr(m, "randlora_lambda")]
    assert len(layers) == 3
    with torch.no_grad():
        a_shared = layers[0].randlora_A["default"]  # (r, 1, D_min), shared by the layers
        b_shared = layers[0].randlora_B["default"]  # (D_max, N_max, r)
        a_shared.zero_()
        b_shared.zero_()
        for lay, ad in zip(layers, adapters):  # our per-layer slices of the shared bases, written back
            a_shared[:, 0, :ad.d_min] = ad.A
            b_shared[:ad.d_max, :ad.Bases.shape[1], :] = ad.Bases
            lay.randlora_lambda["default"].copy_(ad.lam)
            lay.randlora_gamma["default"].copy_(ad.gam)
    x = torch.randn(16, 784, generator=g, dtype=torch.float64)
    torch.testing.assert_close(pm(x), model(x), rtol=1e-10, atol=1e-8)
