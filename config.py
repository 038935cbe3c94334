"""Every setting of the experiment (``python main.py``), in one typed dataclass.

Edit the defaults here, or override any field on the command line as ``--field value`` (lists take several
values: ``--ranks 1 2 4``); ``python main.py --help`` lists them with their help. Switch among the methods with
``method`` (lora, cola, asymmetric_lora, rac_lora, ... : raclora/methods.py's registry). The fields every study
shares (seeds, lr, batch size, folders, device, resume, ...) are declared once in engine/settings.py; those of
the adapted base model (shared with federated.py) in ``AdaptedModelConfig`` below. Importing this module does
nothing else: no seeding, no I/O, no printing.
"""
from __future__ import annotations

from dataclasses import dataclass

import models
from data import (DIGITS, NEXT_TOKEN, TEXTS, Task, TaskSpec, check_val_size, load_tasks, text_examples, text_task,
                  vocabulary)
from engine.settings import EXECUTORS, StudyConfig, arg, check_ranks, check_workers, from_argv as parse
from raclora.errors import ConfigError
from raclora.factors import RANDOM_INITS, ROLES, SCALINGS
from raclora.methods import ADALORA_INIT_RATIO, METHODS, methods_reading

SKETCHES = tuple(ROLES)  # left: B random, A zero and trained; right: A random, B trained
SKETCH_CHOICES = SKETCHES + ("both",)
RAY_FIELDS = ("ray_address", "ray_cpus", "ray_retries")  # read by --executor ray only
MAX_WIDTH = 2 ** 20  # a hidden width above this is a typo: one such layer alone would need gigabytes


def method_choices() -> tuple[str, ...]:
    return (*METHODS, "all")


def models_reading(field_name: str) -> dict:
    """``only`` for a model field: the models of models.MODELS that read it, when not all of them do."""
    readers = tuple(name for name, (_, fields) in models.MODELS.items() if field_name in fields)
    return {} if len(readers) == len(models.MODELS) else {"model": readers}


ADAPTER = {"kind": ("adapter",)}  # a field only adapters read: the base model and full fine-tuning ignore it


def models_taking(inputs: str) -> dict:
    """``only`` for a data field: the models of models.MODELS whose examples may be ``inputs`` (their ``takes``:
    "images" or "tokens"), so that the field enters only their runs' hashes."""
    return {"model": tuple(name for name, (cls, _) in models.MODELS.items() if inputs in cls.takes)}


TOKEN_MODELS = models_taking("tokens")  # they train on data.TEXTS
IMAGE_MODELS = models_taking("images")  # they train on MNIST
TASK_B_TEXT = {**TOKEN_MODELS, "kind": ("fpft", "adapter", "full")}  # read by the runs on task B, not the base model


@dataclass
class ModelConfig(StudyConfig):
    """The model of models.py's registry and its fields, and the data it reads: what every study that trains one
    of the registry's models shares (main.py's Config, federated.py's FedConfig, scratch.py's ScratchConfig). A
    model that takes images trains on MNIST's; one that takes token sequences (the gpt) on data.TEXTS."""
    # --- the model (models.py's registry) ---
    model: str = arg("mlp", "mlp: the paper's MLP; vit: a small Vision Transformer; gpt: a small causal "
                     "transformer over token sequences (not on main.py's MNIST tasks)", choices=tuple(models.MODELS))
    hidden: list[int] = arg([64, 64], "mlp: hidden widths of the (28*28)-...-5 MLP", only=models_reading("hidden"))
    vit_patch: int = arg(7, "vit: side of the square patches (it divides 28: 16 patches of 7x7)", range=(1, 28),
                         only=models_reading("vit_patch"))
    vit_dim: int = arg(32, "vit: token width", range=(1, 4096), only=models_reading("vit_dim"))
    vit_depth: int = arg(2, "vit: transformer blocks", range=(1, 64), only=models_reading("vit_depth"))
    vit_heads: int = arg(2, "vit: attention heads (they divide vit_dim)", range=(1, 256),
                         only=models_reading("vit_heads"))
    vit_mlp_dim: int = arg(64, "vit: hidden width of each block's MLP (fc1, fc2)", range=(1, 16384),
                           only=models_reading("vit_mlp_dim"))
    # nanoGPT's laptop-CPU size (4 layers, 4 heads, width 128, context 64); its MLP is 4 x gpt_dim wide
    gpt_dim: int = arg(128, "gpt: token width (nanoGPT's n_embd)", range=(1, 4096), only=models_reading("gpt_dim"))
    gpt_depth: int = arg(4, "gpt: transformer blocks (n_layer)", range=(1, 64), only=models_reading("gpt_depth"))
    gpt_heads: int = arg(4, "gpt: attention heads, they divide gpt_dim (n_head)", range=(1, 256),
                         only=models_reading("gpt_heads"))
    gpt_context: int = arg(64, "gpt: the longest sequence in tokens, one learned position each (block_size)",
                           range=(1, 65536), only=models_reading("gpt_context"))
    dropout: float = arg(0.1, "dropout probability after each hidden layer")
    text_chars: int = arg(0, "gpt: read at most this many characters of each split (train, val, test) of each text; "
                          "0 = all of it (the tests: a few hundred)", range=(0, 10 ** 9), only=TOKEN_MODELS)
    # --- where the stacks train (engine/runner.py, engine/cluster.py) ---
    workers: int = arg(0, "processes training stacks side by side, each with cores/workers threads; 0 = one per "
                       "core on CPU, 1 on a GPU (executor ray: as many as the cluster's CPUs over ray_cpus)", hash=False)
    executor: str = arg("local", "local: worker processes on this machine (workers); ray: each stack a task on a Ray "
                        "cluster (ray_address), the results written by this process alone", choices=EXECUTORS,
                        hash=False)
    ray_address: str = arg("", "executor ray: '' starts Ray on this machine; auto joins the cluster `ray start` runs "
                           "here; host:port joins the cluster of that head node", hash=False)
    ray_cpus: int = arg(1, "executor ray: CPUs each stack's task declares (its torch threads)", range=(1, 1024),
                        hash=False)
    ray_retries: int = arg(3, "executor ray: times a stack is trained again when its worker process or node dies",
                           range=(0, 100), hash=False)

    def check(self) -> None:
        check_workers(self.workers)
        given = [k for k in RAY_FIELDS if getattr(self, k) != self.__dataclass_fields__[k].default]
        if self.executor != "ray" and given:
            raise ConfigError(f"{', '.join(given)} {'is a setting' if len(given) == 1 else 'are settings'} of "
                              f"--executor ray, not of --executor {self.executor}")
        if not self.hidden or any(not 1 <= h <= MAX_WIDTH for h in self.hidden):
            raise ConfigError(f"hidden must be one or more widths from 1 to {MAX_WIDTH}, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def takes_tokens(self) -> bool:
        """Whether the model reads token sequences (the studies then run on texts) rather than images."""
        return "tokens" in models.MODELS[self.model][0].takes


@dataclass
class AdaptedModelConfig(ModelConfig):
    """The base model of task A (digits 0-4, or a text), the adapters put on it for task B (digits 5-9, or another
    text), and its data: the fields that main.py's Config and federated.py's FedConfig share."""
    # --- adapters ---
    sketch: str = arg("left", "left: B random, A zero+trained (\"(Zero, Gaussian)\"); right: A random, B trained; "
                      "both", choices=SKETCH_CHOICES, hash=False)
    ranks: list[int] = arg([1, 2, 4, 8], "adapter ranks to sweep", hash=False)
    scaling: str = arg("alpha", "scale of B@A: \"alpha\" (published code), \"alpha/r\" (LoRA), \"alpha/sqrt(r)\" "
                       "(rsLoRA)", choices=SCALINGS, only=ADAPTER)
    lora_alpha: float = arg(1.0, "alpha in the scaling rule above", positive=True, only=ADAPTER)
    random_init: str = arg("gaussian", "init of the non-zero factor: gaussian = N(0, 1); kaiming = nn.Linear's "
                           "default", choices=RANDOM_INITS, only=ADAPTER)
    target_modules: list[str] = arg(["all"], "presets all | attention (q k v o) | mlp (fc1 fc2), or layer names as "
                                    "PEFT's target_modules", only=ADAPTER)
    # --- data and the base model ---
    val_size: int = arg(5000, "images held out of the 60k training set for validation", range=(1, 10 ** 9),
                        only=IMAGE_MODELS)
    split_seed: int = arg(0, "seed of the train/validation split (the same for every run)", range=(0, 2 ** 63 - 1),
                          only=IMAGE_MODELS)
    text_a: str = arg("shakespeare", "gpt: the text of task A, on which the base model is trained (data.TEXTS)",
                      choices=tuple(TEXTS), only=TOKEN_MODELS)
    text_b: str = arg("austen", "gpt: the text of task B, to which the methods adapt the base model",
                      choices=tuple(TEXTS), only=TASK_B_TEXT)
    task_b_chars: int = arg(0, "gpt: train on at most the first this-many characters of task B's training split; "
                            "0 = all of it (the studies' budget)", range=(0, 10 ** 9), only=TASK_B_TEXT)
    base_seed: int = arg(0, "seed of the base model (trained once on task A, then cached)",
                         range=(0, 2 ** 63 - 1))

    def check(self) -> None:
        super().check()
        check_ranks(self.ranks)
        if not self.target_modules or any(not t for t in self.target_modules):
            raise ConfigError(f"target_modules must name one or more presets ({', '.join(models.TARGET_PRESETS)}) "
                              f"or layer names, got {self.target_modules}")

    def check_setup(self) -> None:
        """The checks that need the data's and the model's sizes (data.check_val_size, the texts' files and the
        context, models.check_model), before any compute."""
        if self.takes_tokens():
            self.load_tasks("cpu")  # the texts verified, their splits long enough for the context
        else:
            check_val_size(self.val_size)
        models.check_model(self, self.task_spec(), self.tasks_in_words())

    def task_spec(self) -> TaskSpec:
        """What the model reads and predicts in tasks A and B: MNIST's five-class images, or next-character
        prediction over windows of gpt_context characters in the one vocabulary of every text."""
        if not self.takes_tokens():
            return DIGITS
        return TaskSpec(shape=(self.gpt_context,), classes=len(vocabulary(self.data_dir)), objective=NEXT_TOKEN)

    def tasks_in_words(self) -> str:
        if self.takes_tokens():
            return f"task A is the text {self.text_a!r}, task B the text {self.text_b!r}"
        return "tasks A and B are MNIST's digits 0-4 and 5-9"

    def load_tasks(self, device) -> dict[str, Task]:
        """Tasks A and B on ``device``, by what the model takes: MNIST's digits 0-4 and 5-9 (data.load_tasks), or
        the texts text_a and text_b as next-character tasks (data.text_task: windows of gpt_context characters;
        every split cut to text_chars, B's training split to task_b_chars)."""
        if not self.takes_tokens():
            return load_tasks(self.data_dir, self.val_size, self.split_seed, device)
        vocab = vocabulary(self.data_dir)
        return {"A": text_task(self.text_a, self.gpt_context, self.data_dir, device, vocab, chars=self.text_chars),
                "B": text_task(self.text_b, self.gpt_context, self.data_dir, device, vocab, chars=self.text_chars,
                               train_chars=self.task_b_chars)}

    def sizes(self) -> tuple[int, int, int]:
        """(parameters, activation floats of one evaluation pass, input floats) of one run (models.sizes)."""
        spec = self.task_spec()
        examples = text_examples(self.text_b, self.gpt_context, self.text_chars) if self.takes_tokens() else None
        return models.sizes(self.model, models.model_settings(self), spec, *([examples] if examples else []))

    def targets(self) -> list[str] | None:
        """target_modules for models.targeted (None: every Linear layer)."""
        return None if self.target_modules == ["all"] else list(self.target_modules)

    def selected_sketches(self) -> list[str]:
        return list(SKETCHES) if self.sketch == "both" else [self.sketch]


# Named protocols: each sets these fields, unless the command line sets them as well.
PRESETS = {
    "none": {},
    # the paper's Table 2 (RoBERTa on GLUE): the merging methods train 10 chains of 10 epochs (a merge after
    # each), LoRA the same 100 epochs in one piece (it never merges); every run trains all its epochs
    "table2": {"merge_every": 10, "max_epochs": 100, "patience": 100},
    # the character-level GPT (docs/text.md): a base model trained 3 epochs on all of Shakespeare (task A), adapted
    # to the first 100,000 characters of Pride and Prejudice (task B) in 3 epochs of 98 steps, a merge after each;
    # batch 16 windows of 64 characters, AdamW at 1e-3 (nanoGPT's CPU recipe: 12 windows, 1e-3)
    "gpt": {"model": "gpt", "batch_size": 16, "lr": 1e-3, "max_epochs": 3, "patience": 3, "merge_every": 1,
            "task_b_chars": 100_000},
}


@dataclass
class Config(AdaptedModelConfig):
    # --- what to run ---
    method: str = arg("rac_lora", "a method of the registry in raclora/methods.py, or all", choices=method_choices,
                      hash=False)
    run_fpft: bool = arg(True, "also train the full fine-tuning reference (one run per seed)", hash=False)
    preset: str = arg("none", "none | table2: the paper's Table 2 protocol (10 chains x 10 epochs) | gpt: the "
                      "character-level GPT, Shakespeare adapted to Austen (see PRESETS)",
                      choices=tuple(PRESETS), hash=False)
    # --- adapters ---
    merge_every: int = arg(1, "epochs between merges, for the methods that merge (cola, rac_lora)",
                           range=(1, 100_000), only=ADAPTER)
    reset_optimizer_on_merge: bool = arg(False, "clear AdamW's moments at each merge (published code: no)",
                                         only=ADAPTER)
    loraplus_ratio: float = arg(16.0, "lora_plus, cola_plus: learning rate of B / learning rate of A (LoRA+)",
                                positive=True, only={**ADAPTER, "method": methods_reading("loraplus_ratio")})
    relora_every: int = arg(200, "relora: optimizer steps between merges (each also resets AdamW's moments)",
                            range=(1, 10 ** 9), only={**ADAPTER, "method": methods_reading("relora_every")})
    relora_warmup: int = arg(20, "relora: steps of linear learning-rate warm-up at the start and after each merge",
                             range=(1, 10 ** 9), only={**ADAPTER, "method": methods_reading("relora_warmup")})
    adalora_init_ratio: float = arg(ADALORA_INIT_RATIO, "adalora: each layer starts at rank ceil(ratio x rank), the "
                                    "budget then falling to rank per layer on average (PEFT's init_r / target_r)",
                                    positive=True, only={**ADAPTER, "method": methods_reading("adalora_init_ratio")})
    adalora_warmup: float = arg(0.1, "adalora: fraction of the run's optimizer steps before the first pruning "
                                "(PEFT's tinit / total_step)", only={**ADAPTER, "method": methods_reading("adalora_warmup")})
    adalora_final: float = arg(0.3, "adalora: fraction of the run's optimizer steps at the final budget, its rank "
                               "pattern fixed (tfinal / total_step)",
                               only={**ADAPTER, "method": methods_reading("adalora_final")})
    adalora_interval: int = arg(10, "adalora: optimizer steps between two prunings while the budget falls (deltaT)",
                                range=(1, 10 ** 9), only={**ADAPTER, "method": methods_reading("adalora_interval")})
    adalora_beta1: float = arg(0.85, "adalora: smoothing of the importance scores' sensitivity, in (0, 1)",
                               only={**ADAPTER, "method": methods_reading("adalora_beta1")})
    adalora_beta2: float = arg(0.85, "adalora: smoothing of the importance scores' uncertainty, in (0, 1)",
                               only={**ADAPTER, "method": methods_reading("adalora_beta2")})
    adalora_orth_weight: float = arg(0.5, "adalora: weight of the orthogonality penalty on P and Q in the loss (0 = "
                                     "none)", only={**ADAPTER, "method": methods_reading("adalora_orth_weight")})
    # --- optimisation (base model, FPFT and adapters alike) ---
    max_epochs: int = arg(50, "upper limit on epochs per run", range=(1, 100_000))
    patience: int = arg(10, "early stopping: epochs without a lower validation loss before stopping",
                        range=(1, 100_000))
    stack_size: int = arg(16, "runs of one method trained at once as one stacked model (1 = one run at a time)",
                          range=(1, 1024), hash=False)
    # --- text samples (gpt) ---
    sample_chars: int = arg(300, "gpt: characters each run writes after sample_prompt (runs.csv's sample; the "
                            "summary shows the base's, FPFT's and RAC-LoRA's); 0 = none", range=(0, 100_000),
                            only=TOKEN_MODELS)
    sample_prompt: str = arg("Elizabeth", "gpt: the text every run's sample starts from (its characters must be "
                             "in the texts' vocabulary)", only=TOKEN_MODELS)

    # a run is the base model, full fine-tuning or an adapter run of a method (sweep.run_hash)
    RUN_KEYS = {"kind": "adapter", "method": None}
    # fields added after results were committed (see StudyConfig.ADDED_LATER)
    ADDED_LATER = {"model": "mlp", "target_modules": ["all"]}

    def check(self) -> None:
        super().check()
        check_adalora(self)

    def check_setup(self) -> None:
        super().check_setup()
        if self.takes_tokens() and self.sample_chars:
            vocab = vocabulary(self.data_dir)
            bad = [c for c in self.sample_prompt if c not in vocab.chars]
            if not self.sample_prompt or bad:
                raise ConfigError(f"sample_prompt must be one or more characters of the texts' vocabulary "
                                  f"({len(vocab)} characters: letters, digits, punctuation, space, newline), got "
                                  f"{self.sample_prompt!r}" + (f" with {bad[0]!r}" if bad else ""))

    def runs_per_stack(self) -> int:
        return min(self.stack_size, len(self.ranks) * len(self.seeds))

    def selected_methods(self) -> list[str]:
        return list(METHODS) if self.method == "all" else [self.method]


def check_adalora(cfg) -> None:
    """ConfigError unless the adalora_ settings of ``cfg`` make a schedule (checked whatever the method: a bad value is
    refused before it is used; arg's own checks have refused non-finite numbers)."""
    for name in ("adalora_warmup", "adalora_final"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{name} must be a fraction in [0, 1), got {getattr(cfg, name)}")
    if cfg.adalora_warmup + cfg.adalora_final >= 1.0:
        raise ConfigError(f"adalora_warmup + adalora_final must be below 1 (steps left to prune in), got "
                          f"{cfg.adalora_warmup} + {cfg.adalora_final}")
    for name in ("adalora_beta1", "adalora_beta2"):
        if not 0.0 < getattr(cfg, name) < 1.0:
            raise ConfigError(f"{name} must be in (0, 1), got {getattr(cfg, name)}")
    if cfg.adalora_orth_weight < 0.0:
        raise ConfigError(f"adalora_orth_weight must be a number >= 0, got {cfg.adalora_orth_weight}")
    ratio = cfg.adalora_init_ratio
    if not all(METHODS["adalora"].layer_rank(r, ratio) > r for r in cfg.ranks):
        raise ConfigError(f"adalora_init_ratio must make each initial rank ceil(ratio x rank) exceed its rank (a "
                          f"finite ratio above 1), got {cfg.adalora_init_ratio}")


def from_argv(argv: list[str] | None = None) -> Config:
    """Config from its defaults plus ``--field value`` overrides (engine/settings.from_argv)."""
    return parse(argv, Config, prog="main.py", presets=PRESETS,
                 description="RAC-LoRA MNIST suite. Every Config field can be overridden.")
