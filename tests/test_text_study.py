"""main.py on the texts (issue 22, the adaptation study): the gpt's base model on task A's text, every method on
task B's, the tasks chosen by what the model takes; its rows, table, samples and figures; its one-line errors."""
from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch

from config import Config
from data import load_text, text_bounds, vocabulary
from engine.results import read_rows
from engine.settings import settings_hash
from engine.stack import StackedModel
from models import build_model, generate
from sweep import CURVE_COLUMNS, RUN_COLUMNS
from tests.conftest import ROOT
from tests.test_cli import assert_one_line_error, run_main

TINY = ["--model", "gpt", "--gpt_dim", "8", "--gpt_depth", "1", "--gpt_heads", "2", "--gpt_context", "8",
        "--text_chars", "400", "--max_epochs", "2", "--seeds", "0", "1", "--progress", "false"]
DATA = ROOT / "data"


@pytest.fixture(scope="module")
def text_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("text")
    args = [*TINY, "--method", "rac_lora", "--ranks", "1", "2", "--sample_chars", "30", "--results_dir",
            out / "results", "--plots_dir", out / "plots", "--workers", "1"]
    proc = run_main(*args)
    assert proc.returncode == 0, proc.stderr
    return out, args, proc


def test_main_runs_the_gpt_on_the_texts(text_sweep):
    out, _, proc = text_sweep
    runs = read_rows(out / "results" / "runs.csv", RUN_COLUMNS)
    assert sorted((r["method"], r["rank"], r["seed"]) for r in runs) == sorted(
        [("base", None, 0), ("fpft", None, 0), ("fpft", None, 1)] +
        [("rac_lora", r, s) for r in (1, 2) for s in (0, 1)])
    chance = math.log(len(vocabulary(DATA)))  # a model that knows nothing: ln 80 nats per character
    for r in runs:
        assert r["model"] == "gpt"
        assert 0 < r["test_loss_b"] < 1.5 * chance and 0 < r["test_loss_a"] < 1.5 * chance
        assert 0.0 <= r["test_acc_b"] <= 1.0
        sample = json.loads(r["sample"])
        assert sample.startswith("Elizabeth") and len(sample) == len("Elizabeth") + 30
        assert json.loads(r["config"])["text_b"] == "austen"
    fpft = [r for r in runs if r["method"] == "fpft"]
    base = next(r for r in runs if r["method"] == "base")
    assert all(r["test_loss_b"] < base["test_loss_b"] for r in fpft)  # adapting to B lowers B's loss
    # the table: losses in nats and bits per character, the samples of the base, FPFT and RAC-LoRA
    assert "task A: shakespeare, task B: austen" in proc.stdout
    for needle in ("test loss B (nats)", "bits/char B", "test loss A (nats)", "--- base model (seed 0) ---",
                   "--- FPFT (seed 0) ---", "--- RAC-LoRA left r="):
        assert needle in proc.stdout, needle
    line = next(l for l in proc.stdout.splitlines() if l.startswith("base "))
    nats, bits = float(line.split()[5]), float(line.split()[8])
    assert bits == pytest.approx(nats / math.log(2), abs=2e-4)
    curves = read_rows(out / "results" / "curves.csv", CURVE_COLUMNS)
    assert {c["config_hash"] for c in curves} == {r["config_hash"] for r in runs}
    assert all(c["val_loss"] > 0 for c in curves)
    pngs = {p.name for p in (out / "plots").glob("*.png")}
    assert {"gpt_rank_vs_accuracy.png", "gpt_accuracy_vs_epoch.png", "gpt_methods_rank1.png"} <= pngs


def test_a_second_run_resumes_every_run(text_sweep):
    out, args, _ = text_sweep
    proc = run_main(*args)
    assert proc.returncode == 0, proc.stderr
    assert "0 runs to train, 6 already recorded" in proc.stdout + proc.stderr


def test_the_tasks_follow_the_model():
    text = Config(model="gpt", gpt_dim=8, gpt_depth=1, gpt_heads=2, gpt_context=8, text_chars=400, task_b_chars=200)
    tasks = text.load_tasks("cpu")
    assert tasks["A"].spec.shape == (8,) and tasks["A"].spec.classes == 80
    vocab = vocabulary(DATA)
    austen = vocab.encode(load_text("austen", DATA))
    (a, _), (v0, _) = text_bounds(len(austen))["train"], text_bounds(len(austen))["val"]
    assert torch.equal(tasks["B"].train.x.flatten(), austen[a:a + 192])  # B's training split cut to 200: 24 windows
    assert torch.equal(tasks["B"].val.x.flatten(), austen[v0:v0 + 392])  # every split cut to 400: 49 windows
    assert len(tasks["A"].train) == 49 and len(tasks["A"].test) == 49
    images = Config().load_tasks("cpu")
    assert images["B"].spec.shape == (1, 28, 28)


def test_the_base_model_does_not_depend_on_task_b():
    """The base run's hash (its cached checkpoint) is the same whatever task B is; every run on B differs."""
    one = Config(model="gpt", text_b="austen")
    other = Config(model="gpt", text_b="shakespeare", task_b_chars=1000)
    assert settings_hash(one, "cpu", kind="base") == settings_hash(other, "cpu", kind="base")
    for kind in ("fpft", "adapter"):
        assert settings_hash(one, "cpu", kind=kind) != settings_hash(other, "cpu", kind=kind)
    # and the image study's hashes ignore the text fields
    assert settings_hash(Config(), "cpu", kind="adapter") == settings_hash(Config(text_b="shakespeare"), "cpu",
                                                                          kind="adapter")


def test_a_stack_samples_what_each_run_samples_alone():
    """models.generate on a stack of two different gpts gives, run by run, the text each one alone gives with a
    generator of the same seed (float64)."""
    settings = dict(dim=8, depth=1, heads=2, context=8, dropout=0.1)
    plain = build_model("gpt", settings, (8,), 80, torch.Generator().manual_seed(0), "cpu").double()
    stack = StackedModel(copy.deepcopy(plain), 2)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=p.dtype))
    prompt = vocabulary(DATA).encode("Elizabeth")
    together = generate(stack, prompt, 20, [torch.Generator().manual_seed(s) for s in (3, 4)], 8)
    for i, seed in enumerate((3, 4)):
        alone = copy.deepcopy(plain)
        alone.load_state_dict(stack.run_state(i))  # run i's own weights, as a plain model
        own = generate(alone, prompt, 20, [torch.Generator().manual_seed(seed)], 8)
        assert own.shape == (1, 9 + 20)
        assert torch.equal(together[i], own[0])
    assert not torch.equal(together[0], together[1])


@pytest.mark.parametrize("args, needle", [
    (["--text_b", "tolstoy"], "text_b"),
    (["--sample_prompt", "Élise"], "sample_prompt"),
    (["--gpt_context", "500"], "context"),
    (["--task_b_chars", "-1"], "task_b_chars"),
])
def test_bad_text_settings_are_one_line(args, needle, tmp_path):
    proc = run_main(*TINY, "--results_dir", tmp_path / "r", "--plots_dir", tmp_path / "p", *args)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "r").exists()


def test_a_changed_text_file_is_one_line(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DATA / "text", data / "text")
    path = data / "text" / "austen_pride_and_prejudice.txt"
    path.write_bytes(path.read_bytes().replace(b"Elizabeth", b"Elisabeth", 1))
    proc = run_main(*TINY, "--data_dir", data, "--results_dir", tmp_path / "r", "--plots_dir", tmp_path / "p")
    assert_one_line_error(proc, "corrupt data file")
