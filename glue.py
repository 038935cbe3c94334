"""The paper's Table 2 protocol on Hugging Face models: `python glue.py [--field value ...]` (see --help).

A sequence classifier (RoBERTa-base by default) on GLUE tasks: full fine-tuning against LoRA, COLA,
Asymmetric LoRA and RAC-LoRA (and LoRA+, COLA+), the LoRA methods through PEFT's layers driven by
peft_chain's controller and Trainer callback. The merging methods train ``chains`` links of
``epochs_per_chain`` epochs with a merge after each; the others the same number of epochs in one piece.
Tasks x methods x seeds through the shared runner (engine/runner.py): resume, results/glue_runs.csv and
glue_curves.csv (every epoch's dev metrics: Table 2's, and F1 for MRPC and QQP, Spearman for STS-B, as GLUE
reports them; scikit-learn's and scipy's), plots/glue_*.png, a summary table (each dev metric, mean ± std over
seeds).

Model and data come from the Hub when the machine has network (``--model roberta-base``, the Hub's
nyu-mll/glue through the `datasets` package), or from local folders: ``--model /path`` (a folder written
by save_pretrained, with its tokenizer) and ``--data_dir /path`` in GLUE's own file layout
(<data_dir>/SST-2/train.tsv, dev.tsv, ...).

Nothing trains on bad input (check_sources, one line, exit 2): the model must build from its config (on the
meta device), its weights files open, its tokenizer have a vocabulary, every task's data read and check, and
max_length, target_modules and rank fit the model. A run whose training loss becomes nan or inf stops there
and is recorded as diverged (its completed epochs, no result), counted apart in the table.
"""
from __future__ import annotations

import codecs
import copy
import csv
import io
import json
import logging
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar
from engine.settings import StudyConfig, arg, from_argv, override, settings_hash, stable_hash
from engine.cli import run_command
from engine.results import RECORD_COLUMNS, Index, format_table, git_commit, group, mean_std, seeds_cell, split_diverged
from engine.runner import report, resolve_device, run_study as run, Study
from plots import draw_glue
from raclora.errors import DIVERGED, ConfigError, Diverged, check_loss
from raclora.factors import RANDOM_INITS, ROLES
from raclora.files import prepare_output_dir
from raclora.methods import METHODS, display_order, methods_reading
from raclora.peft_chain import ChainCallback, ChainController, ChainError, lora_layers, lora_methods

@dataclass(frozen=True)
class GlueTask:
    folder: str  # GLUE's own folder name
    text: tuple  # the text column(s): header names, or column numbers for a file without a header (CoLA)
    label: str | int  # the label column
    labels: tuple | None  # the label values in the Hub's order (index = class id); None: a regression score
    metric: str  # the paper's Table 2 dev metric (METRICS): accuracy, matthews (CoLA) or pearson (STS-B)
    hub_text: tuple  # the Hub's (nyu-mll/glue) text fields
    dev: str = "dev.tsv"
    hub_dev: str = "validation"
    header: bool = True
    extra: tuple = ()  # the further dev metrics GLUE reports beside it: f1 (MRPC, QQP), spearman (STS-B)

    @property
    def num_labels(self) -> int:
        """The classifier's outputs: one per label, or one score for a regression task (STS-B)."""
        return 1 if self.labels is None else len(self.labels)


TASKS = {
    "cola": GlueTask("CoLA", (3,), 1, ("0", "1"), "matthews", ("sentence",), header=False),
    "sst2": GlueTask("SST-2", ("sentence",), "label", ("0", "1"), "accuracy", ("sentence",)),
    "mrpc": GlueTask("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), "accuracy", ("sentence1", "sentence2"),
                     extra=("f1",)),
    "qqp": GlueTask("QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), "accuracy",
                    ("question1", "question2"), extra=("f1",)),
    "stsb": GlueTask("STS-B", ("sentence1", "sentence2"), "score", None, "pearson", ("sentence1", "sentence2"),
                     extra=("spearman",)),
    "mnli": GlueTask("MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
                     "accuracy", ("premise", "hypothesis"), dev="dev_matched.tsv", hub_dev="validation_matched"),
    "qnli": GlueTask("QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), "accuracy",
                     ("question", "sentence")),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), "accuracy",
                    ("sentence1", "sentence2")),
}
# the extra metrics' columns, derived from the tasks: dev_<m> in the curves (every epoch's), final_<m> in the runs
# (the last epoch's); empty for a task that does not report m, and missing from rows recorded before they existed
EXTRA_METRICS = tuple(dict.fromkeys(m for t in TASKS.values() for m in t.extra))  # ("f1", "spearman")
RUN_COLUMNS = {"task": str, "method": str, "seed": int, "status": str, "metric": str, "final_dev": float,
               "best_dev": float, "best_epoch": int, "epochs": int, "merges": int, "diverged_step": int,
               "trainable_params": int, "train_examples": int, "dev_examples": int,
               **{f"final_{m}": float for m in EXTRA_METRICS}, **RECORD_COLUMNS}
CURVE_COLUMNS = {"config_hash": str, "task": str, "method": str, "seed": int, "epoch": Index("epochs"),
                 "train_loss": float, "dev_loss": float, "dev_metric": float, "merged": bool,
                 **{f"dev_{m}": float for m in EXTRA_METRICS}}
PREFIX = "glue_"


# full fine-tuning and the registry's methods on LoRA's two factors that merge by epochs (a chain of links)
GLUE_METHODS = ("fpft", *lora_methods())  # relora merges by steps (ChainCallback(merge_every_steps=...))
GLUE_TABLE2 = ("fpft", "lora", "cola", "asymmetric_lora", "rac_lora")  # --method all: the paper's Table 2
GLUE_SCHEDULES = ("linear", "constant", "cosine")
ADAPTER = {"kind": ("adapter",)}  # what only the LoRA methods read: full fine-tuning ignores it


def glue_method_choices() -> tuple[str, ...]:
    return (*GLUE_METHODS, "all")


@dataclass
class GlueConfig(StudyConfig):
    """Settings of ``python glue.py``: a Hugging Face sequence classifier (RoBERTa-base by default) on GLUE
    tasks, full fine-tuning against the LoRA methods through PEFT and peft_chain, as the paper's Table 2."""
    # --- what to run ---
    method: str = arg("all", "fpft | lora | cola | asymmetric_lora | rac_lora | lora_plus | cola_plus | relora | all "
                      "(Table 2's five)", choices=glue_method_choices, hash=False)
    tasks: list[str] = arg(["mrpc", "rte", "stsb", "cola", "sst2", "qnli"], "GLUE tasks", choices=tuple(TASKS),
                           item="task", hash=False)
    # --- the protocol: merging methods train `chains` links of `epochs_per_chain` epochs; the others as many epochs in one piece ---
    chains: int = arg(10, "links of the chain (a merge after each) for cola, rac_lora, cola_plus", range=(1, 10_000))
    epochs_per_chain: int = arg(10, "epochs of each link", range=(1, 10_000))
    # --- model and data ---
    model: str = arg("roberta-base", "a Hub name (needs network) or a local folder saved by save_pretrained")
    data_dir: str = override(StudyConfig, "data_dir", "", help="GLUE's own layout (<data_dir>/SST-2/train.tsv ...); "
                             "empty: the Hub's nyu-mll/glue (needs `datasets` and network)")
    max_length: int = arg(128, "tokens per example (longer ones are truncated)", range=(2, 1_000_000))
    max_train_examples: int = arg(0, "use only the first n training examples of each task (0: all)",
                                  range=(0, 10 ** 9))
    # --- adapters (PEFT LoraConfig) ---
    sketch: str = arg("left", "left: lora_B random, lora_A trained; right: lora_A random, lora_B trained",
                      choices=tuple(ROLES), only=ADAPTER)
    rank: int = arg(8, "LoRA rank r", range=(1, 65536), only=ADAPTER)
    lora_alpha: float = arg(16.0, "PEFT's scaling is lora_alpha / r", positive=True, only=ADAPTER)
    lora_dropout: float = arg(0.0, "dropout on the LoRA branch's input", only=ADAPTER)
    random_init: str = arg("gaussian", "init of the random factor: gaussian = N(0, 1); kaiming = nn.Linear's default",
                           choices=RANDOM_INITS, only=ADAPTER)
    target_modules: list[str] = arg(["query", "value"], "PEFT target_modules", only=ADAPTER)
    # --- optimisation (transformers.Trainer) ---
    lr: float = override(StudyConfig, "lr", 4e-4, help="learning rate of the LoRA methods", only=ADAPTER)
    fpft_lr: float = arg(2e-5, "learning rate of full fine-tuning", positive=True, only={"kind": ("fpft",)})
    loraplus_ratio: float = arg(16.0, "lora_plus, cola_plus: lora_B learns at this x lr", positive=True,
                                only={"method": methods_reading("loraplus_ratio")})
    relora_every: int = arg(200, "relora: optimizer steps between merges (each also resets AdamW's moments)",
                            range=(1, 10 ** 9), only={"method": methods_reading("relora_every")})
    relora_warmup: int = arg(20, "relora: steps of linear learning-rate warm-up at the start and after each merge "
                             "(its schedule replaces --schedule and --warmup_ratio)", range=(1, 10 ** 9),
                             only={"method": methods_reading("relora_warmup")})
    batch_size: int = override(StudyConfig, "batch_size", 16)
    weight_decay: float = override(StudyConfig, "weight_decay", 0.0)
    warmup_ratio: float = arg(0.06, "fraction of the steps with a linear warm-up (Trainer's warmup_steps as a ratio)")
    schedule: str = arg("linear", "learning-rate schedule after the warm-up: linear | constant | cosine",
                        choices=GLUE_SCHEDULES)
    gradient_accumulation_steps: int = arg(1, "batches whose gradients add up to one optimizer step (Trainer's); "
                                           "the step's batch is batch_size x this", range=(1, 65536))
    bf16: bool = arg(False, "train in bfloat16 mixed precision (Trainer's bf16; CPU or GPU)")
    fp16: bool = arg(False, "train in float16 mixed precision (Trainer's fp16; needs a CUDA GPU)")
    output_dir: str = arg("", "keep each run's final model here: <output_dir>/<task>-<method>-seed<seed>-<hash>/ "
                          "with merged/ (every link merged: AutoModelFor...from_pretrained) and, for the LoRA "
                          "methods, adapter/ (the chain's save: AutoPeftModelFor...from_pretrained, or "
                          "PeftModel.from_pretrained on --model); empty: not kept", hash=False)

    workers = 1  # not settings: one run at a time (a transformer uses every core, or the GPU)
    stack_size = 1
    executor = "local"  # in this process (Ray's tasks are for the stacked studies)
    RUN_KEYS = {"kind": "adapter", "method": None}  # a run is full fine-tuning or a LoRA method's
    HASHED_CONTEXT = ("method",)
    ADDED_LATER = {"gradient_accumulation_steps": 1, "bf16": False, "fp16": False}  # (StudyConfig.ADDED_LATER)
    # {task: load_task(...)}: every task's data as check_setup read it, which the trainer reuses ({} until then)
    tasks_read: ClassVar[dict] = {}

    def check(self) -> None:
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks must name one or more distinct GLUE tasks ({', '.join(TASKS)}), "
                              f"got {self.tasks}")
        if not self.model:
            raise ConfigError("model must name a Hub model or a local folder, got ''")
        if not self.target_modules or any(not t for t in self.target_modules):
            raise ConfigError(f"target_modules must name one or more module names, got {self.target_modules}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are both true; give at most one mixed precision")
        if self.fp16 and not self.plots_only and resolve_device(self.device).type != "cuda":
            raise ConfigError("fp16 needs a CUDA GPU (Trainer's float16 mixed precision); on this device use --bf16")

    def check_setup(self) -> None:
        """Everything a run reads must be there and fit the settings (check_sources): one line if not. The
        tasks' data read for it is kept in ``tasks_read``. With --plots_only nothing but the results folder is
        read: not the model (which may be a Hub name: no network) nor the data."""
        if not self.plots_only:
            self.tasks_read = check_sources(self)
            if self.output_dir:
                prepare_output_dir("output_dir", self.output_dir)

    def uses_adapters(self) -> bool:
        """Whether a LoRA method is selected (full fine-tuning ignores rank and target_modules)."""
        return any(m != "fpft" for m in self.selected_methods())

    def sizes(self) -> tuple[int, int, int]:
        """(parameters, activation floats of one step, 0) of the model (model_sizes, on the meta device)."""
        return model_sizes(self)

    def runs_per_stack(self) -> int:
        return 1

    def selected_methods(self) -> list[str]:
        return list(GLUE_TABLE2) if self.method == "all" else [self.method]

    def epochs(self) -> int:
        return self.chains * self.epochs_per_chain


def glue_settings_hash(cfg: GlueConfig, device: str, method: str) -> str:
    """Hash of every field that changes a GLUE run of ``method``, apart from its task and seed."""
    return settings_hash(cfg, device, kind="fpft" if method == "fpft" else "adapter", method=method)


class GlueError(RuntimeError):
    """Missing or unreadable model or data; the message is one line."""


# --- data ------------------------------------------------------------------------------------------------
def read_tsv(path: Path, task: GlueTask) -> tuple[list[tuple[str, ...]], list]:
    """(texts, labels) of one GLUE .tsv file; GlueError (one line) for a missing file or a bad row."""
    if not path.is_file():
        raise GlueError(f"{path} is missing; --data_dir must hold GLUE's layout (<data_dir>/{task.folder}/train.tsv, "
                        f"{task.dev})")
    texts, labels = [], []
    rows = csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    wanted = (*task.text, task.label)
    if task.header:
        header = next(rows, [])
        missing = [c for c in wanted if c not in header]
        if missing:
            raise GlueError(f"{path}: the header lacks the column(s) {', '.join(map(str, missing))}")
        cols = [header.index(c) for c in wanted]
    else:
        cols = list(wanted)
    for n, row in enumerate(rows, start=2 if task.header else 1):
        try:
            *text, label = (row[c] for c in cols)
        except IndexError:
            raise GlueError(f"{path}, line {n}: {len(row)} columns, needs {max(cols) + 1}") from None
        texts.append(tuple(text))
        labels.append(_label(label, task, f"{path}, line {n}"))
    if not texts:
        raise GlueError(f"{path} has no examples")
    return texts, labels


def read_text(path: Path) -> str:
    """The text of a UTF-8 file, a leading byte-order mark skipped (GLUE's MRPC files have one); GlueError (one
    line) for a file that cannot be read or is not UTF-8, naming the line and byte offset of the first bad byte."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GlueError(f"{path} cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        at = e.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
        line = data.count(b"\n", 0, at) + 1
        raise GlueError(f"{path}, line {line}: byte {data[at]:#04x} at offset {at} is not "
                        f"UTF-8 ({e.reason}); GLUE's files are UTF-8: re-save it as UTF-8") from None


def _label(value, task: GlueTask, where: str):
    if task.labels is None:
        try:
            score = float(value)
        except ValueError:
            raise GlueError(f"{where}: score {value!r} is not a number") from None
        if not math.isfinite(score):
            raise GlueError(f"{where}: score {value!r} is not finite")
        return score
    value = str(value).strip()
    if value not in task.labels:
        raise GlueError(f"{where}: label {value!r} is not one of {', '.join(task.labels)}")
    return task.labels.index(value)


def load_task(cfg, name: str) -> dict[str, tuple[list, list]]:
    """{"train": (texts, labels), "dev": (texts, labels)} of GLUE task ``name``."""
    task = TASKS[name]
    if cfg.data_dir:
        root = Path(cfg.data_dir) / task.folder
        out = {"train": read_tsv(root / "train.tsv", task), "dev": read_tsv(root / task.dev, task)}
    else:
        out = _load_hub(name, task)
    if cfg.max_train_examples:
        texts, labels = out["train"]
        out["train"] = (texts[:cfg.max_train_examples], labels[:cfg.max_train_examples])
    return out


def _load_hub(name: str, task: GlueTask) -> dict:
    try:
        import datasets
    except ImportError:
        raise GlueError("--data_dir is empty, and reading GLUE from the Hub needs the `datasets` package "
                        "(pip install datasets) and network; or give --data_dir in GLUE's own layout") from None
    try:
        ds = datasets.load_dataset("nyu-mll/glue", name)
    except Exception as e:  # noqa: BLE001 (no network, or the Hub's answer: one line either way)
        raise GlueError(f"GLUE task {name} could not be read from the Hub ({_why(e)}); give --data_dir in "
                        f"GLUE's own layout") from None
    return {split: ([tuple(r[c] for c in task.hub_text) for r in ds[key]], [r["label"] for r in ds[key]])
            for split, key in (("train", "train"), ("dev", task.hub_dev))}


class Encoded:
    """A task split, tokenized: a torch Dataset of {input_ids, attention_mask, labels} for Trainer."""

    def __init__(self, tokenizer, texts: list[tuple[str, ...]], labels: list, max_length: int):
        columns = list(zip(*texts))
        self.enc = tokenizer(*columns, truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


# --- metrics: scikit-learn's and scipy's, as GLUE reports them -------------------------------------------
# (imported on first use: scikit-learn and scipy.stats take a second to import, which --help, --plots_only and the
# setup checks do not need)
def _sklearn(name: str, **kwargs):
    """sklearn.metrics.<name> of (labels, predictions)."""
    def score(labels, predictions) -> float:
        import sklearn.metrics

        return getattr(sklearn.metrics, name)(labels, predictions, **kwargs)
    return score


def _correlation(name: str):
    """scipy.stats.<name> correlation of (labels, predictions); 0.0 when either is constant (a regressor that
    collapsed to one value correlates with nothing; scipy says nan, which the store would take for a run that
    never finished)."""
    def score(labels, predictions) -> float:
        import numpy as np
        import scipy.stats

        if np.ptp(labels) == 0 or np.ptp(predictions) == 0:
            return 0.0
        return getattr(scipy.stats, name)(predictions, labels).statistic
    return score


# name -> the function of (labels, predictions): the tasks' metric and extra names (GlueTask) are these
METRICS = {"accuracy": _sklearn("accuracy_score"),
           "f1": _sklearn("f1_score", zero_division=0.0),  # of class 1: MRPC's paraphrase, QQP's duplicate
           "matthews": _sklearn("matthews_corrcoef"),  # CoLA; 0.0 when undefined (one class predicted)
           "pearson": _correlation("pearsonr"),  # STS-B
           "spearman": _correlation("spearmanr")}  # STS-B: Pearson of the ranks (ties: their mean rank)


def metric(name: str, predictions, labels) -> float:
    """The dev metric ``name`` (METRICS) of ``predictions`` (class ids, or STS-B's scores) against ``labels``."""
    import numpy as np

    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; allowed: {', '.join(METRICS)}")
    return float(METRICS[name](np.asarray(labels), np.asarray(predictions)))


# --- checks before any compute ---------------------------------------------------------------------------
def check_sources(cfg) -> dict[str, dict]:
    """Everything a run reads, checked before any compute, then the settings against the model: its config (it
    must build a classifier, on the meta device), its weight files (a saved head must fit every task's labels),
    its tokenizer (its vocabulary must fit the model's) and every task's data, read here; then max_length against its positions, and target_modules and rank against
    its Linear layers (LoRA methods only). ConfigError (one line); returns {task: load_task(cfg, task)}."""
    try:
        config = _auto_config(cfg)
        model = meta_model(cfg, config)
        check_heads(cfg, config, check_weights(cfg.model))
        check_tokenizer(cfg.model, config)
        data = {name: load_task(cfg, name) for name in cfg.tasks}
        check_max_length(cfg, config, model)
        if cfg.uses_adapters():
            check_targets(cfg, config)
        return data
    except GlueError as e:
        raise ConfigError(str(e)) from None


def _why(e: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _quiet_libraries() -> None:
    """A failed load is our one line, not the libraries' warnings too; and not bitsandbytes' note (peft imports
    it) that its 4-bit CPU kernels are missing, which nothing here uses."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hub_logging.set_verbosity_error()
    hf_logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _auto_config(cfg):
    from transformers import AutoConfig

    _quiet_libraries()
    try:
        return AutoConfig.from_pretrained(cfg.model)
    except Exception as e:  # noqa: BLE001
        where = "a folder with config.json" if Path(cfg.model).exists() or "/" in cfg.model else "a Hub model name"
        raise GlueError(f"model {cfg.model!r} could not be loaded as {where} ({_why(e)})") from None


def meta_model(cfg, config, num_labels: int | None = None):
    """The sequence classifier that ``config`` describes (with ``num_labels`` outputs, if given), built on the
    meta device: no memory, no weights read. GlueError (one line) when the config cannot build one."""
    import torch
    from transformers import AutoModelForSequenceClassification

    if num_labels is not None:
        config = copy.deepcopy(config)
        config.num_labels = num_labels
    try:
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)
    except Exception as e:  # noqa: BLE001 (RuntimeError: a negative size; ValueError: heads that do not divide)
        raise GlueError(f"model {cfg.model!r}: its config cannot build a sequence classifier ({_why(e)}); "
                        f"fix its config.json") from None


def check_weights(model: str) -> dict[str, list[int]]:
    """A local model folder must hold its weights, and each safetensors file must open: safetensors reads its
    header and checks that the tensors' byte ranges cover the file exactly (a truncated or damaged file fails).
    GlueError (one line) naming the file. Returns {tensor name: shape} of its safetensors files ({} for a Hub
    model, whose files are checked as they download)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    folder = Path(model)
    if not folder.is_dir():
        return {}
    names = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    if not any((folder / n).is_file() for n in names):
        raise GlueError(f"model {model!r} has no weights: the folder needs one of {', '.join(names)} "
                        f"(save_pretrained writes them)")
    from safetensors import safe_open

    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt", device="cpu") as f:
                shapes.update({k: list(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as e:  # noqa: BLE001 (SafetensorError for a bad header, OSError for an unreadable file)
            raise GlueError(f"model {model!r}: its weights file {path} is damaged ({_why(e)}); "
                            f"save the model again (save_pretrained)") from None
    return shapes


def check_heads(cfg, config, saved: dict[str, list[int]]) -> None:
    """Every tensor a local model folder saved (``saved``: check_weights's shapes) must have the shape the
    classifier of each task needs: a head saved for a task with another number of labels (2 for SST-2, then
    STS-B's 1) is a GlueError in one line, before any run (from_pretrained would raise a size mismatch in the
    middle of the sweep)."""
    if not saved:
        return
    for name in cfg.tasks:
        num_labels = TASKS[name].num_labels
        for key, p in meta_model(cfg, config, num_labels).state_dict().items():
            if key in saved and saved[key] != list(p.shape):
                raise GlueError(f"model {cfg.model!r}: its saved {key} has shape {saved[key]}, and task {name} "
                                f"({num_labels} label{'s' if num_labels > 1 else ''}) needs {list(p.shape)} (a head "
                                f"saved for another task); give the model without its head, or one for this task")


def check_tokenizer(model: str, config=None) -> None:
    """The model's tokenizer must load and have a vocabulary beyond its special tokens: from a folder without
    the tokenizer's files transformers still makes one, of the special tokens alone, which encodes every
    sentence to the same ids; and no more tokens than the model's embedding has rows (``config.vocab_size``):
    a larger id indexes past it. GlueError (one line)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 (transformers raises OSError, ValueError, ... for a bad model)
        raise GlueError(f"model {model!r}: no tokenizer could be loaded ({_why(e)})") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise GlueError(f"model {model!r}: its tokenizer has only its {len(tokenizer)} special tokens "
                        f"({' '.join(tokenizer.all_special_tokens)}) and no vocabulary (the tokenizer's files are "
                        f"missing); save the model's tokenizer with it (tokenizer.save_pretrained)")
    rows = getattr(config, "vocab_size", None)
    if rows is not None and len(tokenizer) > rows:
        raise GlueError(f"model {model!r}: its tokenizer has {len(tokenizer)} tokens and its embedding {rows} rows "
                        f"(vocab_size): ids past {rows - 1} have no embedding; give the tokenizer the model was "
                        f"trained with")


def max_positions(config, model) -> tuple[int, int] | None:
    """(the longest input the model's position embeddings take, the offset taken off max_position_embeddings):
    the RoBERTa family's position ids start after the padding index (embeddings with
    create_position_ids_from_input_ids), so they take max_position_embeddings - pad_token_id - 1 tokens; other
    models max_position_embeddings. None when the config has no max_position_embeddings."""
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int):
        return None
    for m in model.modules():
        if hasattr(m, "create_position_ids_from_input_ids") and isinstance(getattr(m, "padding_idx", None), int):
            return n - m.padding_idx - 1, m.padding_idx + 1
    return n, 0


def check_max_length(cfg, config, model) -> None:
    """max_length must fit the model's position embeddings (max_positions). GlueError (one line)."""
    limit = max_positions(config, model)
    if limit is not None and cfg.max_length > limit[0]:
        top, offset = limit
        rule = (f"max_position_embeddings {top + offset} less pad_token_id + 1 = {offset}, where its position ids "
                f"start" if offset else "its max_position_embeddings")
        raise GlueError(f"max_length {cfg.max_length} is more than model {cfg.model!r} takes ({rule}); "
                        f"allowed: --max_length from 2 to {top}")


def lora_config(cfg, method: str | None = None):
    """The PEFT LoraConfig of every LoRA run (the controller draws the factors: init_lora_weights=False), with
    DoRA's layers (use_dora) for a DoRA ``method``."""
    from peft import LoraConfig

    dora = method is not None and METHODS[method].adapter == "dora"
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules),
                      lora_dropout=cfg.lora_dropout, task_type="SEQ_CLS", init_lora_weights=False, use_dora=dora)


def check_targets(cfg, config) -> None:
    """target_modules must select Linear layers that the controller drives, as PEFT matches them, and rank
    must not exceed the smallest min(in_features, out_features) among them: PEFT wraps the classifier built on
    the meta device (for each head size the tasks need) as a run does. GlueError (one line)."""
    from peft import get_peft_model
    from torch import nn

    for num_labels in sorted({TASKS[t].num_labels for t in cfg.tasks}):
        model = meta_model(cfg, config, num_labels)
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        try:
            with warnings.catch_warnings():  # a dry build: the run's own build shows PEFT's warnings
                warnings.simplefilter("ignore")
                layers = lora_layers(get_peft_model(model, lora_config(cfg)), "default")
        except ChainError as e:
            raise GlueError(str(e)) from None
        except Exception:  # noqa: BLE001 (PEFT: NoMatchingPeftModuleError, ValueError for a layer it cannot wrap)
            layers = []
        if not layers:
            raise GlueError(f"target_modules {' '.join(cfg.target_modules)} select no Linear layer of model "
                            f"{cfg.model!r}; allowed: names of its Linear layers: {', '.join(linears)}")
        name, layer = min(layers, key=lambda nl: min(nl[1].in_features, nl[1].out_features))
        top = min(layer.in_features, layer.out_features)
        if cfg.rank > top:
            raise GlueError(f"rank {cfg.rank} is more than min(in, out) = {top} of the targeted layer "
                            f"{name.removeprefix('base_model.model.')} ({layer.in_features} -> "
                            f"{layer.out_features}); allowed: --rank from 1 to {top}")


def model_sizes(cfg) -> tuple[int, int, int]:
    """(parameters, activation floats of one training step, 0): the model built on the meta device."""
    try:
        config = _auto_config(cfg)
        model = meta_model(cfg, config)
    except GlueError:
        return 0, 0, 0  # check_sources says why
    params = sum(p.numel() for p in model.parameters())
    hidden = getattr(config, "hidden_size", 0)
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 1)
    tokens = cfg.batch_size * cfg.max_length
    activations = layers * (tokens * hidden * 16 + cfg.batch_size * heads * cfg.max_length ** 2 * 2)
    return params, activations, 0


# --- the study -------------------------------------------------------------------------------------------
def plan(cfg) -> list[dict]:
    return [dict(task=t, method=m, seed=s) for t in cfg.tasks for m in cfg.selected_methods() for s in cfg.seeds]


def run_hash(cfg, device: str, task: str, method: str, seed: int) -> str:
    return stable_hash([glue_settings_hash(cfg, device, method), task, method, seed])


class GlueTrainer:
    """Trains GLUE runs (what the runner's trainer is): one Trainer per task x method x seed."""

    def __init__(self, cfg, commit: str, show_epochs: bool = True):
        from transformers.utils import logging as hf_logging


        self.cfg, self.commit, self.show_epochs = cfg, commit, show_epochs
        self.device = resolve_device(cfg.device)
        self.encoded: dict[str, tuple[Encoded, Encoded]] = {}  # task -> (train, dev), tokenized once
        self.tokenizer = None
        hf_logging.set_verbosity_error()  # not the loading report (a new classifier head is expected)
        if not (cfg.progress and show_epochs):
            hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # PEFT on transformers 5

    def task_data(self, name: str) -> tuple[Encoded, Encoded]:
        """Task ``name``'s (train, dev) sets, tokenized on first use, the same for every run: the data that
        check_setup read (taken out of cfg.tasks_read, so that it is not held twice), else read now."""
        if name not in self.encoded:
            from transformers import AutoTokenizer

            if self.tokenizer is None:
                self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model)
            data = self.cfg.tasks_read.pop(name, None) or load_task(self.cfg, name)
            self.encoded[name] = tuple(Encoded(self.tokenizer, *data[split], self.cfg.max_length)
                                       for split in ("train", "dev"))
        return self.encoded[name]

    def run(self, specs: list[dict]) -> list[tuple[dict, list[dict]]]:
        return [self.one(spec) for spec in specs]

    def build(self, spec: dict, train_examples: int):
        """(model, chain controller or None, Trainer's optimizers, callbacks) of run ``spec``, its weights
        loaded; the classifier head drawn from the run's seed (set before). ReLoRA merges every relora_every
        optimizer steps, under its own jagged schedule over the run's steps (``train_examples`` per epoch)."""
        from peft import get_peft_model
        from transformers import AutoModelForSequenceClassification

        task, method = TASKS[spec["task"]], spec["method"]
        model = AutoModelForSequenceClassification.from_pretrained(self.cfg.model, num_labels=task.num_labels)
        if method == "fpft":
            return model, None, (None, None), []
        model = get_peft_model(model, lora_config(self.cfg, method))
        chain = ChainController(model, method, self.cfg.sketch, self.cfg.random_init, seed=spec["seed"])
        cfg = self.cfg
        optimizer = chain.optimizer(cfg.lr, cfg.weight_decay, cfg.loraplus_ratio)
        if chain.method.step_merges:
            steps = math.ceil(math.ceil(train_examples / cfg.batch_size) / cfg.gradient_accumulation_steps) \
                * cfg.epochs()  # optimizer steps, as Trainer counts them
            schedule = chain.scheduler(optimizer, steps, cfg.relora_every, cfg.relora_warmup)
            return model, chain, (optimizer, schedule), [ChainCallback(chain, merge_every_steps=cfg.relora_every)]
        callbacks = [ChainCallback(chain, merge_every_epochs=cfg.epochs_per_chain)] if chain.method.merges else []
        return model, chain, (optimizer, None), callbacks

    def one(self, spec: dict) -> tuple[dict, list[dict]]:
        """Train run ``spec``: (its runs row, its curve rows). A run whose training loss becomes nan or inf
        stops at that step, before the step is taken (Diverged), and is recorded as DIVERGED: the curve rows of
        the epochs it completed, its diverged_step, and no result (final_dev, best_dev, best_epoch empty)."""
        import torch
        from transformers import DataCollatorWithPadding, PrinterCallback, TrainingArguments, set_seed

        cfg, task, method, seed = self.cfg, TASKS[spec["task"]], spec["method"], spec["seed"]
        train, dev = self.task_data(spec["task"])
        t0 = time.perf_counter()
        set_seed(seed)  # the classifier head's init, Trainer's batch order, dropout
        model, chain, optimizers, callbacks = self.build(spec, len(train))

        def compute(p):
            logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
            preds = logits[:, 0] if task.labels is None else logits.argmax(-1)
            return {"dev_metric": metric(task.metric, preds, p.label_ids),
                    **{f"dev_{m}": metric(m, preds, p.label_ids) for m in task.extra}}

        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(
                output_dir=out, num_train_epochs=cfg.epochs(), per_device_train_batch_size=cfg.batch_size,
                per_device_eval_batch_size=cfg.batch_size, learning_rate=cfg.fpft_lr if method == "fpft" else cfg.lr,
                weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.schedule,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps, bf16=cfg.bf16, fp16=cfg.fp16,
                eval_strategy="epoch", logging_strategy="epoch", save_strategy="no", report_to=[], seed=seed,
                data_seed=seed, use_cpu=self.device.type == "cpu", disable_tqdm=not (cfg.progress and self.show_epochs))
            trainer = checked_trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                                      data_collator=DataCollatorWithPadding(self.tokenizer), compute_metrics=compute,
                                      optimizers=optimizers, callbacks=callbacks)
            trainer.remove_callback(PrinterCallback)  # the table and the CSVs say it; progress bars stay
            try:
                trainer.train()
                diverged_step = None
            except Diverged as e:  # (only its step is kept: its traceback would hold the run's tensors)
                diverged_step = e.step
                print(f"{spec['task']} {method} seed {seed}: diverged ({e}); recorded as diverged")
        wall = time.perf_counter() - t0
        key = run_hash(cfg, self.device.type, **spec)
        if cfg.output_dir and diverged_step is None:
            keep_model(Path(cfg.output_dir) / f"{spec['task']}-{method}-seed{seed}-{key}", trainer, chain,
                       self.tokenizer)
        curve = curve_rows(trainer.state.log_history, callbacks[0].merge_epochs if callbacks else [], key, spec)
        finished = diverged_step is None  # a diverged run has no result: counted, left out of the means
        best = max(curve, key=lambda c: c["dev_metric"]) if finished else {}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row = dict(**spec, status="finished" if finished else DIVERGED, metric=task.metric,
                   final_dev=curve[-1]["dev_metric"] if finished else None, best_dev=best.get("dev_metric"),
                   **{f"final_{m}": curve[-1][f"dev_{m}"] if finished else None for m in EXTRA_METRICS},
                   best_epoch=best.get("epoch"), epochs=len(curve), merges=chain.merges if chain else 0,
                   diverged_step=diverged_step, trainable_params=trainable, train_examples=len(train),
                   dev_examples=len(dev), wall_s=round(wall, 3), config_hash=key,
                   settings_hash=glue_settings_hash(cfg, self.device.type, method), git_commit=self.commit,
                   device=self.device.type, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   config=json.dumps(cfg.to_dict(), sort_keys=True))
        del model, trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return row, curve


def keep_model(folder: Path, trainer, chain, tokenizer) -> None:
    """A finished run's final model in ``folder``: for a LoRA method chain.save's forms (merged/: every link
    merged; adapter/: the chain's own save, whose adapter_config.json names the base it loads onto), for full
    fine-tuning merged/ alone (Trainer.save_model); the tokenizer beside each model."""
    if chain is not None:
        paths = chain.save(folder)
    else:
        trainer.save_model(str(folder / "merged"))
        paths = {"merged": folder / "merged"}
    for path in paths.values():
        tokenizer.save_pretrained(path)


def checked_trainer(**kwargs):
    """A transformers Trainer that raises Diverged (raclora.errors.check_loss) when a step's training loss or
    its gradient norm is nan or inf: after the step's backward pass, before its optimizer step (step counted
    from 1). The gradient too: Trainer clips the norm to max_grad_norm, and an inf norm clips every gradient to
    zero (``--lora_alpha 1e30``: the loss stays at ln 2 and the run would be recorded as finished, unlearned)."""
    import torch
    from transformers import Trainer

    class CheckedTrainer(Trainer):
        def training_step(self, model, *args, **kw):
            loss = super().training_step(model, *args, **kw)
            step = self.state.global_step + 1
            check_loss(loss, step)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads:
                check_loss(torch.nn.utils.get_total_norm(grads), step, "gradient norm")
            return loss

    return CheckedTrainer(**kwargs)


def curve_rows(log_history: list[dict], merge_epochs, key: str, spec: dict) -> list[dict]:
    """One curve row per evaluated (completed) epoch of a Trainer's log_history: its training loss, dev loss
    and metric, whether a merge closed it, and the task's extra metrics (None for those it does not report)."""
    merged = {round(e) for e in merge_epochs}
    losses = {round(h["epoch"]): h["loss"] for h in log_history if "loss" in h}
    return [dict(config_hash=key, **spec, epoch=round(h["epoch"]), train_loss=losses.get(round(h["epoch"])),
                 dev_loss=h["eval_loss"], dev_metric=h["eval_dev_metric"], merged=round(h["epoch"]) in merged,
                 **{f"dev_{m}": h.get(f"eval_dev_{m}") for m in EXTRA_METRICS})
            for h in log_history if "eval_dev_metric" in h]


def run_study(cfg, commit: str) -> list[dict]:
    from tqdm.auto import tqdm


    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    tqdm.write(f"device: {device}; model {cfg.model}; {len(cfg.tasks)} task(s) x "
               f"{len(cfg.selected_methods())} method(s) x {len(cfg.seeds)} seed(s); "
               f"{cfg.chains} chains x {cfg.epochs_per_chain} epochs")
    study = Study(plan=plan(cfg), run_hash=lambda spec: run_hash(cfg, device.type, **spec),
                  stack_key=lambda spec: tuple(spec.values()), make_trainer=GlueTrainer, code=__name__,
                  trainer_args=(cfg, commit), trainer=GlueTrainer(cfg, commit), prefix=PREFIX,
                  run_columns=RUN_COLUMNS, curve_columns=CURVE_COLUMNS)
    rows = run(study, cfg, device)
    tqdm.write(f"study finished in {time.perf_counter() - t0:.1f} s")
    return rows


def summary(rows: list[dict]) -> str:
    """One line per method: each task's dev metric and then its extra metrics (x100, the last epoch's) as mean ±
    std over the seeds that finished and recorded it, and how many seeds ("(3)"; diverged runs are counted apart and
    left out: "(2 +1 diverged)"; rows recorded before a metric existed lack it: "-")."""
    tasks = sorted({r["task"] for r in rows}, key=lambda t: list(TASKS).index(t))
    columns = [(t, name, column) for t in tasks for name, column in
               ((TASKS[t].metric, "final_dev"), *((m, f"final_{m}") for m in TASKS[t].extra))]
    by = group(rows, ("method", "task"))
    header = ["method", *[f"{t} ({name})" for t, name, _ in columns], "trainable", "merges"]
    lines = []
    for method in sorted({r["method"] for r in rows}, key=lambda m: (display_order(m), m)):
        cells = []
        for t, _, column in columns:
            rs = by.get((method, t), [])
            if not rs:
                cells.append("-")
                continue
            ok, diverged = split_diverged(rs)
            ok = [r for r in ok if r.get(column) is not None]
            m, s = mean_std([100 * r[column] for r in ok])
            value = "-" if math.isnan(m) else f"{m:.2f}" + ("" if math.isnan(s) else f" ± {s:.2f}")
            cells.append(f"{value} ({seeds_cell(ok, diverged)})" if ok or diverged else value)
        mine = [r for r in rows if r["method"] == method]
        any_row = (split_diverged(mine)[0] or mine)[0]  # a diverged run may have stopped before its merges
        lines.append([method, *cells, str(any_row["trainable_params"]), str(any_row["merges"])])
    return format_table(header, lines)


def main(argv: list[str] | None = None) -> int:

    def parse():
        return from_argv(argv, GlueConfig, prog="glue.py",
                         description="The paper's Table 2 protocol (GLUE) on a Hugging Face model. "
                                     "Every field can be overridden.")

    return run_command(parse, study, lambda cfg: Path(cfg.results_dir) / f"{PREFIX}runs.csv")


def study(cfg) -> None:

    try:
        rows = None if cfg.plots_only else run_study(cfg, git_commit())
    except GlueError as e:
        raise ConfigError(str(e)) from None
    device = resolve_device(cfg.device).type
    wanted = {glue_settings_hash(cfg, device, m) for m in GLUE_METHODS}
    report(cfg, rows, wanted, summary, draw, RUN_COLUMNS, CURVE_COLUMNS, PREFIX)


def draw(runs: list[dict], curves: list[dict], plots_dir, prefix: str) -> list:
    """draw_glue of the runs that finished, named ``prefix``...: a diverged run has no result (the summary table
    counts it)."""
    finished = split_diverged(runs)[0]
    return draw_glue(finished, curves, plots_dir, prefix) if finished else []


if __name__ == "__main__":
    sys.exit(main())
