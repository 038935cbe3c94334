"""glue.py refuses bad input in one line before any run trains, and records divergence (issue 20, "nothing
silently wrong"): the checks of GlueConfig.check_setup (glue.check_sources) on a tiny random RoBERTa and tiny
GLUE-layout files (tests/test_glue.py's), run in-process through glue.main; and a run whose training loss
becomes non-finite is recorded as diverged, with the epochs it completed and no result."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests.test_cli import assert_one_line_error
from tests.test_glue import MAX_LENGTH, ROOT, write_glue, write_tiny_roberta

pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(the tiny RoBERTa's folder, the GLUE-layout folder) that tests/test_glue.py writes."""
    root = tmp_path_factory.mktemp("glue_checks")
    return write_tiny_roberta(root / "tiny-roberta"), write_glue(root / "glue")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: the Hub's libraries answer from what is here, at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def glue_args(model, data, tmp_path, *extra):
    """glue.py's command line on the tiny sources, one LoRA run of one epoch unless ``extra`` says otherwise."""
    base = {"--model": str(model), "--data_dir": str(data), "--tasks": ["sst2"], "--method": "lora",
            "--seeds": ["0"], "--chains": "1", "--epochs_per_chain": "1", "--max_length": str(MAX_LENGTH),
            "--batch_size": "16", "--results_dir": str(tmp_path / "r"), "--plots_dir": str(tmp_path / "p"),
            "--progress": "false"}
    given = {a for a in extra if isinstance(a, str) and a.startswith("--")}
    args = []
    for k, v in base.items():
        if k not in given:
            args += [k, *(v if isinstance(v, list) else [v])]
    return args + [str(a) for a in extra]


def assert_refused(capsys, tmp_path, args, needle):
    """glue.main(args) exits 2 with one stderr line "error: ..." holding ``needle``, before the runner
    started (no "runs to train") and without a results row."""
    import glue

    code = glue.main(args)
    out = capsys.readouterr()
    assert code == 2, out.err
    assert_one_line_error(types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err), needle)
    assert "to train" not in out.out + out.err
    assert not (tmp_path / "r" / "glue_runs.csv").exists()
    return out.err


def copy_model(model: Path, to: Path) -> Path:
    shutil.copytree(model, to)
    return to


# --- 1. data files that are not UTF-8 ----------------------------------------------------------------------
def test_a_tsv_that_is_not_utf8_is_one_line_naming_file_and_line(sources, tmp_path, capsys):
    model, data = sources
    bad = tmp_path / "glue"
    shutil.copytree(data, bad)
    path = bad / "SST-2" / "train.tsv"
    path.write_bytes(b"sentence\tlabel\ngood film\t1\nbad \xff film\t0\n")
    assert_refused(capsys, tmp_path, glue_args(model, bad, tmp_path),
                   f"{path}, line 3: byte 0xff at offset 31 is not UTF-8")


def test_the_bad_byte_offset_counts_the_byte_order_mark(tmp_path):
    from glue import GlueError, read_text

    path = tmp_path / "train.tsv"
    path.write_bytes(b"\xef\xbb\xbfa\tb\nc\x80\n")
    with pytest.raises(GlueError, match=r"line 2: byte 0x80 at offset 8 is not UTF-8"):
        read_text(path)
    path.write_bytes(b"\xef\xbb\xbfQuality\t#1\n")
    assert read_text(path) == "Quality\t#1\n"


# --- 2. a config that cannot build the model -------------------------------------------------------------
def test_a_config_that_cannot_build_the_model_is_one_line(sources, tmp_path, capsys):
    model, data = sources
    broken = copy_model(model, tmp_path / "negative")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "hidden_size": -5}))
    assert_refused(capsys, tmp_path, glue_args(broken, data, tmp_path),
                   f"model '{broken}': its config cannot build a sequence classifier (RuntimeError: Trying to "
                   f"create tensor with negative dimension -5")


# --- 3. damaged weights ----------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _damage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[10:20] = b"\0" * 10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,needle", [
    (_truncate, "model.safetensors is damaged (SafetensorError: Error while deserializing header: incomplete"),
    (_damage_header, "model.safetensors is damaged (SafetensorError: Error while deserializing header: invalid JSON"),
    (Path.unlink, "has no weights: the folder needs one of model.safetensors, model.safetensors.index.json"),
])
def test_damaged_or_missing_weights_are_refused_before_training(sources, tmp_path, capsys, damage, needle):
    model, data = sources
    broken = copy_model(model, tmp_path / "broken")
    damage(broken / "model.safetensors")
    err = assert_refused(capsys, tmp_path, glue_args(broken, data, tmp_path), needle)
    assert f"model '{broken}'" in err


# --- 4. max_length beyond the position embeddings --------------------------------------------------------
def test_max_length_beyond_the_positions_names_the_allowed_maximum(sources, tmp_path, capsys):
    """The tiny RoBERTa has max_position_embeddings 28 and pad_token_id 1: its position ids start at 2, so it
    takes 26 tokens (27 fails in the model itself: the rule is what the model does)."""
    model, data = sources
    assert_refused(capsys, tmp_path, glue_args(model, data, tmp_path, "--max_length", 27),
                   f"max_length 27 is more than model '{model}' takes (max_position_embeddings 28 less "
                   f"pad_token_id + 1 = 2, where its position ids start); allowed: --max_length from 2 to 26")
    import torch
    from transformers import AutoModelForSequenceClassification

    net = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
    net(input_ids=torch.full((1, 26), 5))
    with pytest.raises((IndexError, RuntimeError)):
        net(input_ids=torch.full((1, 27), 5))


def test_bert_positions_have_no_offset():
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    from glue import max_positions

    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=28, pad_token_id=0)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    assert max_positions(config, model) == (28, 0)


# --- 5, 6. target_modules and rank against the model's Linear layers -------------------------------------
def test_target_modules_that_match_nothing_list_the_linear_layers(sources, tmp_path, capsys):
    model, data = sources
    assert_refused(capsys, tmp_path, glue_args(model, data, tmp_path, "--target_modules", "foo"),
                   f"target_modules foo select no Linear layer of model '{model}'; allowed: names of its Linear "
                   f"layers: dense, key, out_proj, query, value")


def test_a_rank_above_the_targeted_layers_is_refused(sources, tmp_path, capsys):
    model, data = sources
    assert_refused(capsys, tmp_path, glue_args(model, data, tmp_path, "--rank", 1000),
                   "rank 1000 is more than min(in, out) = 32 of the targeted layer "
                   "roberta.encoder.layer.0.attention.self.query (32 -> 32); allowed: --rank from 1 to 32")


def _config(model, data, tmp_path, *extra):
    from engine.settings import from_argv
    from glue import GlueConfig

    return from_argv(glue_args(model, data, tmp_path, *extra), GlueConfig, prog="glue.py")


def test_full_fine_tuning_ignores_target_modules_and_rank(sources, tmp_path):
    model, data = sources
    _config(model, data, tmp_path, "--method", "fpft", "--target_modules", "foo", "--rank", 1000).check_setup()
    _config(model, data, tmp_path, "--rank", 32).check_setup()  # the largest rank allowed


def test_the_library_notes_do_not_break_the_one_line(sources, tmp_path):
    """As a user runs it: the check imports peft (and with it bitsandbytes, which logs a note about its CPU
    kernels on some machines): still one line on stderr."""
    model, data = sources
    done = subprocess.run([sys.executable, "glue.py", *glue_args(model, data, tmp_path, "--target_modules", "foo")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 2
    assert_one_line_error(done, "target_modules foo select no Linear layer")


# --- 7. every task's data read before the first run ------------------------------------------------------
def test_every_task_is_read_before_the_first_run_trains(sources, tmp_path, capsys):
    model, data = sources
    bad = tmp_path / "glue"
    shutil.copytree(data, bad)
    rte = bad / "RTE" / "train.tsv"
    lines = rte.read_text().splitlines()
    lines[2] = "\t".join([*lines[2].split("\t")[:-1], "maybe"])
    rte.write_text("\n".join(lines) + "\n")
    assert_refused(capsys, tmp_path, glue_args(model, bad, tmp_path, "--tasks", "sst2", "rte"),
                   f"{rte}, line 3: label 'maybe' is not one of entailment, not_entailment")


def test_the_trainer_reuses_the_data_check_setup_read(sources, tmp_path, monkeypatch):
    import glue

    model, data = sources
    cfg = _config(model, data, tmp_path, "--tasks", "sst2", "rte")
    cfg.check_setup()
    assert set(cfg.tasks_read) == {"sst2", "rte"} and len(cfg.tasks_read["rte"]["train"][0]) == 64

    def read_again(*args):
        raise AssertionError("read twice")

    monkeypatch.setattr(glue, "load_task", read_again)
    train, dev = glue.GlueTrainer(cfg, "test").task_data("rte")
    assert len(train) == 64 and len(dev) == 32


# --- 8. the Hub without the `datasets` package or network -----------------------------------------------
class _Offline(types.ModuleType):
    @staticmethod
    def load_dataset(*args, **kwargs):
        raise ConnectionError("offline: no network here")


@pytest.mark.parametrize("datasets,needle", [
    (None, "reading GLUE from the Hub needs the `datasets` package (pip install datasets) and network; or give "
           "--data_dir in GLUE's own layout"),
    (_Offline("datasets"), "GLUE task sst2 could not be read from the Hub (ConnectionError: offline: no network "
                           "here); give --data_dir in GLUE's own layout"),
])
def test_an_empty_data_dir_needs_the_hub_before_any_run(sources, tmp_path, capsys, monkeypatch, datasets, needle):
    model, _ = sources
    monkeypatch.setitem(sys.modules, "datasets", datasets)  # None: the package is not installed
    assert_refused(capsys, tmp_path, glue_args(model, "", tmp_path), needle)


# --- 9. a tokenizer without a vocabulary -----------------------------------------------------------------
def test_a_model_folder_without_tokenizer_files_is_refused(sources, tmp_path, capsys):
    """transformers makes a tokenizer of the special tokens alone there, which encodes every sentence alike."""
    model, data = sources
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model / name, bare / name)
    assert_refused(capsys, tmp_path, glue_args(bare, data, tmp_path),
                   f"model '{bare}': its tokenizer has only its 5 special tokens (<s> </s> <unk> <pad> <mask>) and "
                   f"no vocabulary")


# --- 10. divergence --------------------------------------------------------------------------------------
def _recorded(tmp_path):
    import glue
    from engine.results import read_results

    return read_results(tmp_path / "r", glue.PREFIX, glue.RUN_COLUMNS, glue.CURVE_COLUMNS)


def test_a_run_whose_loss_becomes_nan_is_recorded_as_diverged(sources, tmp_path, capsys):
    """Full fine-tuning at lr 1e10: the loss is nan at step 3, in the first epoch (4 steps of 16 examples)."""
    import glue

    model, data = sources
    assert glue.main(glue_args(model, data, tmp_path, "--method", "fpft", "--fpft_lr", "1e10")) == 0
    out = capsys.readouterr().out
    (row,), curves = _recorded(tmp_path)
    assert row["status"] == "diverged" and row["diverged_step"] == 3 and row["epochs"] == 0
    assert row["final_dev"] is None and row["best_dev"] is None and row["best_epoch"] is None and curves == []
    assert "- (0 +1 diverged)" in out and "wrote" not in out  # no figure of a run without a result


def test_an_inf_gradient_norm_is_a_divergence_not_a_run_that_stops_learning(sources, tmp_path, capsys):
    """--lora_alpha 1e30: the loss stays finite (ln 2) while the gradient norm is inf, and Trainer's clipping
    would turn every gradient into zero: a run recorded as finished that never learned. It is diverged."""
    import glue

    model, data = sources
    assert glue.main(glue_args(model, data, tmp_path, "--method", "lora", "--lora_alpha", "1e30")) == 0
    (row,), _ = _recorded(tmp_path)
    assert row["status"] == "diverged" and row["diverged_step"] == 1, row
    assert "- (0 +1 diverged)" in capsys.readouterr().out


def test_a_diverged_seed_keeps_its_epochs_and_is_counted_apart(sources, tmp_path, capsys, monkeypatch):
    """Seed 0 diverges at step 5 (the first step of epoch 2), seed 1 finishes: seed 0 keeps epoch 1's curve
    row, and the table's mean is seed 1's alone, with the diverged seed counted."""
    import glue
    from raclora.errors import Diverged, check_loss

    seen = []

    def diverge_once(loss, step, *what):
        if step == 5 and not seen:
            seen.append(step)
            raise Diverged(step, float("nan"))
        check_loss(loss, step, *what)

    monkeypatch.setattr(glue, "check_loss", diverge_once)
    model, data = sources
    assert glue.main(glue_args(model, data, tmp_path, "--seeds", 0, 1, "--epochs_per_chain", 2)) == 0
    out = capsys.readouterr().out
    runs, curves = _recorded(tmp_path)
    diverged, finished = sorted(runs, key=lambda r: r["seed"])
    assert (diverged["status"], diverged["diverged_step"], diverged["epochs"]) == ("diverged", 5, 1)
    assert diverged["final_dev"] is None and diverged["best_epoch"] is None
    assert [c["epoch"] for c in curves if c["config_hash"] == diverged["config_hash"]] == [1]
    assert (finished["status"], finished["diverged_step"], finished["epochs"]) == ("finished", None, 2)
    assert f"{100 * finished['final_dev']:.2f} (1 +1 diverged)" in out


def test_the_summary_counts_diverged_runs_apart():
    from glue import summary

    def row(seed, status, final):
        return dict(task="sst2", method="lora", seed=seed, status=status, final_dev=final, trainable_params=10,
                    merges=0 if final is None else 2)

    table = summary([row(0, "finished", 0.5), row(1, "diverged", None), row(2, "finished", 0.7)])
    assert "60.00 ± 14.14 (2 +1 diverged)" in table and table.splitlines()[-1].split()[-1] == "2"
    assert "- (0 +1 diverged)" in summary([row(0, "diverged", None)])


def test_runs_rows_have_a_diverged_step_after_merges():
    from glue import RUN_COLUMNS

    names = list(RUN_COLUMNS)
    assert names[names.index("merges") + 1] == "diverged_step" and RUN_COLUMNS["diverged_step"] is int


def test_fuzz_glue_setup_checks_give_a_config_or_one_clean_error(sources):
    """Hypothesis over glue.py's command line on the tiny sources, through the checks that read the model folder
    and the data (check_setup): a config, or one ConfigError line; never another exception (issue 20)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from engine.settings import from_argv
    from glue import GlueConfig
    from raclora.errors import ConfigError
    from tests.test_fuzz import NASTY

    model, data = sources
    fields = ["--rank", "--max_length", "--target_modules", "--lora_alpha", "--tasks", "--method", "--lr",
              "--max_train_examples", "--sketch", "--batch_size"]
    values = st.one_of(st.sampled_from(NASTY), st.sampled_from(["query", "value", "dense", "sst2", "rte", "stsb",
                                                                "mrpc", "26", "27", "32", "33", "1e30"]))
    pairs = st.lists(st.tuples(st.sampled_from(fields), values), max_size=4, unique_by=lambda p: p[0])

    @settings(max_examples=40, deadline=None)
    @given(pairs)
    def check(given_pairs):
        argv = ["--model", str(model), "--data_dir", str(data)] + [t for p in given_pairs for t in p]
        try:
            cfg = from_argv(argv, GlueConfig, prog="glue.py")
            cfg.check_setup()
        except ConfigError as e:
            assert len(str(e).splitlines()) == 1 and str(e)
    check()


def test_plots_only_reads_only_the_results_folder(sources, tmp_path, capsys):
    """Issue 21: `--plots_only` went to the Hub (it loaded the model's config). Train one run from a copy of the
    model folder, delete the copy: --plots_only still draws from the CSVs, and with no results says so in one line."""
    import shutil

    import glue

    model, data = sources
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    assert glue.main(glue_args(copy, data, tmp_path)) == 0
    shutil.rmtree(copy)
    capsys.readouterr()
    assert glue.main(glue_args(copy, data, tmp_path, "--plots_only")) == 0
    assert "wrote" in capsys.readouterr().out
    assert glue.main(glue_args("roberta-base", tmp_path / "no-data", tmp_path / "empty", "--plots_only")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no runs in") and len(err.strip().splitlines()) == 1, err


def test_relora_runs_in_glue_with_its_step_merges(sources, tmp_path, capsys):
    """Issue 21: relora was refused although the controller supports it. 64 SST-2 examples, batch 16: 4 steps an
    epoch, 2 epochs, a merge every 3 steps: merges after steps 3 and 6."""
    import glue

    model, data = sources
    assert glue.main(glue_args(model, data, tmp_path, "--method", "relora", "--epochs_per_chain", "2",
                               "--relora_every", "3", "--relora_warmup", "1")) == 0
    (row,), curves = _recorded(tmp_path)
    assert (row["method"], row["status"], row["merges"], row["epochs"]) == ("relora", "finished", 2, 2)
    assert [c["merged"] for c in curves] == [True, True]  # a merge inside each epoch (steps 3 and 6)
    assert "relora" in capsys.readouterr().out


def test_a_saved_head_that_does_not_fit_the_task_is_one_line(sources, tmp_path, capsys):
    """Issue 21: a model saved with a 2-label head, on STS-B (1 output), was a size-mismatch traceback mid-sweep."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model, data = sources
    headed = tmp_path / "headed"
    shutil.copytree(model, headed)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(model, num_labels=2)).save_pretrained(
        headed)
    capsys.readouterr()  # (save_pretrained's own progress bar)
    assert_refused(capsys, tmp_path, glue_args(headed, data, tmp_path, "--tasks", "sst2", "stsb"),
                   "its saved classifier.out_proj.weight has shape [2, 32], and task stsb (1 label) needs [1, 32] "
                   "(a head saved for another task)")


def test_a_tokenizer_larger_than_the_embedding_is_one_line(sources, tmp_path, capsys):
    import json
    import shutil

    model, data = sources
    small = tmp_path / "small"
    shutil.copytree(model, small)
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = 10
    (small / "config.json").write_text(json.dumps(config))
    assert_refused(capsys, tmp_path, glue_args(small, data, tmp_path),
                   "tokens and its embedding 10 rows (vocab_size): ids past 9 have no embedding")


def test_output_dir_keeps_models_that_reload_to_the_same_outputs(sources, tmp_path):
    """Issue 21: the trained models were thrown away. --output_dir keeps, per run, the merged model and the
    chain's adapter (with the earlier links' base weights); they reload (AutoModelForSequenceClassification;
    AutoPeftModelForSequenceClassification and PeftModel onto --model) to the same logits."""
    import torch
    from peft import AutoPeftModelForSequenceClassification, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import glue

    model, data = sources
    out = tmp_path / "models"
    assert glue.main(glue_args(model, data, tmp_path, "--method", "rac_lora", "--epochs_per_chain", "2",
                               "--gradient_accumulation_steps", "2", "--output_dir", out)) == 0
    (row,), _ = _recorded(tmp_path)
    (folder,) = out.iterdir()
    assert folder.name == f"sst2-rac_lora-seed0-{row['config_hash']}" and row["merges"] == 1
    tok = AutoTokenizer.from_pretrained(folder / "merged")
    batch = tok(["good film", "bad film today"], padding=True, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(folder / "merged").eval()
    assert not (folder / "base").exists() and (folder / "adapter" / "tokenizer_config.json").exists()
    linked = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(model),
                                       folder / "adapter").eval()
    auto = AutoPeftModelForSequenceClassification.from_pretrained(folder / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(linked(**batch).logits, merged(**batch).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(auto(**batch).logits, merged(**batch).logits, rtol=0, atol=1e-5)


def test_fp16_without_a_gpu_is_one_line(sources, tmp_path, capsys):
    model, data = sources
    assert_refused(capsys, tmp_path, glue_args(model, data, tmp_path, "--fp16", "--device", "cpu"),
                   "fp16 needs a CUDA GPU")
