"""glue.py (issue 14): the paper's Table 2 protocol on a Hugging Face model, run end to end on a tiny random
RoBERTa and a tiny dataset in GLUE's own layout, both written here (no network); GLUE's file formats,
metrics, resume and one-line errors."""
from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import assert_one_line_error

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
GOOD = ["good", "great", "fine", "nice", "superb", "lovely"]
BAD = ["bad", "awful", "poor", "dull", "weak", "ugly"]
FILLER = ["the", "film", "was", "a", "story", "of", "and", "plot", "it", "really", "quite", "very"]
MAX_LENGTH = 24


def _sentence(rng, words):
    out = [rng.choice(FILLER) for _ in range(rng.randint(3, 7))]
    for w in rng.sample(words, 2):
        out.insert(rng.randrange(len(out) + 1), w)
    return " ".join(out)


def write_glue(root: Path, n_train=64, n_dev=32, seed=0) -> Path:
    """SST-2 (sentence, 0/1), RTE (sentence pairs, text labels) and STS-B (pairs, a 0-5 score) in GLUE's
    layout: the label follows the sentiment words, so the tasks can be learnt."""
    rng = random.Random(seed)
    for split, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        for folder, header, row in (
            ("SST-2", ["sentence", "label"], lambda y: [_sentence(rng, GOOD if y else BAD), str(y)]),
            ("RTE", ["index", "sentence1", "sentence2", "label"],
             lambda y: [str(rng.randint(0, 999)), _sentence(rng, GOOD), _sentence(rng, GOOD if y == 0 else BAD),
                        "entailment" if y == 0 else "not_entailment"]),
            ("STS-B", ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                       "sentence2", "score"],
             lambda y: ["0", "main", "f", "2012", "0", "s", "s", _sentence(rng, GOOD), _sentence(rng, GOOD if y else BAD),
                        f"{4.5 if y else 0.5:.1f}"]),
        ):
            (root / folder).mkdir(parents=True, exist_ok=True)
            with open(root / folder / split, "w", newline="") as f:
                w = csv.writer(f, delimiter="\t", lineterminator="\n")
                w.writerow(header)
                for _ in range(n):
                    w.writerow(row(rng.randint(0, 1)))
    return root


def write_tiny_roberta(folder: Path) -> Path:
    """A random 2-layer RoBERTa of width 32 and a word-level tokenizer, saved as a Hub model folder is."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids: bos 0, pad 1, eos 2
    vocab = {w: i for i, w in enumerate(specials + sorted(set(GOOD + BAD + FILLER)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B:0 </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>",
                                        model_input_names=["input_ids", "attention_mask"])
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=MAX_LENGTH + 4, type_vocab_size=1,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2)
    RobertaModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_sources")
    return write_tiny_roberta(root / "tiny-roberta"), write_glue(root / "glue")


def _glue(args, cwd=ROOT):
    return subprocess.run([sys.executable, "glue.py", *args], cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_glue_py_end_to_end_on_a_tiny_roberta(sources, tmp_path):
    """Table 2's five methods on three tasks (2 chains x 2 epochs, seed 0): every run lands with its dev
    metric per epoch, the merging methods merged after each chain, the trainable counts follow the formula,
    the figures are drawn, and a second invocation trains nothing."""
    import glue
    from engine.results import read_results

    model, data = sources
    args = ["--model", str(model), "--data_dir", str(data), "--tasks", "sst2", "rte", "stsb", "--seeds", "0",
            "--chains", "2", "--epochs_per_chain", "2", "--rank", "2", "--lr", "3e-3", "--fpft_lr", "1e-3",
            "--max_length", str(MAX_LENGTH), "--batch_size", "8", "--warmup_ratio", "0",
            "--results_dir", str(tmp_path / "results"), "--plots_dir", str(tmp_path / "plots"), "--progress", "false"]
    done = _glue(args)
    assert done.returncode == 0, done.stderr[-3000:]
    runs, curves = read_results(tmp_path / "results", "glue_", glue.RUN_COLUMNS, glue.CURVE_COLUMNS)
    assert sorted((r["task"], r["method"]) for r in runs) == sorted(
        (t, m) for t in ("sst2", "rte", "stsb") for m in ("fpft", "lora", "cola", "asymmetric_lora", "rac_lora"))
    hidden, layers, r = 32, 2, 2
    for row in runs:
        assert row["epochs"] == 4 and row["train_examples"] == 64 and row["dev_examples"] == 32
        assert row["merges"] == (2 if row["method"] in ("cola", "rac_lora") else 0)
        labels = 1 if row["task"] == "stsb" else 2
        head = hidden * hidden + hidden + hidden * labels + labels  # RoBERTa's classifier: dense + out_proj
        factors = layers * 2 * r * hidden  # query and value, per factor: r x 32 (A) or 32 x r (B)
        want = {"lora": 2 * factors + head, "cola": 2 * factors + head, "asymmetric_lora": factors + head,
                "rac_lora": factors + head}
        if row["method"] != "fpft":
            assert row["trainable_params"] == want[row["method"]], row["method"]
        mine = [c for c in curves if c["config_hash"] == row["config_hash"]]
        assert [c["epoch"] for c in mine] == [1, 2, 3, 4]
        assert [c["merged"] for c in mine] == ([False, True, False, True] if row["merges"] else [False] * 4)
        assert row["metric"] == ("pearson" if row["task"] == "stsb" else "accuracy")
    fpft = {r["task"]: r for r in runs if r["method"] == "fpft"}
    assert fpft["sst2"]["trainable_params"] > 10 * max(r["trainable_params"] for r in runs if r["method"] != "fpft")
    assert "RAC-LoRA" not in done.stdout or "rac_lora" in done.stdout
    assert "rac_lora" in done.stdout and "sst2 (accuracy)" in done.stdout
    for name in ("glue_dev_metric.png", "glue_dev_by_epoch.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 10_000
    again = _glue(args)
    assert again.returncode == 0 and "0 runs to train, 15 already recorded" in again.stderr + again.stdout


def test_glue_files_are_read_as_glue_writes_them(tmp_path):
    from glue import TASKS, read_tsv

    folder = tmp_path / "MRPC"
    folder.mkdir()
    (folder / "train.tsv").write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                      "1\t1\t2\tHe said \"yes\".\tHe agreed.\n0\t3\t4\tA cat.\tA dog.\n",
                                      encoding="utf-8")
    texts, labels = read_tsv(folder / "train.tsv", TASKS["mrpc"])
    assert texts == [('He said "yes".', "He agreed."), ("A cat.", "A dog.")] and labels == [1, 0]
    cola = tmp_path / "CoLA"
    cola.mkdir()
    (cola / "dev.tsv").write_text("gj04\t1\t\tThe book was read.\ngj04\t0\t*\tBook the read was.\n")
    assert read_tsv(cola / "dev.tsv", TASKS["cola"]) == ([("The book was read.",), ("Book the read was.",)], [1, 0])


@pytest.mark.parametrize("content,needle", [
    ("sentence\tlabel\ngood film\t2\n", "label '2' is not one of 0, 1"),
    ("text\tlabel\ngood film\t1\n", "lacks the column(s) sentence"),
    ("sentence\tlabel\n", "has no examples"),
    ("sentence\tlabel\ngood film\n", "columns, needs 2"),
])
def test_a_bad_glue_file_is_one_line(tmp_path, content, needle):
    from glue import TASKS, GlueError, read_tsv

    (tmp_path / "train.tsv").write_text(content)
    with pytest.raises(GlueError) as e:
        read_tsv(tmp_path / "train.tsv", TASKS["sst2"])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_metrics_match_their_definitions():
    import numpy as np

    from glue import metric

    y = [1, 0, 1, 1, 0, 0, 1, 0]
    p = [1, 0, 0, 1, 0, 1, 1, 0]
    assert metric("accuracy", p, y) == 0.75
    tp, tn, fp, fn = 3, 3, 1, 1
    assert metric("matthews", p, y) == pytest.approx((tp * tn - fp * fn) / np.sqrt(4 * 4 * 4 * 4))
    x = np.array([0.1, 2.0, 3.5, 1.0])
    assert metric("pearson", x, 2 * x + 1) == pytest.approx(1.0)


@pytest.mark.parametrize("extra,needle", [
    (["--tasks", "squad"], "unknown task 'squad'"),
    (["--method", "randlora"], "unknown method 'randlora'"),
    (["--rank", "0"], "rank"),
    (["--model", "/nonexistent/model"], "model '/nonexistent/model' could not be loaded"),
    (["--data_dir", "/nonexistent/glue"], "is missing; --data_dir must hold GLUE's layout"),
    (["--lr", "nan"], "lr must be a finite number"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(sources, tmp_path, extra, needle):
    model, data = sources
    given = {a for a in extra if a.startswith("--")}
    base = {"--model": str(model), "--data_dir": str(data), "--tasks": "sst2"}
    args = [x for k, v in base.items() if k not in given for x in (k, v)]
    args += ["--results_dir", str(tmp_path / "r"), "--plots_dir", str(tmp_path / "p"), *extra]
    done = _glue(args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert_one_line_error(done, needle)
