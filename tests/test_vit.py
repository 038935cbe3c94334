"""The Vision Transformer: the stacked engine equals runs alone (float64), adapters target layers by name as
PEFT does and agree with PEFT on its Linear layers, trainable counts match their formulas, and the command
line runs it end to end."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from engine.build import build_run
from data import DIGITS
from lora import adapters_of, wrap_linears
from raclora.methods import METHODS
from models import TARGET_PRESETS, build_model, count_trainable, target_linears
from engine.stack import StackedModel, train_stack
from tests.test_stack import DT, assert_run_is_alone, noisy_task
from train import train
from tests.conftest import assert_stack_forward_equals_each_copy

TINY = dict(patch=7, dim=8, depth=1, heads=2, mlp_dim=16, dropout=0.1)  # 16 patches of 7x7, 17 tokens
KW = dict(weight_decay=0.01, batch_size=64, max_epochs=4, patience=2)
METHOD_KW = dict(total_steps=20, merge_every=1, loraplus_ratio=4.0, relora_every=3, relora_warmup=2,
                 adalora_interval=2)
SEEDS, RANKS, SCALE = [3, 4, 5], [1, 2, 4], 0.5


def vit(generator, settings=TINY, dtype=DT):
    return build_model("vit", settings, DIGITS.shape, DIGITS.classes, generator, "cpu").to(dtype)


@pytest.fixture(scope="module")
def base():
    model = vit(torch.Generator().manual_seed(11))
    with torch.no_grad():  # non-trivial LayerNorm and tokens, so that a wrong stacked form cannot hide
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=DT))
    return model


@pytest.fixture(scope="module")
def task():
    return noisy_task(n=192)


def test_shapes_and_names():
    model = vit(torch.Generator().manual_seed(0), dtype=torch.float32).eval()
    x = torch.randn(3, 784)
    assert model(x).shape == (3, 5)
    names = [n for n, _ in target_linears(model, None)]
    assert names == ["patch", "blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.o",
                     "blocks.0.fc1", "blocks.0.fc2", "head"]
    assert [n for n, _ in target_linears(model, ["attention"])] == names[1:5]
    assert [n for n, _ in target_linears(model, ["mlp"])] == names[5:7]
    assert [n for n, _ in target_linears(model, ["q", "head"])] == ["blocks.0.attn.q", "head"]
    # patches are row-major 7x7 tiles: the first patch is the image's top-left corner
    img = torch.arange(784.0).view(1, 784)
    assert torch.equal(model.patches(img)[0, 0], torch.arange(784.0).view(28, 28)[:7, :7].flatten())
    assert torch.equal(model.patches(img)[0, 1], torch.arange(784.0).view(28, 28)[:7, 7:14].flatten())


def test_stacked_forward_equals_each_copy(base):
    x = torch.randn(10, 784, generator=torch.Generator().manual_seed(1), dtype=DT)
    model = StackedModel(base, 3).eval()
    assert_stack_forward_equals_each_copy(base, model, x, DT)


def alone(base, task, method, sketch, rank, seed, lr, targets):
    g = torch.Generator().manual_seed(seed)
    run = build_run(base, method, sketch, [rank], [g], [None if rank is None else SCALE * rank], targets=targets,
                    lr=lr, **METHOD_KW)
    return run.model, train(run.model, run.params, task, lr=lr, generator=g, **{**KW, **run.hooks})


def assert_same_runs(base, task, method, sketch, lr, targets=None):
    ranks = [None] * 3 if method == "fpft" else [2] * 3 if METHODS[method].one_rank_stacks else RANKS
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    run = build_run(base, method, sketch, ranks, gens, [None if r is None else SCALE * r for r in ranks],
                    stacked=True, targets=targets, lr=lr, **METHOD_KW)
    records = train_stack(run.model, run.params, task, generators=gens, lr=lr, **{**KW, **run.hooks})
    for i, (rank, seed) in enumerate(zip(ranks, SEEDS)):
        ref, rec = alone(base, task, method, sketch, rank, seed, lr, targets)
        assert_run_is_alone(run.model, i, records[i], ref, rec, task)


@pytest.mark.parametrize("method,sketch", [("fpft", None)] + [
    (m, s) for m in METHODS for s in (["left", "right"] if METHODS[m].uses_sketch else [None])])
def test_every_method_stacked_equals_alone(base, task, method, sketch):
    slow = method != "fpft" and (METHODS[method].step_merges or METHODS[method].b_lr_ratio)
    assert_same_runs(base, task, method, sketch, lr=3e-3 if slow else 1e-2)


@pytest.mark.parametrize("targets", [["attention"], ["mlp"], ["q", "head"]])
@pytest.mark.parametrize("method", ["rac_lora", "randlora"])
def test_target_sets_stacked_equal_alone(base, task, method, targets):
    assert_same_runs(base, task, method, "left" if method == "rac_lora" else None, lr=1e-2, targets=targets)


def lora_count(model, targets, rank, method, sketch):
    """The formula: per targeted (out x in) layer, r*in for A and r*out for B, for the factors that train."""
    trains = METHODS[method].trains
    zero, random = ("A", "B") if sketch == "left" else ("B", "A")
    trained = {zero} if trains == ("zero",) else {zero, random}
    return sum(rank * (lin.in_features * ("A" in trained) + lin.out_features * ("B" in trained))
               for _, lin in target_linears(model, targets))


@pytest.mark.parametrize("preset", list(TARGET_PRESETS))
@pytest.mark.parametrize("method,sketch", [("lora", "left"), ("rac_lora", "left"), ("rac_lora", "right"),
                                           ("asymmetric_lora", "right")])
def test_trainable_counts_match_the_formula(preset, method, sketch):
    default = dict(patch=7, dim=32, depth=2, heads=2, mlp_dim=64, dropout=0.1)
    base = vit(torch.Generator().manual_seed(0), default, torch.float32)
    targets = None if preset == "all" else [preset]
    for rank in (1, 4):
        run = build_run(base, method, sketch, [rank], [torch.Generator().manual_seed(0)], [1.0], targets=targets,
                        lr=1e-3, total_steps=10)
        assert count_trainable(run.model) == lora_count(base, targets, rank, method, sketch)
        stacked = build_run(base, method, sketch, [rank, 1], [torch.Generator().manual_seed(s) for s in (0, 1)],
                            [1.0, 1.0], stacked=True, targets=targets, lr=1e-3, total_steps=10)
        assert stacked.model.trainable_count(0) == count_trainable(run.model)
    # the counts of the default ViT, written out: 2 blocks of q, k, v, o (32x32) and fc1 (32->64), fc2 (64->32)
    assert lora_count(base, ["attention"], 1, "rac_lora", "left") == 2 * 4 * 32
    assert lora_count(base, ["mlp"], 1, "rac_lora", "left") == 2 * (32 + 64)
    assert lora_count(base, None, 1, "lora", "left") == 49 + 32 + 2 * (4 * 64 + 96 + 96) + 37
    assert count_trainable(base) == (49 * 32 + 32) + 32 + 17 * 32 + 2 * (4 * (32 * 32 + 32) + 2 * 64 + 32 * 64 + 64
                                                                        + 64 * 32 + 32) + 2 * 32 + 32 * 5 + 5


def test_function_unchanged_at_init_and_by_merge_and_reset(base):
    x = torch.randn(6, 784, generator=torch.Generator().manual_seed(2), dtype=DT)
    model = copy.deepcopy(base).eval()
    want = model(x)
    g = torch.Generator().manual_seed(0)
    adapters = wrap_linears(model, 2, 0.7, "left", "gaussian", g, ["attention", "mlp"])
    assert len(adapters) == 6 and adapters == adapters_of(model)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    with torch.no_grad():
        for a in adapters:
            a.A.normal_(generator=g)
    moved = model(x)
    assert (moved - want).abs().max() > 1e-3
    for a in adapters:
        a.merge()
        a.reset(g)
    torch.testing.assert_close(model(x), moved, rtol=1e-12, atol=1e-12)


def test_lora_on_the_vit_agrees_with_peft(base):
    """PEFT's LoRA with target_modules q k v o on the same ViT, fed our factors: same layers chosen, same
    output, same delta and merged weights (float64)."""
    peft = pytest.importorskip("peft")
    rank, alpha = 2, 1.5
    ours = copy.deepcopy(base).eval()
    g = torch.Generator().manual_seed(3)
    adapters = wrap_linears(ours, rank, alpha, "left", "gaussian", g, ["attention"])
    with torch.no_grad():
        for a in adapters:
            a.A.normal_(generator=g)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha * rank, target_modules=["q", "k", "v", "o"], lora_dropout=0.0,
                          bias="none")
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert sorted(layers) == sorted(n for n, _ in target_linears(base, ["attention"]))
    for name, a in zip((n for n, _ in target_linears(base, ["attention"])), adapters):
        with torch.no_grad():
            layers[name].lora_A["default"].weight.copy_(a.A)
            layers[name].lora_B["default"].weight.copy_(a.B)
        torch.testing.assert_close(a.delta_weight(), layers[name].get_delta_weight("default"), rtol=1e-12,
                                   atol=1e-12)
    x = torch.randn(5, 784, generator=g, dtype=DT)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
    merged = theirs.merge_and_unload()
    for a in adapters:
        a.merge()
    for (name, lin), a in zip(target_linears(merged, ["attention"]), adapters):
        torch.testing.assert_close(a.base.weight, lin.weight, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.slow
def test_main_runs_the_vit_end_to_end(tmp_path):
    """The issue's command, on a tiny ViT and a short budget: the same CSVs and plots as for the MLP."""
    args = ["--model", "vit", "--vit_dim", "8", "--vit_depth", "1", "--vit_mlp_dim", "16", "--method", "rac_lora",
            "--ranks", "1", "--seeds", "0", "--max_epochs", "1", "--workers", "1", "--progress", "false",
            "--results_dir", str(tmp_path / "r"), "--plots_dir", str(tmp_path / "p")]
    out = subprocess.run([sys.executable, "main.py", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import csv
    rows = list(csv.DictReader(open(tmp_path / "r" / "runs.csv")))
    assert [r["method"] for r in rows] == ["base", "fpft", "rac_lora"]
    assert all('"model": "vit"' in r["config"] for r in rows)
    assert int(rows[2]["trainable_params"]) == 49 + 4 * 8 + 8 + 16 + 8  # rank 1, left sketch: r * in per layer
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [  # r_: the results folder's name (figure_prefix)
        "r_vit_accuracy_vs_epoch.png", "r_vit_methods_rank1.png", "r_vit_rank_vs_accuracy.png"]  # (one rank: no params_vs_accuracy)


@pytest.mark.parametrize("argv,needle", [
    (["--model", "vit", "--ranks", "33"], "rank 33 is out of range: ranks must be integers from 1 to 32"),
    (["--target_modules", "attention"], "target_modules attention selects none of the mlp's Linear layers"),
    (["--model", "vit", "--target_modules", "qq"], "selects none of the vit's Linear layers"),
    (["--model", "vit", "--vit_heads", "3"], "vit_dim 32 is not a multiple of vit_heads 3"),
    (["--model", "vit", "--vit_patch", "5"], "vit_patch 5 does not divide the 28x28 images"),
    (["--model", "transformer"], "unknown model 'transformer'; allowed: mlp, vit, gpt"),
    (["--model", "vit", "--vit_patch", "1"], "the vit needs about"),  # 785 tokens: attention maps of ~500 GiB
])
@pytest.mark.slow
def test_bad_model_settings_get_one_line(tmp_path, argv, needle):
    out = subprocess.run([sys.executable, "main.py", *argv, "--results_dir", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and needle in out.stderr, out.stderr
    assert not (tmp_path / "runs.csv").exists()


def test_the_configs_model_names_and_model_fields_are_the_registrys():
    """config.py reads the models from models.py's registry, and a field only some models read enters only
    their runs' hashes (derived from the registry, not kept by hand)."""
    import config
    import models
    from raclora.errors import ConfigError

    with pytest.raises(ConfigError, match=f"unknown model 'x'; allowed: {', '.join(models.MODELS)}$"):
        config.Config(model="x")
    fields = config.Config.__dataclass_fields__
    for name, (_, reads) in models.MODELS.items():  # every field a model reads is a Config field
        assert set(reads) <= set(fields)
        for f in reads:
            readers = fields[f].metadata["only"].get("model", tuple(models.MODELS))
            assert name in readers and all(f in models.MODELS[m][1] for m in readers), f


def test_figure_titles_name_the_model_and_the_target_set():
    from plots import model_tag

    def row(**cfg):
        return {"config": json.dumps(cfg)}
    assert model_tag([row(model="mlp", target_modules=["all"])]) == ""  # the paper's MLP: titles as before
    assert model_tag([row(hidden=[64, 64])]) == ""  # rows recorded before the model field existed
    assert model_tag([row(model="vit", target_modules=["all"])]) == "ViT"
    assert model_tag([row(model="vit", target_modules=["attention"])]) == "ViT, adapters on attention"


def test_run_sweep_from_python_checks_the_model_before_any_compute(tmp_path):
    from config import Config
    from raclora.errors import ConfigError
    from sweep import run_sweep

    cfg = Config(model="vit", ranks=[40], results_dir=str(tmp_path))  # the default ViT's layers are 32 wide at most
    with pytest.raises(ConfigError, match="rank 40 is out of range"):
        run_sweep(cfg, "test")
    assert not any(tmp_path.iterdir())
