"""The from-scratch study: each form's defining property, stacked equals alone, GaLore against
galore-torch, Fashion-MNIST provisioning, and scratch.py as a user runs it."""
from __future__ import annotations

import gzip
import os
import subprocess
import sys

import pytest
import torch

from engine.settings import from_argv
from lowrank import FORMS
import scratch
from scratch import ScratchConfig, scratch_settings_hash
from raclora.errors import ConfigError
from data import FASHION_FILES, Split, Task, provide_fashion_mnist
from raclora.errors import DataError
from galore import GaLoreAdamW, state_numel
from lowrank import StackedFactorised, StackedLTE, build
from engine.results import read_rows
from engine.stack import train_stack
from tests.conftest import ROOT


def _task(n_in: int = 20, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)

    def split(n):
        return Split(torch.randn(n, n_in, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g))
    return Task(split(96), split(32), split(32))


def _train(form: str, seeds: list[int], task: Task, epochs: int = 3):
    """Runs of ``seeds`` as one stack: float64, LTE merging every 3 steps, GaLore re-projecting every 4."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    torch.set_default_dtype(torch.float64)
    try:
        model = build(form, [12, 12], 3, gens, "cpu", lte_heads=2, n_in=20, n_out=10)
    finally:
        torch.set_default_dtype(torch.float32)
    lte = model.lte_layers()

    def merge(step, generators):
        if lte and step % 3 == 0:
            for layer in lte:
                layer.merge(generators)
            return True
        return False

    def make(params):
        if form == "galore":
            return GaLoreAdamW([{"params": [p for p in params if p.dim() != 3]},
                                {"params": [p for p in params if p.dim() == 3], "rank": 3, "update_every": 4,
                                 "scale": 0.25}], lr=1e-2, weight_decay=0.01)
        return torch.optim.SGD(params, lr=0.05) if form == "lowrank" else torch.optim.AdamW(params, lr=1e-2)

    records = train_stack(model, [p for p in model.parameters() if p.requires_grad], task, generators=gens,
                          lr=1e-2, weight_decay=0.0, batch_size=16, max_epochs=epochs, patience=10,
                          on_step_end=merge, make_optimizer=make)
    return records, model


@pytest.mark.parametrize("form", FORMS)
def test_stacked_equals_alone(form):
    """Three seeds in one stack give each run exactly what the run gives alone (R = 1)."""
    task = _task()
    records, model = _train(form, [0, 1, 2], task)
    assert records[0].curve[-1]["train_loss"] != records[1].curve[-1]["train_loss"]  # the seeds differ
    for i, seed in enumerate([0, 1, 2]):
        alone, m1 = _train(form, [seed], task)
        for a, b in zip(records[i].curve, alone[0].curve):
            for k in ("train_loss", "val_loss", "val_acc", "test_acc", "merged"):
                assert a[k] == pytest.approx(b[k], rel=1e-10, abs=1e-12), (k, a, b)
        for (k, v), (k1, v1) in zip(model.state_dict().items(), m1.state_dict().items()):
            assert k == k1 and torch.allclose(v[i], v1[0], rtol=1e-10, atol=1e-12), k
    if form in ("lte", "lora"):
        assert records[0].merges == 3 * 6 // 3  # 6 steps an epoch, a merge every 3


def test_lowrank_forms_rank_init_and_count():
    gens = [torch.Generator().manual_seed(0)]
    lr = StackedFactorised(784, 512, 8, "lowrank", gens, "cpu")
    ae = StackedFactorised(784, 512, 8, "lowrank_ae", gens, "cpu")
    for layer in (lr, ae):
        assert torch.linalg.matrix_rank(layer.weight()[0]).item() == 8
    assert lr.U.abs().max() <= 8 ** -0.5 and lr.V.abs().max() <= 8 ** -0.5  # U(-1/sqrt(r), 1/sqrt(r)) both
    assert lr.U.abs().max() > 0.9 * 8 ** -0.5 and lr.V.abs().max() > 0.9 * 8 ** -0.5
    assert ae.V.abs().max() <= 784 ** -0.5 < ae.U.abs().max() <= 8 ** -0.5  # nn.Linear defaults: 1/sqrt(fan_in)
    assert lr.trainable_count(0) == 8 * (784 + 512) + 512
    assert ae.trainable_count(0) == 8 * (784 + 512) + 8 + 512
    model = build("lowrank", [512, 512], 4, gens, "cpu", n_in=784, n_out=10)
    assert model.trainable_count(0) == sum(4 * (i + o) + o for i, o in ((784, 512), (512, 512), (512, 10)))
    assert build("full", [512, 512], None, gens, "cpu", n_in=784, n_out=10).trainable_count(0) == 669_706


def test_lte_merge_is_the_mean_of_the_heads_deltas():
    g = torch.Generator().manual_seed(3)
    layer = StackedLTE(torch.randn(2, 7, 20, generator=g), torch.randn(2, 7, generator=g), 2, 4, 0.5,
                       [torch.Generator().manual_seed(s) for s in (0, 1)])
    with torch.no_grad():
        layer.B.normal_(generator=g)  # heads that have learnt something
    w0 = layer.weight.detach().clone()
    deltas = [[0.5 * layer.B[i, n] @ layer.A[i, n] for n in range(4)] for i in range(2)]
    x = torch.randn(5, 20, generator=g)
    layer.eval()
    before = layer(x)
    old_a = layer.A.detach().clone()
    layer.merge([torch.Generator().manual_seed(s) for s in (10, 11)])
    for i in range(2):
        assert torch.allclose(layer.weight[i] - w0[i], sum(deltas[i]) / 4, atol=1e-6)
    assert torch.all(layer.B == 0) and not torch.allclose(layer.A, old_a)  # heads restart: B zero, A re-drawn
    assert torch.allclose(layer(x), before, atol=1e-5)  # evaluation used the merged weights already
    a = layer.A[0, 0]  # LTE's head init: orthonormal rows times sqrt(in / r)
    assert torch.allclose(a @ a.T, torch.eye(2) * 20 / 2, atol=1e-4)


def test_lte_head_n_learns_from_shard_n_only():
    layer = StackedLTE(torch.randn(1, 3, 6), torch.zeros(1, 3), 1, 4, 1.0, [torch.Generator().manual_seed(0)])
    with torch.no_grad():
        layer.B.fill_(0.1)
    x = torch.randn(1, 8, 6, generator=torch.Generator().manual_seed(1))  # 4 shards of 2 examples
    layer.train()
    out = layer(x)
    out[:, 2:4].sum().backward()  # the loss sees the second shard only
    touched = [n for n in range(4) if layer.A.grad[0, n].abs().sum() > 0 or layer.B.grad[0, n].abs().sum() > 0]
    assert touched == [1]
    assert layer.weight.grad is None  # the weight changes by merges only


def _galore_case(m: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g), torch.randn(m, generator=g), \
        [(torch.randn(m, n, generator=g), torch.randn(m, generator=g)) for _ in range(5)]


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])  # projected on the right, then on the left
def test_galore_matches_galore_torch(shape):
    """Five steps with weight decay and a projection refresh after two, against the authors' package."""
    import galore_torch as reference  # requirements-dev.txt
    w0, b0, grads = _galore_case(*shape, seed=0)
    ws = [torch.nn.Parameter(w0.clone()) for _ in range(2)]
    bs = [torch.nn.Parameter(b0.clone()) for _ in range(2)]
    ours = GaLoreAdamW([{"params": [bs[0]]}, {"params": [ws[0]], "rank": 3, "update_every": 2, "scale": 0.25}],
                       lr=1e-2, weight_decay=0.1)
    theirs = reference.GaLoreAdamW([{"params": [bs[1]]}, {"params": [ws[1]], "rank": 3, "update_proj_gap": 2,
                                                           "scale": 0.25, "proj_type": "std"}],
                                   lr=1e-2, weight_decay=0.1, no_deprecation_warning=True)
    for gw, gb in grads:
        for w, b in zip(ws, bs):
            w.grad, b.grad = gw.clone(), gb.clone()
        ours.step()
        theirs.step()
        assert torch.allclose(ws[0], ws[1], atol=1e-6) and torch.allclose(bs[0], bs[1], atol=1e-6)
    assert not torch.allclose(ws[0], w0)


@pytest.mark.parametrize("shape", [(64, 20), (20, 64)])
def test_galore_state_has_rank_r(shape):
    m, n = shape
    w0, b0, grads = _galore_case(m, n, seed=1)
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = GaLoreAdamW([{"params": [b]}, {"params": [w], "rank": 4, "update_every": 200, "scale": 1.0}], lr=1e-2)
    w.grad, b.grad = grads[0]
    opt.step()
    state = opt.state[w]
    small = (m, 4) if m >= n else (4, n)
    assert state["exp_avg"].shape == small and state["exp_avg_sq"].shape == small
    assert torch.linalg.matrix_rank(w.detach() - w0).item() == 4  # the step lies in a rank-4 subspace
    adam = torch.optim.AdamW([torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())])
    for p, gr in zip(adam.param_groups[0]["params"], grads[0]):
        p.grad = gr
    adam.step()
    assert state_numel(adam) == 2 * (m * n + m)
    assert state_numel(opt) == 2 * (m * 4 if m >= n else 4 * n) + 4 * min(m, n) + 2 * m  # moments, P, bias


def test_fashion_mnist_is_decompressed_from_the_package(tmp_path):
    source = tmp_path / "debian"
    source.mkdir()
    for i, name in enumerate(FASHION_FILES):
        with gzip.open(source / f"{name}.gz", "wb") as f:
            f.write(bytes([i]) * 100)
    raw = provide_fashion_mnist(tmp_path / "data", source=source)
    assert sorted(p.name for p in raw.iterdir()) == sorted(FASHION_FILES)
    assert (raw / FASHION_FILES[2]).read_bytes() == bytes([2]) * 100
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        provide_fashion_mnist(tmp_path / "other", source=tmp_path / "nowhere")


def test_scratch_config_hashes_and_ranges():
    base = scratch_settings_hash(ScratchConfig(), "cpu", "lowrank")
    assert scratch_settings_hash(ScratchConfig(lte_heads=[8], galore_every=50), "cpu", "lowrank") == base
    assert scratch_settings_hash(ScratchConfig(), "cpu", "lte", 8) != scratch_settings_hash(ScratchConfig(), "cpu", "lte", 4)
    # a head count is the run's, not the sweep's: the same run under another sweep keeps its hash
    assert scratch_settings_hash(ScratchConfig(lte_heads=[1, 4]), "cpu", "lte", 4) == \
        scratch_settings_hash(ScratchConfig(), "cpu", "lte", 4)
    assert scratch_settings_hash(ScratchConfig(optimizer="adamw"), "cpu", "galore") == \
        scratch_settings_hash(ScratchConfig(), "cpu", "galore")  # GaLore runs its own Adam either way
    assert scratch_settings_hash(ScratchConfig(ranks=[2], seeds=[4], form="lte"), "cpu", "lowrank") == base
    for argv, needle in ((["--form", "svd"], "unknown form 'svd'"), (["--ranks", "0"], "rank 0 is out of range"),
                         (["--dataset", "cifar"], "unknown dataset"), (["--optimizer", "lion"], "allowed: sgd, adamw"),
                         (["--ranks", "513"], "from 1 to 512")):
        with pytest.raises(ConfigError, match=needle):
            from_argv(argv, ScratchConfig, "scratch.py").check_setup()


def _run_scratch(*args):
    return subprocess.run([sys.executable, str(ROOT / "scratch.py"), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ})


@pytest.mark.slow
def test_scratch_py_end_to_end(tmp_path):
    """The issue's example command on MNIST, then a resume that trains nothing, and a bad value."""
    args = ["--form", "lowrank", "--ranks", "4", "8", "--seeds", "0", "--max_epochs", "1", "--results_dir",
            tmp_path / "results", "--plots_dir", tmp_path / "plots", "--progress", "false"]
    proc = _run_scratch(*args)
    assert proc.returncode == 0, proc.stderr
    runs = read_rows(tmp_path / "results" / "scratch_runs.csv", scratch.RUN_COLUMNS)
    assert sorted((r["form"], r["rank"]) for r in runs) == [("lowrank", 4), ("lowrank", 8)]
    for r in runs:
        assert r["dataset"] == "mnist" and r["optimizer"] == "sgd" and r["epochs"] == 1
        assert 0.1 < r["final_test_acc"] <= 1.0 and r["git_commit"]
    assert len(read_rows(tmp_path / "results" / "scratch_curves.csv", scratch.CURVE_COLUMNS)) == 2
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "scratch_mnist_sgd_lowrank.png", "scratch_mnist_sgd_all.png", "scratch_mnist_sgd_final.png"}
    again = _run_scratch(*args)
    assert again.returncode == 0 and "0 runs to train, 2 already recorded" in again.stderr + again.stdout
    for png in (tmp_path / "plots").iterdir():
        png.unlink()
    redrawn = _run_scratch(*args, "--plots_only")  # from the CSVs alone
    assert redrawn.returncode == 0 and len(list((tmp_path / "plots").iterdir())) == 3
    other = _run_scratch(*args, "--plots_only", "--lr", "0.5")  # no runs under these settings
    assert other.returncode == 2 and other.stderr.startswith("error: no runs in")
    bad = _run_scratch("--form", "svd")
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: unknown form 'svd'")


@pytest.mark.parametrize("name", ["scratch_fashion_mnist_e20_runs.csv", "scratch_fashion_mnist_sgd_e100_runs.csv"])
def test_recorded_image_runs_keep_their_hashes(name):
    """Every run recorded before the gpt (its config as it was: lte_heads one number, no model fields) gets the
    same config hash from today's ScratchConfig and run_hash, so that resume and the figures still find it."""
    import json
    rows = read_rows(ROOT / "docs" / "results" / name, scratch.RUN_COLUMNS)
    assert rows
    for r in rows:
        config = json.loads(r["config"])
        heads = config.pop("lte_heads")
        cfg = ScratchConfig(**config, lte_heads=[heads])
        got = scratch.run_hash(cfg, r["device"], r["form"], r["rank"], r["seed"],
                               heads if r["form"] in ("lte", "lora") else None)
        assert got == r["config_hash"], r["form"]
