"""Every setting of the experiment, in one typed dataclass.

Edit the defaults here, or override any field on the command line as ``--field value``
(lists take several values: ``--ranks 1 2 4``). Importing this module does nothing else:
no seeding, no I/O, no printing.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import re
from dataclasses import dataclass, field

from methods import METHODS as _REGISTRY  # the registry's names (methods.py imports no torch)

# Names the sweep accepts: the method registry of methods.py, the one list of names.
METHODS = tuple(_REGISTRY)
METHOD_CHOICES = METHODS + ("all",)
MODELS = ("mlp", "vit")  # models.py's registry
TARGET_PRESETS = ("all", "attention", "mlp")  # models.TARGET_PRESETS
SKETCHES = ("left", "right")
SKETCH_CHOICES = SKETCHES + ("both",)
SCALINGS = ("alpha", "alpha/r", "alpha/sqrt(r)")
RANDOM_INITS = ("gaussian", "kaiming")  # the non-zero factor; the other one always starts at zero
DEVICES = ("auto", "cpu", "cuda", "mps")
MAX_SEED = 2 ** 63 - 1  # torch.Generator.manual_seed takes a 64-bit integer; seeds are 0..2^63-1
MAX_WORKERS = 256
MAX_WIDTH = 2 ** 20  # a hidden width above this is a typo: one such layer alone would need gigabytes
# Upper limits of the integer settings: far above any sensible run, low enough that a typo
# (an extra zero or ten) is caught before it allocates or loops for ever.
INT_RANGES = {"batch_size": (1, 65536), "max_epochs": (1, 100_000), "patience": (1, 100_000),
              "merge_every": (1, 100_000), "relora_every": (1, 10 ** 9), "relora_warmup": (1, 10 ** 9),
              "stack_size": (1, 1024), "lte_heads": (1, 1024), "lte_every": (1, 10 ** 9),
              "galore_every": (1, 10 ** 9), "val_size": (1, 10 ** 9),
              "split_seed": (0, MAX_SEED), "base_seed": (0, MAX_SEED), "vit_patch": (1, 28), "vit_dim": (1, 4096),
              "vit_depth": (1, 64), "vit_heads": (1, 256), "vit_mlp_dim": (1, 16384), "clients": (1, 10 ** 6),
              "rounds": (1, 100_000), "local_epochs": (1, 10_000), "chains": (1, 10_000),
              "epochs_per_chain": (1, 10_000), "max_length": (2, 1_000_000), "max_train_examples": (0, 10 ** 9),
              "rank": (1, 65536)}


class ConfigError(ValueError):
    """A setting that is out of range or of the wrong kind; the message says what is allowed, on one line
    (a line break inside a quoted value is shown escaped)."""

    def __str__(self) -> str:
        return one_line(super().__str__())


def one_line(text: str) -> str:
    """``text`` with every non-printable character (line breaks among them) written as its escape, so
    that it prints as one line."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


# Named protocols: each sets these fields, unless the command line sets them as well.
PRESETS = {
    "none": {},
    # the paper's Table 2 (RoBERTa on GLUE): the merging methods train 10 chains of 10 epochs (a merge after
    # each), LoRA the same 100 epochs in one piece (it never merges); every run trains all its epochs
    "table2": {"merge_every": 10, "max_epochs": 100, "patience": 100},
}


@dataclass
class Config:
    # --- what to run ---
    method: str = "rac_lora"  # a method of the registry in methods.py (the error for a wrong one lists them), or all
    sketch: str = "left"  # left: B random, A zero+trained ("(Zero, Gaussian)"); right: A random, B trained; both
    ranks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # adapter ranks to sweep
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one run per seed for each method x rank
    run_fpft: bool = True  # also train the full fine-tuning reference (one run per seed)
    preset: str = "none"  # none | table2: the paper's Table 2 protocol (10 chains x 10 epochs; see PRESETS)
    # --- adapters ---
    merge_every: int = 1  # epochs between merges, for the methods that merge (cola, rac_lora)
    scaling: str = "alpha"  # scale of B@A: "alpha" (published code), "alpha/r" (LoRA), "alpha/sqrt(r)" (rsLoRA)
    lora_alpha: float = 1.0  # alpha in the scaling rule above
    random_init: str = "gaussian"  # init of the non-zero factor: gaussian = N(0, 1); kaiming = nn.Linear's default
    reset_optimizer_on_merge: bool = False  # clear AdamW's moments at each merge (published code: no)
    loraplus_ratio: float = 16.0  # lora_plus, cola_plus: learning rate of B / learning rate of A (LoRA+)
    relora_every: int = 200  # relora: optimizer steps between merges (each also resets AdamW's moments)
    relora_warmup: int = 20  # relora: steps of linear learning-rate warm-up at the start and after each merge
    # --- optimisation (base model, FPFT and adapters alike) ---
    lr: float = 2e-4  # AdamW learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    batch_size: int = 128  # examples per step
    max_epochs: int = 50  # upper limit on epochs per run
    patience: int = 10  # early stopping: epochs without a lower validation loss before stopping
    dropout: float = 0.1  # dropout probability after each hidden layer
    # --- the model (models.py's registry) and which of its Linear layers get adapters ---
    model: str = "mlp"  # mlp: the paper's MLP; vit: a small Vision Transformer
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # mlp: hidden widths of the (28*28)-...-5 MLP
    vit_patch: int = 7  # vit: side of the square patches (it divides 28: 16 patches of 7x7)
    vit_dim: int = 32  # vit: token width
    vit_depth: int = 2  # vit: transformer blocks
    vit_heads: int = 2  # vit: attention heads (they divide vit_dim)
    vit_mlp_dim: int = 64  # vit: hidden width of each block's MLP (fc1, fc2)
    target_modules: list[str] = field(default_factory=lambda: ["all"])  # presets all | attention (q k v o) | mlp (fc1 fc2), or layer names as PEFT's target_modules
    # --- data ---
    data_dir: str = "./data"  # torchvision root; the raw files live in <data_dir>/MNIST/raw
    val_size: int = 5000  # images held out of the 60k training set for validation
    split_seed: int = 0  # seed of the train/validation split (the same for every run)
    base_seed: int = 0  # seed of the base model (trained once on digits 0-4, then cached)
    # --- where things go ---
    results_dir: str = "./results"  # runs.csv, curves.csv, checkpoints/
    plots_dir: str = "./plots"  # the three PNG figures
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    stack_size: int = 16  # runs of one method trained at once as one stacked model (1 = one run at a time)
    workers: int = 0  # processes training stacks side by side, each with cores/workers threads; 0 = one per core on CPU, 1 on a GPU
    resume: bool = True  # skip runs already recorded in runs.csv under the same config hash and code fingerprint
    resume_any_code: bool = False  # with resume, also skip runs recorded by other versions of the code (said in one line)
    plots_only: bool = False  # redraw the plots from the CSVs and exit, training nothing
    progress: bool = True  # show tqdm progress bars

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field and what it may be."""
        _choice("method", self.method, METHOD_CHOICES)
        _choice("sketch", self.sketch, SKETCH_CHOICES)
        _choice("scaling", self.scaling, SCALINGS)
        _choice("random_init", self.random_init, RANDOM_INITS)
        _choice("device", self.device, DEVICES)
        _choice("model", self.model, MODELS)
        _choice("preset", self.preset, tuple(PRESETS))
        _check_numbers(self)
        _check_model_settings(self)
        _positive("lr", self.lr)
        _positive("loraplus_ratio", self.loraplus_ratio)
        _positive("lora_alpha", self.lora_alpha)
        _check_workers_and_decay(self.workers, self.weight_decay)

    # --- what a run is made of ---
    def check_setup(self) -> None:
        """The checks that need the data's and the model's sizes (data.check_val_size, models.check_model);
        they import torch, so the command line runs them after parsing, before any compute."""
        from data import check_val_size
        from models import check_model

        check_val_size(self.val_size)
        check_model(self)

    def sizes(self) -> tuple[int, int, int]:
        """(parameters, activation floats of one evaluation pass, image floats) of one run (models.sizes)."""
        from data import DIGITS
        from models import model_settings, sizes

        return sizes(self.model, model_settings(self), DIGITS)

    def targets(self) -> list[str] | None:
        """target_modules for models.targeted (None: every Linear layer)."""
        return None if self.target_modules == ["all"] else list(self.target_modules)


    def runs_per_stack(self) -> int:
        return min(self.stack_size, len(self.ranks) * len(self.seeds))

    def selected_methods(self) -> list[str]:
        return list(METHODS) if self.method == "all" else [self.method]

    def selected_sketches(self) -> list[str]:
        return list(SKETCHES) if self.sketch == "both" else [self.sketch]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- the from-scratch study (scratch.py) ---------------------------------------------------------
FORMS = ("full", "lowrank", "lowrank_ae", "lte", "lora", "galore")
FORM_CHOICES = FORMS + ("all",)
DATASETS = ("mnist", "fashion_mnist")
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class ScratchConfig:
    """Settings of ``python scratch.py``: ten-class MLPs trained from scratch in full or low-rank form."""
    # --- what to run ---
    form: str = "all"  # full | lowrank | lowrank_ae | lte | lora | galore | all
    ranks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])  # rank r of every form but full
    seeds: list[int] = field(default_factory=lambda: [0])  # one run per seed for each form x rank
    dataset: str = "mnist"  # mnist | fashion_mnist (the study trained on fashion_mnist)
    hidden: list[int] = field(default_factory=lambda: [512, 512])  # hidden widths of the (28*28)-...-10 MLP
    # --- optimisation ---
    optimizer: str = "sgd"  # sgd (plain, no momentum: the study) | adamw; galore always runs its own Adam
    lr: float = 1e-3  # learning rate of the optimizer (and of GaLore)
    weight_decay: float = 0.0  # decoupled weight decay (adamw and galore; sgd: L2 added to the gradient)
    batch_size: int = 64  # examples per step
    max_epochs: int = 100  # epochs per run (no early stopping: the study plots every epoch)
    # --- forms ---
    lte_heads: int = 4  # lte: parallel low-rank heads per layer; "lora" is one head of rank lte_heads * r
    lte_every: int = 100  # lte, lora: optimizer steps between merges of the heads into the weights
    galore_every: int = 200  # galore: optimizer steps between recomputations of the projection (SVD)
    galore_scale: float = 0.25  # galore: scale of the projected-back update
    # --- data ---
    data_dir: str = "./data"  # torchvision root: <data_dir>/MNIST/raw, <data_dir>/FashionMNIST/raw
    val_size: int = 5000  # images held out of the 60k training set for validation
    split_seed: int = 0  # seed of the train/validation split (the same for every run)
    # --- where things go ---
    results_dir: str = "./results"  # scratch_runs.csv, scratch_curves.csv
    plots_dir: str = "./plots"  # scratch_<dataset>_<optimizer>_*.png
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    stack_size: int = 16  # runs of one form and rank (seeds) trained at once as one stacked model
    workers: int = 0  # processes training stacks side by side; 0 = one per core on CPU, 1 on a GPU
    resume: bool = True  # skip runs already recorded in scratch_runs.csv under the same config hash and code fingerprint
    resume_any_code: bool = False  # with resume, also skip runs recorded by other versions of the code (said in one line)
    plots_only: bool = False  # redraw the plots from the CSVs and exit, training nothing
    progress: bool = True  # show tqdm progress bars

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _choice("form", self.form, FORM_CHOICES)
        _choice("dataset", self.dataset, DATASETS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("device", self.device, DEVICES)
        _check_numbers(self)
        _check_model_lists(self.hidden, self.ranks, self.seeds)
        for name in ("lr", "galore_scale"):
            _positive(name, getattr(self, name))
        _check_workers_and_decay(self.workers, self.weight_decay)
        if self.batch_size < self.lte_heads:
            raise ConfigError(f"batch_size ({self.batch_size}) must be at least lte_heads ({self.lte_heads}): "
                              f"each head trains on its own shard of every batch")

    def check_setup(self) -> None:
        """The checks that need the data's sizes: val_size, and ranks against the MLP's layers."""
        from data import TEN_CLASSES, check_val_size

        check_val_size(self.val_size)
        top = max_useful_rank([TEN_CLASSES.features, *self.hidden, TEN_CLASSES.classes])
        for r in self.ranks:
            if r > top:
                raise ConfigError(f"rank {r} is out of range: ranks must be integers from 1 to {top} (the largest "
                                  f"min(in, out) among the model's layers)")

    def sizes(self) -> tuple[int, int, int]:
        """(parameters, activation floats of one evaluation pass, image floats) of the full-form MLP."""
        from data import TEN_CLASSES
        from models import sizes

        return sizes("mlp", dict(hidden=self.hidden, dropout=0.0), TEN_CLASSES)

    def runs_per_stack(self) -> int:
        return min(self.stack_size, len(self.seeds))

    def selected_forms(self) -> list[str]:
        return list(FORMS) if self.form == "all" else [self.form]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- the federated study (federated.py) --------------------------------------------------------------
FED_METHODS = ("fedavg", "fedit", "ffa_lora", "flora", "fed_rac_lora")  # fed/methods.py's registry
FED_METHOD_CHOICES = FED_METHODS + ("all",)
PARTITIONS = ("iid", "dirichlet")  # fed/partition.py


@dataclass
class FedConfig:
    """Settings of ``python federated.py``: the suite's base model adapted to digits 5-9 by clients that each
    hold a shard of task B, under a federated method."""
    # --- what to run ---
    method: str = "fed_rac_lora"  # fedavg | fedit | ffa_lora | flora | fed_rac_lora | all
    sketch: str = "left"  # left: B random, A trained; right: A random, B trained; both (the LoRA methods)
    ranks: list[int] = field(default_factory=lambda: [1])  # adapter ranks to sweep
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one run per seed for each method x sketch x rank
    # --- the federation ---
    clients: int = 10  # clients holding task B's training images
    partition: str = "dirichlet"  # iid | dirichlet (label skew)
    dirichlet_alpha: float = 0.5  # dirichlet: concentration; small = few classes per client
    participation: float = 1.0  # fraction of the clients in each round, in (0, 1]
    rounds: int = 50  # server rounds
    local_epochs: int = 1  # epochs of random reshuffling over a client's own shard per round
    lr: float = 1e-3  # clients' AdamW learning rate (a fresh optimizer every round)
    weight_decay: float = 0.01  # clients' AdamW decoupled weight decay
    batch_size: int = 128  # examples per client step
    target_accuracy: float = 0.9  # the summary's rounds and megabytes to reach this test accuracy on digits 5-9
    # --- adapters ---
    scaling: str = "alpha"  # scale of B@A: "alpha", "alpha/r", "alpha/sqrt(r)" (as main.py)
    lora_alpha: float = 1.0  # alpha in the scaling rule above
    random_init: str = "gaussian"  # init of the random factor: gaussian = N(0, 1); kaiming = nn.Linear's default
    target_modules: list[str] = field(default_factory=lambda: ["all"])  # presets all | attention | mlp, or layer names
    # --- the base model: the suite's, trained on digits 0-4 as main.py trains it (and cached alike) ---
    model: str = "mlp"  # mlp | vit
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # mlp: hidden widths
    vit_patch: int = 7  # vit: side of the square patches
    vit_dim: int = 32  # vit: token width
    vit_depth: int = 2  # vit: transformer blocks
    vit_heads: int = 2  # vit: attention heads
    vit_mlp_dim: int = 64  # vit: hidden width of each block's MLP
    dropout: float = 0.1  # dropout probability of the model
    # --- data ---
    data_dir: str = "./data"  # MNIST's raw files live in <data_dir>/MNIST/raw
    val_size: int = 5000  # images held out of the 60k training set for validation (the base model's)
    split_seed: int = 0  # seed of the train/validation split
    base_seed: int = 0  # seed of the base model
    # --- where things go ---
    results_dir: str = "./results"  # fed_runs.csv, fed_curves.csv (and the base model's checkpoint)
    plots_dir: str = "./plots"  # fed_*.png
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    workers: int = 0  # processes training runs side by side; 0 = one per core on CPU, 1 on a GPU
    resume: bool = True  # skip runs already recorded in fed_runs.csv under the same config hash and code fingerprint
    resume_any_code: bool = False  # with resume, also skip runs recorded by other versions of the code
    plots_only: bool = False  # redraw the plots from the CSVs and exit, training nothing
    progress: bool = True  # show tqdm progress bars

    stack_size = 1  # not a setting: each federated run is one job of the runner (its clients form the stack)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _choice("method", self.method, FED_METHOD_CHOICES)
        _choice("sketch", self.sketch, SKETCH_CHOICES)
        _choice("partition", self.partition, PARTITIONS)
        _choice("scaling", self.scaling, SCALINGS)
        _choice("random_init", self.random_init, RANDOM_INITS)
        _choice("model", self.model, MODELS)
        _choice("device", self.device, DEVICES)
        _check_numbers(self)
        _check_model_settings(self)
        if not 0.0 < self.participation <= 1.0:
            raise ConfigError(f"participation must be in (0, 1], got {self.participation}")
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ConfigError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")
        for name in ("lr", "lora_alpha", "dirichlet_alpha"):
            _positive(name, getattr(self, name))
        _check_workers_and_decay(self.workers, self.weight_decay)

    check_setup = Config.check_setup
    targets = Config.targets

    def sizes(self) -> tuple[int, int, int]:
        """As Config.sizes, with the activations of one client step (batch_size images): clients do not evaluate."""
        from data import TEST_IMAGES
        from models import MODELS

        params, activations, images = Config.sizes(self)
        evaluated = min(MODELS[self.model][0].eval_batch or TEST_IMAGES, TEST_IMAGES)
        return params, activations * self.batch_size // evaluated, images

    def runs_per_stack(self) -> int:  # a round's clients train as one stack
        return max(1, round(self.participation * self.clients))

    def selected_methods(self) -> list[str]:
        return list(FED_METHODS) if self.method == "all" else [self.method]

    def selected_sketches(self) -> list[str]:
        return list(SKETCHES) if self.sketch == "both" else [self.sketch]

    def base_config(self) -> Config:
        """The main.py Config whose base model this study adapts (the same checkpoint, the same hash)."""
        keep = ("model", "hidden", "vit_patch", "vit_dim", "vit_depth", "vit_heads", "vit_mlp_dim", "dropout",
                "data_dir", "val_size", "split_seed", "base_seed", "results_dir", "device", "progress")
        return Config(**{k: getattr(self, k) for k in keep})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FED_NOT_IN_HASH = {"method", "sketch", "ranks", "seeds", "data_dir", "results_dir", "plots_dir", "workers", "resume",
                    "resume_any_code", "plots_only", "progress", "target_accuracy"}
_FED_ADAPTER_FIELDS = {"scaling", "lora_alpha", "random_init", "target_modules"}


def fed_settings_hash(cfg: FedConfig, device: str, method: str) -> str:
    """Hash of every field that changes a federated run of ``method``, apart from its sketch, rank and seed."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in _FED_NOT_IN_HASH}
    d = {k: v for k, v in d.items() if k not in _MODEL_FIELDS or cfg.model == _MODEL_FIELDS[k]}
    if method == "fedavg":
        d = {k: v for k, v in d.items() if k not in _FED_ADAPTER_FIELDS}
    d["device"], d["method"] = device, method
    return stable_hash(d)


# --- the paper's GLUE protocol on Hugging Face models (glue.py) ------------------------------------------
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")  # glue.TASKS
GLUE_METHODS = ("fpft", "lora", "cola", "asymmetric_lora", "rac_lora", "lora_plus", "cola_plus")  # glue.py's
GLUE_TABLE2 = ("fpft", "lora", "cola", "asymmetric_lora", "rac_lora")  # --method all: the paper's Table 2
GLUE_SCHEDULES = ("linear", "constant", "cosine")


@dataclass
class GlueConfig:
    """Settings of ``python glue.py``: a Hugging Face sequence classifier (RoBERTa-base by default) on GLUE
    tasks, full fine-tuning against the LoRA methods through PEFT and peft_chain, as the paper's Table 2."""
    # --- what to run ---
    method: str = "all"  # fpft | lora | cola | asymmetric_lora | rac_lora | lora_plus | cola_plus | all (Table 2's five)
    tasks: list[str] = field(default_factory=lambda: ["mrpc", "rte", "stsb", "cola", "sst2", "qnli"])  # GLUE tasks
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one run per seed for each task x method
    # --- the protocol: merging methods train `chains` links of `epochs_per_chain` epochs; the others as many epochs in one piece ---
    chains: int = 10  # links of the chain (a merge after each) for cola, rac_lora, cola_plus
    epochs_per_chain: int = 10  # epochs of each link
    # --- model and data ---
    model: str = "roberta-base"  # a Hub name (needs network) or a local folder saved by save_pretrained
    data_dir: str = ""  # GLUE's own layout (<data_dir>/SST-2/train.tsv ...); empty: the Hub's nyu-mll/glue (needs `datasets` and network)
    max_length: int = 128  # tokens per example (longer ones are truncated)
    max_train_examples: int = 0  # use only the first n training examples of each task (0: all)
    # --- adapters (PEFT LoraConfig) ---
    sketch: str = "left"  # left: lora_B random, lora_A trained; right: lora_A random, lora_B trained
    rank: int = 8  # LoRA rank r
    lora_alpha: float = 16.0  # PEFT's scaling is lora_alpha / r
    lora_dropout: float = 0.0  # dropout on the LoRA branch's input
    random_init: str = "gaussian"  # init of the random factor: gaussian = N(0, 1); kaiming = nn.Linear's default
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])  # PEFT target_modules
    # --- optimisation (transformers.Trainer) ---
    lr: float = 4e-4  # learning rate of the LoRA methods
    fpft_lr: float = 2e-5  # learning rate of full fine-tuning
    loraplus_ratio: float = 16.0  # lora_plus, cola_plus: lora_B learns at this x lr
    batch_size: int = 16  # examples per step
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_ratio: float = 0.06  # fraction of the steps with a linear warm-up (Trainer's warmup_steps as a ratio)
    schedule: str = "linear"  # learning-rate schedule after the warm-up: linear | constant | cosine
    # --- where things go ---
    results_dir: str = "./results"  # glue_runs.csv, glue_curves.csv
    plots_dir: str = "./plots"  # glue_*.png
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    resume: bool = True  # skip runs already recorded in glue_runs.csv under the same config hash and code fingerprint
    resume_any_code: bool = False  # with resume, also skip runs recorded by other versions of the code
    plots_only: bool = False  # redraw the plots from the CSVs and exit, training nothing
    progress: bool = True  # show progress bars

    workers = 1  # not settings: one run at a time (a transformer uses every core, or the GPU)
    stack_size = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _choice("method", self.method, GLUE_METHODS + ("all",))
        _choice("sketch", self.sketch, SKETCHES)
        _choice("random_init", self.random_init, RANDOM_INITS)
        _choice("schedule", self.schedule, GLUE_SCHEDULES)
        _choice("device", self.device, DEVICES)
        _check_numbers(self)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks must name one or more distinct GLUE tasks ({', '.join(GLUE_TASKS)}), "
                              f"got {self.tasks}")
        for t in self.tasks:
            _choice("task", t, GLUE_TASKS)
        _check_model_lists([1], [self.rank], self.seeds)
        if not self.model:
            raise ConfigError("model must name a Hub model or a local folder, got ''")
        if not self.target_modules or any(not t for t in self.target_modules):
            raise ConfigError(f"target_modules must name one or more module names, got {self.target_modules}")
        for name in ("lr", "fpft_lr", "lora_alpha", "loraplus_ratio"):
            _positive(name, getattr(self, name))
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def check_setup(self) -> None:
        """The model's config and the data must be there (glue.check_sources): one line if not."""
        from glue import check_sources

        check_sources(self)

    def sizes(self) -> tuple[int, int, int]:
        """(parameters, activation floats of one step, 0) of the model (glue.model_sizes, on the meta device)."""
        from glue import model_sizes

        return model_sizes(self)

    def runs_per_stack(self) -> int:
        return 1

    def selected_methods(self) -> list[str]:
        return list(GLUE_TABLE2) if self.method == "all" else [self.method]

    def epochs(self) -> int:
        return self.chains * self.epochs_per_chain

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_GLUE_NOT_IN_HASH = {"method", "tasks", "seeds", "data_dir", "results_dir", "plots_dir", "device", "resume",
                     "resume_any_code", "plots_only", "progress"}
_GLUE_ADAPTER_FIELDS = {"sketch", "rank", "lora_alpha", "lora_dropout", "random_init", "target_modules", "lr"}


def glue_settings_hash(cfg: GlueConfig, device: str, method: str) -> str:
    """Hash of every field that changes a GLUE run of ``method``, apart from its task and seed."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in _GLUE_NOT_IN_HASH}
    if method == "fpft":
        d = {k: v for k, v in d.items() if k not in _GLUE_ADAPTER_FIELDS | {"loraplus_ratio"}}
    else:
        d.pop("fpft_lr")
        if method not in ("lora_plus", "cola_plus"):
            d.pop("loraplus_ratio")
    d["device"], d["method"] = device, method
    return stable_hash(d)


# Fields that only some forms read: they enter those forms' hashes only.
_FORM_FIELDS = {"lte_heads": {"lte", "lora"}, "lte_every": {"lte", "lora"}, "galore_every": {"galore"},
                "galore_scale": {"galore"}, "optimizer": set(FORMS) - {"galore"}}
_SCRATCH_NOT_IN_HASH = {"form", "ranks", "seeds", "data_dir", "results_dir", "plots_dir", "stack_size", "workers",
                        "resume", "resume_any_code", "plots_only", "progress"}


def scratch_settings_hash(cfg: ScratchConfig, device: str, form: str) -> str:
    """Hash of every field that changes a from-scratch run of ``form``, apart from its rank and seed."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in _SCRATCH_NOT_IN_HASH}
    d = {k: v for k, v in d.items() if k not in _FORM_FIELDS or form in _FORM_FIELDS[k]}
    d["device"] = device
    return stable_hash(d)


# Fields that do not change what a run computes, so they stay out of every hash (stack_size and
# workers change it only to float rounding: a run is the same run alone or in a stack).
_NOT_IN_HASH = {"results_dir", "plots_dir", "data_dir", "resume", "resume_any_code", "plots_only", "progress",
                "method", "sketch", "ranks", "seeds", "run_fpft", "stack_size", "workers", "preset"}
# Fields that only one model reads: they enter the hash of that model's runs only.
_MODEL_FIELDS = {"hidden": "mlp", "vit_patch": "vit", "vit_dim": "vit", "vit_depth": "vit", "vit_heads": "vit",
                 "vit_mlp_dim": "vit"}
# Fields added after results were committed: at the value every older run had, they stay out of the
# hash, so that those runs keep their hashes.
_ADDED_LATER = {"model": "mlp", "target_modules": ["all"]}
# Fields that only some methods read (each registry entry's ``settings``): they enter the hash of those
# methods' runs only.
_METHOD_FIELDS: dict[str, set[str]] = {}
for _m in _REGISTRY.values():
    for _field in _m.settings:
        _METHOD_FIELDS.setdefault(_field, set()).add(_m.name)
# Fields that only adapters read; the base model and FPFT do not depend on them.
_ADAPTER_FIELDS = {"merge_every", "scaling", "lora_alpha", "random_init", "reset_optimizer_on_merge",
                   "target_modules", *_METHOD_FIELDS}


def settings_hash(cfg: Config, device: str, kind: str = "adapter", method: str | None = None) -> str:
    """Hash of every field that changes a run's numbers, apart from what names the run itself.

    ``kind`` is "adapter" (all settings), or "base"/"fpft", which ignore adapter-only fields.
    ``method`` keeps the fields only it reads (e.g. loraplus_ratio for lora_plus); other methods' runs
    ignore them, so adding such a field changes no existing hash.
    ``device`` is the resolved device type ("cpu", "cuda", ...): random streams differ by device.
    """
    d = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_HASH}
    d = {k: v for k, v in d.items() if k not in _METHOD_FIELDS or method in _METHOD_FIELDS[k]}
    d = {k: v for k, v in d.items() if k not in _MODEL_FIELDS or cfg.model == _MODEL_FIELDS[k]}
    d = {k: v for k, v in d.items() if k not in _ADDED_LATER or v != _ADDED_LATER[k]}
    if kind != "adapter":
        d = {k: v for k, v in d.items() if k not in _ADAPTER_FIELDS}
    d["device"] = device
    return stable_hash(d)


def stable_hash(obj) -> str:
    """First 12 hex digits of the SHA-256 of obj's canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def memory_need_bytes(sizes: tuple[int, int, int], runs_per_stack: int, processes: int) -> int:
    """Rough peak bytes a sweep needs, from one run's (parameters, activation floats of one evaluation pass,
    image floats): per run, every parameter six times in float32 (base copy, trained copy, gradient, AdamW's
    two moments, best-so-far snapshot) and the activations; times the runs of a stack and the worker
    processes, each of which also holds the images."""
    params, activations, images = sizes
    return processes * (runs_per_stack * 4 * (6 * params + activations) + 4 * images)


def check_fits(cfg, available_bytes: int, processes: int, where: str) -> None:
    """ConfigError when the model and stack asked for need more memory than ``available_bytes``."""
    need = memory_need_bytes(cfg.sizes(), cfg.runs_per_stack(), processes)
    if need > available_bytes:
        what = f"hidden {cfg.hidden}" if getattr(cfg, "model", "mlp") == "mlp" else f"the {cfg.model}"
        raise ConfigError(f"{what} needs about {need / 2 ** 30:.1f} GiB ({cfg.runs_per_stack()} runs "
                          f"per stack x {processes} process{'es' if processes > 1 else ''}) but {where} has "
                          f"{available_bytes / 2 ** 30:.1f} GiB available; use narrower layers, fewer runs at once "
                          f"(--stack_size; federated.py: --clients x --participation) or fewer --workers")


def max_useful_rank(dims: list[int]) -> int:
    """Largest min(in, out) over the layers of an MLP with widths ``dims``: a higher rank adds nothing anywhere."""
    return max(min(a, b) for a, b in zip(dims[:-1], dims[1:]))


def _check_model_settings(cfg) -> None:
    """The checks Config and FedConfig make of the model, the adapted layers, the ranks and the seeds."""
    _check_model_lists(cfg.hidden, cfg.ranks, cfg.seeds)
    if not cfg.target_modules or any(not t for t in cfg.target_modules):
        raise ConfigError(f"target_modules must name one or more presets ({', '.join(TARGET_PRESETS)}) or "
                          f"layer names, got {cfg.target_modules}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {cfg.dropout}")


def _check_model_lists(hidden: list[int], ranks: list[int], seeds: list[int]) -> None:
    """The checks both configs make of the widths, the rank sweep and the seeds."""
    if not hidden or any(not 1 <= h <= MAX_WIDTH for h in hidden):
        raise ConfigError(f"hidden must be one or more widths from 1 to {MAX_WIDTH}, got {hidden}")
    if not ranks:
        raise ConfigError("ranks is empty: give at least one rank, e.g. --ranks 1 2 4 8")
    for r in ranks:  # the upper bound depends on the model's layers: check_setup
        if r < 1:
            raise ConfigError(f"rank {r} is out of range: ranks must be integers from 1 to the largest "
                              f"min(in, out) among the model's layers")
    if not seeds:
        raise ConfigError("seeds is empty: give at least one seed, e.g. --seeds 0 1 2")
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"seed {seed} is out of range: seeds must be integers from 0 to 2^63-1 = {MAX_SEED}")
    for name, values in (("ranks", ranks), ("seeds", seeds)):
        if len(set(values)) != len(values):
            raise ConfigError(f"{name} has repeated values {values}; give each at most once")


def _check_workers_and_decay(workers: int, weight_decay: float) -> None:
    if not 0 <= workers <= MAX_WORKERS:
        raise ConfigError(f"workers must be 0 (one per core on CPU, 1 on a GPU) or positive up to {MAX_WORKERS}, "
                          f"got {workers}")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")


def _check_numbers(cfg) -> None:
    """Every float field finite, every integer field of INT_RANGES within its range."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")
        if f.name in INT_RANGES:
            lo, hi = INT_RANGES[f.name]
            if not lo <= value <= hi:
                raise ConfigError(f"{f.name} must be an integer from {lo} to {hi}, got {value}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _positive(name: str, value) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be positive, got {value}")


# --- command line -------------------------------------------------------------------------------

def _field_comments(cls=None) -> dict[str, str]:
    """The one-line comment after each field of ``cls`` (Config), for --help (read from this file's source)."""
    comments = {}
    for line in inspect.getsource(cls or Config).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_TYPES = {"int": int, "float": float, "str": str, "bool": _parse_bool,
          "list[int]": int, "list[float]": float, "list[str]": str}
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", _parse_bool: "true or false"}


def from_argv(argv: list[str] | None = None, cls=None, prog: str = "main.py",
              description: str = "RAC-LoRA MNIST suite. Every Config field can be overridden."):
    """``cls`` (Config, or ScratchConfig) from its defaults plus ``--field value`` overrides;
    ConfigError on anything unknown.

    Fields are named with underscores or dashes (``--max_epochs`` or ``--max-epochs``); a bool
    flag alone (``--plots-only``) means true.
    """
    cls = cls or Config
    defaults = cls()
    comments = _field_comments(cls)
    parser = _Parser(prog=prog, description=description, allow_abbrev=False,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.fields = cls
    for f in dataclasses.fields(cls):
        kind = str(f.type)
        conv = _TYPES[kind]
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kw = dict(dest=f.name, type=_typed(f.name, conv), default=getattr(defaults, f.name), action=_Once,
                  help=comments.get(f.name, " "), metavar=kind.upper().replace("[", "_").replace("]", ""))
        if kind.startswith("list"):
            kw["nargs"] = "+"
        elif conv is _parse_bool:
            kw["nargs"] = "?"
            kw["const"] = True
        parser.add_argument(*names, **kw)
    args = vars(parser.parse_args(argv))
    given = args.pop(_Once.GIVEN, set())
    for name, value in PRESETS.get(args.get("preset"), {}).items():  # a preset's fields, unless given too
        if name not in given:
            args[name] = value
    return cls(**args)


class _Once(argparse.Action):
    """Store the option's value, refusing a second occurrence (argparse would silently keep the last)."""
    GIVEN = "_options_given"

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, self.GIVEN, None)
        if given is None:
            given = set()
            setattr(namespace, self.GIVEN, given)
        if self.dest in given:
            hint = f" (a list takes all its values after one flag: --{self.dest} 1 2 4)" if self.nargs == "+" else ""
            raise ConfigError(f"--{self.dest} is given more than once; give each option once{hint}")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


def _typed(name: str, conv):
    def convert(text: str):
        try:
            return conv(text)
        except ValueError:
            raise ConfigError(f"--{name} expects {_TYPE_WORDS[conv]}, got {text!r}") from None
    return convert


def _allowed_fields(cls=None) -> str:
    return ", ".join(f"--{f.name}" for f in dataclasses.fields(cls or Config))


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors raised as ConfigError instead of usage + exit."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments"):
            tokens = message.split(":", 1)[1].split()
            bad = " ".join(t for t in tokens if t.startswith("-")) or " ".join(tokens)
            raise ConfigError(f"unknown option {bad}; allowed: {_allowed_fields(getattr(self, 'fields', None))} (see --help)")
        raise ConfigError(f"{message} (see --help)")

    def _get_value(self, action, arg_string):
        # argparse turns a ValueError from `type` into its own message; keep ours, which says what is allowed
        try:
            return action.type(arg_string) if callable(action.type) else arg_string
        except ConfigError:
            raise
