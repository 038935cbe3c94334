"""The paper's Table 2 protocol on Hugging Face models: `python glue.py [--field value ...]` (see --help).

A sequence classifier (RoBERTa-base by default) on GLUE tasks: full fine-tuning against LoRA, COLA,
Asymmetric LoRA and RAC-LoRA (and LoRA+, COLA+), the LoRA methods through PEFT's layers driven by
peft_chain's controller and Trainer callback. The merging methods train ``chains`` links of
``epochs_per_chain`` epochs with a merge after each; the others the same number of epochs in one piece.
Tasks x methods x seeds through the shared runner (engine/runner.py): resume, results/glue_runs.csv and
glue_curves.csv (every epoch's dev metrics), plots/glue_*.png, a summary table (dev metric, mean ± std over
seeds).

Model and data come from the Hub when the machine has network (``--model roberta-base``, the Hub's
nyu-mll/glue through the `datasets` package), or from local folders: ``--model /path`` (a folder written
by save_pretrained, with its tokenizer) and ``--data_dir /path`` in GLUE's own file layout
(<data_dir>/SST-2/train.tsv, dev.tsv, ...).
"""
from __future__ import annotations

import csv
import json
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from engine.settings import StudyConfig, arg, from_argv, override, settings_hash, stable_hash
from engine.cli import run_command
from engine.results import RECORD_COLUMNS, format_table, git_commit, group, mean_std
from engine.runner import report, resolve_device, run_study as run, Study
from plots import draw_glue
from raclora.errors import ConfigError
from raclora.factors import RANDOM_INITS, ROLES
from raclora.methods import METHODS
from raclora.peft_chain import ChainCallback, ChainController, lora_methods

RUN_COLUMNS = {"task": str, "method": str, "seed": int, "status": str, "metric": str, "final_dev": float,
               "best_dev": float, "best_epoch": int, "epochs": int, "merges": int, "trainable_params": int,
               "train_examples": int, "dev_examples": int, **RECORD_COLUMNS}
CURVE_COLUMNS = {"config_hash": str, "task": str, "method": str, "seed": int, "epoch": int, "train_loss": float,
                 "dev_loss": float, "dev_metric": float, "merged": bool}
PREFIX = "glue_"


@dataclass(frozen=True)
class GlueTask:
    folder: str  # GLUE's own folder name
    text: tuple  # the text column(s): header names, or column numbers for a file without a header (CoLA)
    label: str | int  # the label column
    labels: tuple | None  # the label values in the Hub's order (index = class id); None: a regression score
    metric: str  # the paper's (and GLUE's usual) dev metric: accuracy, matthews or pearson
    hub_text: tuple  # the Hub's (nyu-mll/glue) text fields
    dev: str = "dev.tsv"
    hub_dev: str = "validation"
    header: bool = True


TASKS = {
    "cola": GlueTask("CoLA", (3,), 1, ("0", "1"), "matthews", ("sentence",), header=False),
    "sst2": GlueTask("SST-2", ("sentence",), "label", ("0", "1"), "accuracy", ("sentence",)),
    "mrpc": GlueTask("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), "accuracy", ("sentence1", "sentence2")),
    "qqp": GlueTask("QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), "accuracy",
                    ("question1", "question2")),
    "stsb": GlueTask("STS-B", ("sentence1", "sentence2"), "score", None, "pearson", ("sentence1", "sentence2")),
    "mnli": GlueTask("MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
                     "accuracy", ("premise", "hypothesis"), dev="dev_matched.tsv", hub_dev="validation_matched"),
    "qnli": GlueTask("QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), "accuracy",
                     ("question", "sentence")),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), "accuracy",
                    ("sentence1", "sentence2")),
}


# full fine-tuning and the registry's methods on LoRA's two factors that merge by epochs (a chain of links)
GLUE_METHODS = ("fpft", *(m for m in lora_methods() if not METHODS[m].step_merges))
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
    method: str = arg("all", "fpft | lora | cola | asymmetric_lora | rac_lora | lora_plus | cola_plus | all (Table "
                      "2's five)", choices=glue_method_choices, hash=False)
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
                                only={"method": tuple(m.name for m in METHODS.values()
                                                      if "loraplus_ratio" in m.settings)})
    batch_size: int = override(StudyConfig, "batch_size", 16)
    weight_decay: float = override(StudyConfig, "weight_decay", 0.0)
    warmup_ratio: float = arg(0.06, "fraction of the steps with a linear warm-up (Trainer's warmup_steps as a ratio)")
    schedule: str = arg("linear", "learning-rate schedule after the warm-up: linear | constant | cosine",
                        choices=GLUE_SCHEDULES)

    workers = 1  # not settings: one run at a time (a transformer uses every core, or the GPU)
    stack_size = 1
    RUN_KEYS = {"kind": "adapter", "method": None}  # a run is full fine-tuning or a LoRA method's
    HASHED_CONTEXT = ("method",)

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

    def check_setup(self) -> None:
        """The model's config and the data must be there (check_sources): one line if not."""
        check_sources(self)

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
    with open(path, newline="", encoding="utf-8-sig") as f:  # (GLUE's MRPC files start with a byte-order mark)
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
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
        raise GlueError(f"GLUE task {name} could not be read from the Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); give --data_dir") from None
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


# --- metrics ---------------------------------------------------------------------------------------------
def metric(name: str, predictions, labels) -> float:
    """accuracy; Matthews correlation (CoLA); Pearson correlation (STS-B)."""
    import numpy as np

    p, y = np.asarray(predictions, dtype=float), np.asarray(labels, dtype=float)
    if name == "accuracy":
        return float((p == y).mean())
    if name == "pearson":
        if p.std() == 0 or y.std() == 0:
            return 0.0
        return float(np.corrcoef(p, y)[0, 1])
    if name == "matthews":
        tp, tn = float(((p == 1) & (y == 1)).sum()), float(((p == 0) & (y == 0)).sum())
        fp, fn = float(((p == 1) & (y == 0)).sum()), float(((p == 0) & (y == 1)).sum())
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return (tp * tn - fp * fn) / den if den > 0 else 0.0
    raise ValueError(f"unknown metric {name!r}; allowed: accuracy, matthews, pearson")


# --- checks before any compute ---------------------------------------------------------------------------
def check_sources(cfg) -> None:
    """The model's config, its tokenizer and every task's data must be readable: ConfigError (one line)."""
    try:
        _auto_config(cfg)
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(cfg.model)
    except GlueError as e:
        raise ConfigError(str(e)) from None
    except Exception as e:  # noqa: BLE001 (transformers raises OSError, ValueError, ... for a bad model)
        raise ConfigError(f"model {cfg.model!r}: no tokenizer could be loaded ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})") from None
    if cfg.data_dir:
        for name in cfg.tasks:
            for split in ("train.tsv", TASKS[name].dev):
                path = Path(cfg.data_dir) / TASKS[name].folder / split
                if not path.is_file():
                    raise ConfigError(f"{path} is missing; --data_dir must hold GLUE's layout "
                                      f"(<data_dir>/{TASKS[name].folder}/train.tsv, {TASKS[name].dev})")


def _auto_config(cfg):
    from huggingface_hub.utils import logging as hub_logging
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hub_logging.set_verbosity_error()  # a failed download is our one line, not the libraries' warnings too
    hf_logging.set_verbosity_error()
    try:
        return AutoConfig.from_pretrained(cfg.model)
    except Exception as e:  # noqa: BLE001
        where = "a folder with config.json" if Path(cfg.model).exists() or "/" in cfg.model else "a Hub model name"
        raise GlueError(f"model {cfg.model!r} could not be loaded as {where} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None


def model_sizes(cfg) -> tuple[int, int, int]:
    """(parameters, activation floats of one training step, 0): the model built on the meta device."""
    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        config = _auto_config(cfg)
    except GlueError:
        return 0, 0, 0  # check_sources says why
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
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
        """Task ``name``'s (train, dev) sets, read and tokenized on first use, the same for every run."""
        if name not in self.encoded:
            from transformers import AutoTokenizer

            if self.tokenizer is None:
                self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model)
            data = load_task(self.cfg, name)
            self.encoded[name] = tuple(Encoded(self.tokenizer, *data[split], self.cfg.max_length)
                                       for split in ("train", "dev"))
        return self.encoded[name]

    def run(self, specs: list[dict]) -> list[tuple[dict, list[dict]]]:
        return [self.one(spec) for spec in specs]

    def one(self, spec: dict) -> tuple[dict, list[dict]]:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, PrinterCallback,
                                  Trainer, TrainingArguments, set_seed)


        cfg, task, method, seed = self.cfg, TASKS[spec["task"]], spec["method"], spec["seed"]
        train, dev = self.task_data(spec["task"])
        t0 = time.perf_counter()
        set_seed(seed)  # the classifier head's init, Trainer's batch order, dropout
        num_labels = 1 if task.labels is None else len(task.labels)
        model = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=num_labels)
        callbacks, optimizers, chain = [], (None, None), None
        if method != "fpft":
            model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha,
                                                     target_modules=list(cfg.target_modules),
                                                     lora_dropout=cfg.lora_dropout, task_type="SEQ_CLS",
                                                     init_lora_weights=False))
            chain = ChainController(model, method, cfg.sketch, cfg.random_init, seed=seed)
            optimizers = (chain.optimizer(cfg.lr, cfg.weight_decay, cfg.loraplus_ratio), None)
            if chain.method.merges:
                callbacks.append(ChainCallback(chain, merge_every_epochs=cfg.epochs_per_chain))

        def compute(p):
            logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
            preds = logits[:, 0] if task.labels is None else logits.argmax(-1)
            return {"dev_metric": metric(task.metric, preds, p.label_ids)}

        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(
                output_dir=out, num_train_epochs=cfg.epochs(), per_device_train_batch_size=cfg.batch_size,
                per_device_eval_batch_size=cfg.batch_size, learning_rate=cfg.fpft_lr if method == "fpft" else cfg.lr,
                weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.schedule,
                eval_strategy="epoch", logging_strategy="epoch", save_strategy="no", report_to=[], seed=seed,
                data_seed=seed, use_cpu=self.device.type == "cpu", disable_tqdm=not (cfg.progress and self.show_epochs))
            trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                              data_collator=DataCollatorWithPadding(self.tokenizer), compute_metrics=compute,
                              optimizers=optimizers, callbacks=callbacks)
            trainer.remove_callback(PrinterCallback)  # the table and the CSVs say it; progress bars stay
            trainer.train()
        wall = time.perf_counter() - t0
        merge_epochs = {round(e) for e in (callbacks[0].merge_epochs if callbacks else [])}
        losses = {round(h["epoch"]): h["loss"] for h in trainer.state.log_history if "loss" in h}
        evals = [h for h in trainer.state.log_history if "eval_dev_metric" in h]
        key = run_hash(cfg, self.device.type, **spec)
        curve = [dict(config_hash=key, **spec, epoch=round(h["epoch"]), train_loss=losses.get(round(h["epoch"])),
                      dev_loss=h["eval_loss"], dev_metric=h["eval_dev_metric"],
                      merged=round(h["epoch"]) in merge_epochs) for h in evals]
        best = max(curve, key=lambda c: c["dev_metric"])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row = dict(**spec, status="finished", metric=task.metric, final_dev=curve[-1]["dev_metric"],
                   best_dev=best["dev_metric"], best_epoch=best["epoch"], epochs=len(curve),
                   merges=chain.merges if chain else 0, trainable_params=trainable, train_examples=len(train),
                   dev_examples=len(dev), wall_s=round(wall, 3), config_hash=key,
                   settings_hash=glue_settings_hash(cfg, self.device.type, method), git_commit=self.commit,
                   device=self.device.type, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   config=json.dumps(cfg.to_dict(), sort_keys=True))
        del model, trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return row, curve


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
    """One line per method: each task's dev metric (x100, the last epoch's) as mean ± std over seeds."""
    tasks = sorted({r["task"] for r in rows}, key=lambda t: list(TASKS).index(t))
    order = ["fpft", "lora", "cola", "asymmetric_lora", "rac_lora", "lora_plus", "cola_plus"]
    by = group(rows, ("method", "task"))
    header = ["method", *[f"{t} ({TASKS[t].metric})" for t in tasks], "trainable", "merges"]
    lines = []
    for method in sorted({r["method"] for r in rows}, key=order.index):
        cells = []
        for t in tasks:
            rs = by.get((method, t), [])
            if not rs:
                cells.append("-")
                continue
            m, s = mean_std([100 * r["final_dev"] for r in rs])
            cells.append(f"{m:.2f}" + ("" if math.isnan(s) else f" ± {s:.2f}") + f" ({len(rs)})")
        any_row = next(r for r in rows if r["method"] == method)
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
    report(cfg, rows, wanted, summary, draw_glue, RUN_COLUMNS, CURVE_COLUMNS, PREFIX)


if __name__ == "__main__":
    sys.exit(main())
