"""The from-scratch study on the gpt (scratch.py --model gpt, lowrank.build_gpt): every form's stack equals its
runs alone in float64 on Tiny Shakespeare, LTE's merge leaves the function unchanged, the trainable counts
match their formulas and only the intended parameters train, bad values are one-line errors before any
compute, and the command line writes rows, the table and the figures."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import models
import scratch
from engine.results import read_rows
from engine.settings import from_argv
from lowrank import FORMS, HEADED, StackedFactorised, StackedLTE, build_gpt
from raclora.errors import ConfigError
from scratch import ScratchConfig, ScratchTrainer
from tests.conftest import ROOT

# a tiny gpt on the first 400 characters of each split: 49 windows of 8 characters a split
TINY_FIELDS = dict(model="gpt", gpt_dim=8, gpt_depth=1, gpt_heads=2, gpt_context=8, text_chars=400)


def tiny(**changes) -> list[str]:
    """The tiny gpt's command line, with ``changes`` to its fields."""
    return [a for k, v in {**TINY_FIELDS, **changes}.items() for a in (f"--{k}", str(v))]


TINY = tiny()
RANK, HEADS = 2, 2


def tiny_config(*extra) -> ScratchConfig:
    return from_argv([*TINY, "--optimizer", "adamw", "--lr", "0.01", "--batch_size", "8", "--max_epochs", "3",
                      "--epoch_steps", "3", "--lte_every", "2", "--galore_every", "3", "--progress", "false",
                      *map(str, extra)], ScratchConfig, "scratch.py")


@pytest.fixture(scope="module")
def task():
    return tiny_config().load_task("cpu")


def _train(cfg, task, form: str, seeds: list[int]):
    """Runs of ``seeds`` as one stack through the study's own trainer, every tensor in float64."""
    specs = [dict(form=form, rank=None if form == "full" else RANK, heads=HEADS if form in HEADED else None, seed=s)
             for s in seeds]
    torch.set_default_dtype(torch.float64)
    try:
        return ScratchTrainer(cfg, "test", task=task, show_epochs=False).run(specs)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("form", FORMS)
def test_gpt_stack_equals_runs_alone(form, task):
    """Three seeds in one stack: each run's losses and accuracies at every evaluation are the run's alone (9 steps
    of batch 8 over 49 windows: a second pass starts within an epoch of 3 steps)."""
    cfg = tiny_config()
    stacked = _train(cfg, task, form, [0, 1, 2])
    assert stacked[0][1][-1]["train_loss"] != stacked[1][1][-1]["train_loss"]  # the seeds differ
    worst = 0.0
    for i, seed in enumerate([0, 1, 2]):
        (row, curve), = _train(cfg, task, form, [seed])
        assert row["trainable_params"] == stacked[i][0]["trainable_params"]
        assert [c["step"] for c in curve] == [3, 6, 9] == [c["step"] for c in stacked[i][1]]
        for a, b in zip(stacked[i][1], curve):
            for k in ("train_loss", "val_loss", "test_loss", "val_acc", "test_acc"):
                worst = max(worst, abs(a[k] - b[k]))
            assert a["merged"] == b["merged"]
    assert worst <= 1e-10, worst
    if form in HEADED:
        assert stacked[0][0]["merges"] == 4  # a merge every 2 steps, 9 steps


def _tiny_gpt(form: str, seeds=(0, 1), dtype=torch.float64):
    cfg = tiny_config()
    shape, classes = cfg.task_shape()
    torch.set_default_dtype(dtype)
    try:
        return build_gpt(form, models.model_settings(cfg), shape, classes, None if form == "full" else RANK, HEADS,
                         [torch.Generator().manual_seed(s) for s in seeds], "cpu"), cfg
    finally:
        torch.set_default_dtype(torch.float32)


def test_gpt_lte_merge_leaves_the_function_unchanged():
    model, cfg = _tiny_gpt("lte")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.lte_layers():  # heads that have learnt something
            layer.B.normal_(generator=g)
    x = torch.randint(0, 80, (2, 4, cfg.gpt_context), generator=g)
    model.eval()
    before = model(x)
    for layer in model.lte_layers():
        layer.merge([torch.Generator().manual_seed(s) for s in (10, 11)])
    assert all(torch.all(layer.B == 0) for layer in model.lte_layers())
    assert (model(x) - before).abs().max() <= 1e-12


def _linears(cfg):
    shape, classes = cfg.task_shape()
    plain = models.build_model("gpt", models.model_settings(cfg), shape, classes, torch.Generator().manual_seed(0),
                               "cpu")
    dims = [(m.in_features, m.out_features) for m in plain.modules() if isinstance(m, torch.nn.Linear)]
    rest = sum(p.numel() for m in plain.modules() if not isinstance(m, torch.nn.Linear)
               for p in m.parameters(recurse=False))  # embeddings, positions, LayerNorms
    return plain, dims, rest


@pytest.mark.parametrize("form", FORMS)
def test_gpt_trainable_counts_and_what_trains(form):
    model, cfg = _tiny_gpt(form, dtype=torch.float32)
    plain, dims, rest = _linears(cfg)
    per_layer = {"full": lambda i, o: i * o + o, "galore": lambda i, o: i * o + o,
                 "lowrank": lambda i, o: RANK * (i + o) + o, "lowrank_ae": lambda i, o: RANK * (i + o) + RANK + o,
                 "lte": lambda i, o: HEADS * RANK * (i + o) + o, "lora": lambda i, o: HEADS * RANK * (i + o) + o}[form]
    assert len(dims) == 7  # q k v o fc1 fc2 of the block, and the head
    assert model.trainable_count(0) == model.trainable_count(1) == sum(per_layer(i, o) for i, o in dims) + rest
    if form in ("full", "galore"):
        assert model.trainable_count(0) == models.count_trainable(plain)
    trains = {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected = {"full": {"weight", "bias"}, "galore": {"weight", "bias"}, "lowrank": {"U", "V", "bias", "weight"},
                "lowrank_ae": {"U", "V", "c", "bias", "weight"}, "lte": {"A", "B", "bias", "weight"},
                "lora": {"A", "B", "bias", "weight"}}[form]  # "weight": embeddings, positions, LayerNorms
    assert trains == expected
    layers = [m for m in model.body.modules() if isinstance(m, (StackedLTE, StackedFactorised))]
    if form in HEADED:  # W changes by merges only, in every Linear of the gpt
        assert len(layers) == 7 and frozen == {n for n, _ in model.named_parameters() if n.endswith("linear.weight")
                                               } | {f"body.{n}.weight" for n, m in model.body.named_modules()
                                                    if isinstance(m, StackedLTE)}
        out = model(torch.randint(0, 80, (2, 4, cfg.gpt_context), generator=torch.Generator().manual_seed(1)))
        out.sum().backward()
        assert all(layer.weight.grad is None and layer.A.grad is not None for layer in layers)
    else:
        assert not frozen and len(layers) == (7 if form.startswith("lowrank") else 0)
    for name in ("embed", "pos", "norm"):  # train in full in every form
        assert all(p.requires_grad for p in model.body.get_submodule(name).parameters())


def _run_scratch(*args):
    return subprocess.run([sys.executable, str(ROOT / "scratch.py"), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ})


def _one_line_error(proc, needle: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("argv, needle", [
    (tiny() + ["--lte_heads", "0"], "lte_heads must be one or more head counts from 1 to"),
    (tiny() + ["--ranks", "9"], "rank 9 is out of range: ranks must be integers from 1 to 8"),
    (tiny() + ["--form", "lora", "--ranks", "4", "--lte_heads", "4"], "lora: rank x heads (lora's one head) 16 is above 8"),
    (tiny(gpt_context=400), "context length must be an integer from 1 to"),
    (tiny(gpt_heads=3), "gpt_dim 8 is not a multiple of gpt_heads 3"),
    (tiny(dropout=0.1, model="mlp"), "dropout must be 0 for the mlp"),
])
def test_gpt_bad_values_are_refused_before_any_compute(argv, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        from_argv(argv, ScratchConfig, "scratch.py").check_setup()


def test_gpt_bad_value_is_one_line_on_the_command_line(tmp_path):
    _one_line_error(_run_scratch(*tiny(gpt_context=400), "--results_dir", tmp_path), "context length")


def test_gpt_end_to_end_writes_rows_table_and_figures(tmp_path):
    args = [*TINY, "--ranks", "2", "--lte_heads", "1", "2", "--seeds", "0", "1", "--max_epochs", "2",
            "--epoch_steps", "2", "--batch_size", "4", "--optimizer", "adamw", "--lr", "0.01", "--lte_every", "2",
            "--workers", "1", "--results_dir", tmp_path / "results", "--plots_dir", tmp_path / "plots", "--progress", "false"]
    proc = _run_scratch(*args)
    assert proc.returncode == 0, proc.stderr
    runs = read_rows(tmp_path / "results" / "scratch_runs.csv", scratch.RUN_COLUMNS)
    configs = sorted({(r["form"], r["rank"], r["heads"]) for r in runs}, key=str)
    assert configs == sorted([("full", None, None), ("galore", 2, None), ("lora", 2, 2), ("lowrank", 2, None),
                              ("lowrank_ae", 2, None), ("lte", 2, 1), ("lte", 2, 2)], key=str)  # lora x 1 = lte x 1
    assert len(runs) == 2 * len(configs)
    for r in runs:
        assert r["model"] == "gpt" and r["dataset"] == "shakespeare" and r["steps"] == 4 and r["epochs"] == 2
        assert 0 < r["final_test_loss"] < 2 * math.log(80)
    curves = read_rows(tmp_path / "results" / "scratch_curves.csv", scratch.CURVE_COLUMNS)
    assert len(curves) == 2 * len(runs) and {c["step"] for c in curves} == {2, 4}
    assert all(c["wall_s"] >= 0 and c["test_loss"] > 0 for c in curves)
    for needle in ("test loss (nats)", "bits/char", "loss at"):
        assert needle in proc.stdout
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        f"scratch_shakespeare_adamw_{n}.png" for n in ("loss_step", "loss_wall", "final_loss")}
