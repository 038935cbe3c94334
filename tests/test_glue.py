"""glue.py (issue 14): the paper's Table 2 protocol on a Hugging Face model, run end to end on a tiny random
RoBERTa and a tiny dataset in GLUE's own layout, both written here (no network); GLUE's file formats,
metrics, resume and one-line errors."""
from __future__ import annotations

import csv
import random
import re
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
    """SST-2 (sentence, 0/1), RTE (sentence pairs, text labels), MRPC (pairs, 0/1 first, GLUE's own header) and
    STS-B (pairs, a 0-5 score) in GLUE's layout: the label follows the sentiment words, so the tasks can be learnt."""
    rng = random.Random(seed)
    mrpc = random.Random(seed + 1)  # MRPC's own stream: the other tasks' files are as they were before it came
    for split, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        for folder, header, row, stream in (
            ("SST-2", ["sentence", "label"], lambda y: [_sentence(rng, GOOD if y else BAD), str(y)], rng),
            ("RTE", ["index", "sentence1", "sentence2", "label"],
             lambda y: [str(rng.randint(0, 999)), _sentence(rng, GOOD), _sentence(rng, GOOD if y == 0 else BAD),
                        "entailment" if y == 0 else "not_entailment"], rng),
            ("STS-B", ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                       "sentence2", "score"],
             lambda y: ["0", "main", "f", "2012", "0", "s", "s", _sentence(rng, GOOD), _sentence(rng, GOOD if y else BAD),
                        f"{4.5 if y else 0.5:.1f}"], rng),
            ("MRPC", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             lambda y: [str(y), str(mrpc.randint(0, 999)), str(mrpc.randint(0, 999)), _sentence(mrpc, GOOD),
                        _sentence(mrpc, GOOD if y else BAD)], mrpc),
        ):
            (root / folder).mkdir(parents=True, exist_ok=True)
            with open(root / folder / split, "w", newline="") as f:
                w = csv.writer(f, delimiter="\t", lineterminator="\n")
                w.writerow(header)
                for _ in range(n):
                    w.writerow(row(stream.randint(0, 1)))
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
    """Table 2's five methods on two tasks (2 chains x 2 epochs, seed 0; a classification and the regression: SST-2's
    accuracy alone adds nothing MRPC's does not check): every run lands with its dev
    metric per epoch, and MRPC's runs with F1 beside accuracy, STS-B's with Spearman beside Pearson (issue 21),
    the merging methods merged after each chain, the trainable counts follow the formula, the figures are drawn,
    and a second invocation trains nothing."""
    import glue
    from engine.results import read_results

    model, data = sources
    args = ["--model", str(model), "--data_dir", str(data), "--tasks", "mrpc", "stsb", "--seeds", "0",
            "--chains", "2", "--epochs_per_chain", "2", "--rank", "2", "--lr", "3e-3", "--fpft_lr", "1e-3",
            "--max_length", str(MAX_LENGTH), "--batch_size", "8", "--warmup_ratio", "0",
            "--results_dir", str(tmp_path / "results"), "--plots_dir", str(tmp_path / "plots"), "--progress", "false"]
    done = _glue(args)
    assert done.returncode == 0, done.stderr[-3000:]
    runs, curves = read_results(tmp_path / "results", "glue_", glue.RUN_COLUMNS, glue.CURVE_COLUMNS)
    assert sorted((r["task"], r["method"]) for r in runs) == sorted(
        (t, m) for t in ("mrpc", "stsb") for m in ("fpft", "lora", "cola", "asymmetric_lora", "rac_lora"))
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
        extra = {"mrpc": "f1", "stsb": "spearman"}.get(row["task"])  # the task's extra metric, and no other
        for m in glue.EXTRA_METRICS:
            if m == extra:
                assert all(-1 <= c[f"dev_{m}"] <= 1 for c in mine) and row[f"final_{m}"] == mine[-1][f"dev_{m}"]
            else:
                assert row[f"final_{m}"] is None and all(c[f"dev_{m}"] is None for c in mine)
    fpft = {r["task"]: r for r in runs if r["method"] == "fpft"}
    assert fpft["mrpc"]["trainable_params"] > 10 * max(r["trainable_params"] for r in runs if r["method"] != "fpft")
    assert "RAC-LoRA" not in done.stdout or "rac_lora" in done.stdout
    assert all(f"{t} ({m})" in done.stdout for t, m in (("mrpc", "accuracy"), ("mrpc", "f1"),
                                                         ("stsb", "pearson"), ("stsb", "spearman")))
    assert "rac_lora" in done.stdout
    for name in ("glue_dev_metric.png", "glue_dev_by_epoch.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 10_000
    again = _glue(args)
    assert again.returncode == 0 and "0 runs to train, 10 already recorded" in again.stderr + again.stdout


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


def _pearson(a, b):
    """Pearson's r by its definition, in plain Python."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5


def _ranks(values):
    """1-based ranks, tied values sharing the mean of their positions (Spearman's convention)."""
    order = sorted(values)
    return [sum(i + 1 for i, v in enumerate(order) if v == x) / order.count(x) for x in values]


def test_metrics_match_an_independent_computation():
    """glue.py's dev metrics (scikit-learn's and scipy's) against hand counts and definitions on fixed arrays:
    accuracy and F1 from TP/FP/FN/TN counted here, Matthews from its formula, Pearson from its definition,
    Spearman as Pearson of the ranks (ties share their mean rank); a constant input correlates 0.0 (not nan), no
    positive class gives F1 0.0, one predicted class Matthews 0.0; every metric a task names is one of METRICS."""
    import glue
    from glue import metric

    y = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    p = [1, 0, 0, 1, 0, 1, 1, 0, 1, 0]
    tp = sum(a == 1 and b == 1 for a, b in zip(p, y))
    fp = sum(a == 1 and b == 0 for a, b in zip(p, y))
    fn = sum(a == 0 and b == 1 for a, b in zip(p, y))
    tn = sum(a == 0 and b == 0 for a, b in zip(p, y))
    assert (tp, fp, fn, tn) == (4, 1, 2, 3)
    assert metric("accuracy", p, y) == pytest.approx((tp + tn) / len(y)) == pytest.approx(0.7)
    assert metric("f1", p, y) == pytest.approx(2 * tp / (2 * tp + fp + fn)) == pytest.approx(8 / 11)
    assert metric("matthews", p, y) == pytest.approx(
        (tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5) == pytest.approx(10 / 600 ** 0.5)
    scores = [0.1, 2.0, 3.5, 1.0, 2.0, 4.8, 0.4]  # a tie at 2.0
    gold = [0.3, 1.0, 4.0, 0.5, 1.5, 3.9, 0.5]  # a tie at 0.5
    assert metric("pearson", scores, gold) == pytest.approx(_pearson(scores, gold), abs=1e-12)
    assert metric("spearman", scores, gold) == pytest.approx(_pearson(_ranks(scores), _ranks(gold)), abs=1e-12)
    assert _ranks(scores) == [1, 4.5, 6, 3, 4.5, 7, 2]
    assert metric("pearson", scores, [2 * x + 1 for x in scores]) == pytest.approx(1.0)
    assert metric("spearman", scores, [x ** 3 for x in scores]) == pytest.approx(1.0)  # monotone: ranks agree
    assert metric("pearson", [2.5] * 4, [0.0, 1.0, 2.0, 3.0]) == metric("spearman", [2.5] * 4, [0, 1, 2, 3]) == 0.0
    assert metric("f1", [0, 0, 0], [0, 0, 0]) == 0.0 and metric("matthews", [1, 1, 1], [0, 1, 0]) == 0.0
    named = {m for t in glue.TASKS.values() for m in (t.metric, *t.extra)}
    assert named == set(glue.METRICS) and glue.EXTRA_METRICS == ("f1", "spearman")
    with pytest.raises(ValueError, match="unknown metric 'auc'; allowed: accuracy, f1"):
        metric("auc", p, y)


def test_plots_only_reads_results_recorded_before_the_extra_metrics(tmp_path, capsys):
    """Issue 21: F1 (MRPC) and Spearman (STS-B) are columns that glue_runs.csv and glue_curves.csv did not have.
    A results folder written before them (no such columns; every row with its row_check) still reads: --plots_only
    shows the table ("-" for the metrics its runs lack) and draws the figures, changing no results file; a run
    recorded later rewrites the files with the new columns, and the old rows read as they did."""
    import json

    import glue
    from engine.results import read_results, upsert_runs, write_rows
    from engine.settings import from_argv

    results, plots_dir = tmp_path / "results", tmp_path / "p"
    args = ["--tasks", "mrpc", "stsb", "--method", "lora", "--seeds", "0", "1", "--device", "cpu",
            "--results_dir", str(results), "--plots_dir", str(plots_dir), "--progress", "false"]
    cfg = from_argv(args, glue.GlueConfig, prog="glue.py")
    added = {f"{kind}_{m}" for m in glue.EXTRA_METRICS for kind in ("final", "dev")}

    def run(task, seed, **extra):
        key = glue.run_hash(cfg, "cpu", task, "lora", seed)
        row = dict(task=task, method="lora", seed=seed, status="finished", metric=glue.TASKS[task].metric,
                   final_dev=0.7 + 0.1 * seed, best_dev=0.7 + 0.1 * seed, best_epoch=2, epochs=2, merges=0,
                   trainable_params=1378, train_examples=64, dev_examples=32, wall_s=1.0, config_hash=key,
                   settings_hash=glue.glue_settings_hash(cfg, "cpu", "lora"), git_commit="before", device="cpu",
                   config=json.dumps(cfg.to_dict()), **{f"final_{m}": v for m, v in extra.items()})
        curve = [dict(config_hash=key, task=task, method="lora", seed=seed, epoch=e, train_loss=0.5, dev_loss=0.4,
                      dev_metric=row["final_dev"] - 0.1 * (2 - e), merged=False,
                      **{f"dev_{m}": v for m, v in extra.items()}) for e in (1, 2)]
        return row, curve

    old = [run(t, s) for t in ("mrpc", "stsb") for s in (0, 1)]
    write_rows(results / "glue_runs.csv", [r for r, _ in old],
               {k: v for k, v in glue.RUN_COLUMNS.items() if k not in added})  # the columns before issue 21
    write_rows(results / "glue_curves.csv", [c for _, cs in old for c in cs],
               {k: v for k, v in glue.CURVE_COLUMNS.items() if k not in added})
    assert not added & set((results / "glue_runs.csv").read_text().splitlines()[0].split(","))
    before = {p.name: p.read_bytes() for p in results.glob("glue_*")}
    assert glue.main(["--plots_only", *args]) == 0
    out = capsys.readouterr().out
    header, _, line = [re.split(r"  +", l.strip()) for l in out.strip().splitlines()[:3]]
    assert header == ["method", "mrpc (accuracy)", "mrpc (f1)", "stsb (pearson)", "stsb (spearman)", "trainable",
                      "merges"]
    assert line == ["lora", "75.00 ± 7.07 (2)", "-", "75.00 ± 7.07 (2)", "-", "1378", "0"]
    assert {p.name for p in plots_dir.iterdir()} == {"glue_dev_metric.png", "glue_dev_by_epoch.png"}
    assert {p.name: p.read_bytes() for p in results.glob("glue_*")} == before  # --plots_only wrote no results file
    new_row, new_curve = run("mrpc", 2, f1=0.9)
    upsert_runs(results, [new_row], new_curve, glue.PREFIX, glue.RUN_COLUMNS, glue.CURVE_COLUMNS)
    runs, curves = read_results(results, glue.PREFIX, glue.RUN_COLUMNS, glue.CURVE_COLUMNS)
    assert len(runs) == 5 and len(curves) == 10 and "final_f1" in (results / "glue_runs.csv").read_text()
    assert sorted((r["seed"], r["final_f1"]) for r in runs if r["task"] == "mrpc") == [(0, None), (1, None), (2, 0.9)]
    assert "90.00 (1)" in glue.summary(runs)


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
