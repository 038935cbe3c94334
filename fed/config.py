"""Settings of ``python federated.py``: the suite's base model (main.py's, the same checkpoint) adapted to digits
5-9 by clients that each hold a shard of task B, under a federated method of fed/methods.py's registry; with
``--model gpt --partition role``, a GPT trained on Austen adapted to Shakespeare by his speaking roles.

The base model's and the adapters' fields are main.py's (config.AdaptedModelConfig); the federation's are here.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

import models
from config import AdaptedModelConfig, Config, ModelConfig, TOKEN_MODELS
from data import TEST_IMAGES
from engine.settings import StudyConfig, arg, from_argv as parse, override, settings_hash
from fed.methods import FED_METHODS
from fed.partition import PARTITIONS
from raclora.errors import ConfigError


def fed_method_choices() -> tuple[str, ...]:
    return (*FED_METHODS, "all")


@dataclass
class FedConfig(AdaptedModelConfig):
    """Settings of ``python federated.py``."""
    # --- what to run ---
    method: str = arg("fed_rac_lora", "a method of fed/methods.py's registry (fedavg fedit ffa_lora flora "
                      "fed_rac_lora), or all", choices=fed_method_choices, hash=False)
    ranks: list[int] = override(AdaptedModelConfig, "ranks", [1])
    # --- the federation ---
    clients: int = arg(10, "clients holding task B's training examples (role: the clients largest of the roles "
                       "min_role_chars keeps)", range=(1, 10 ** 6))
    partition: str = arg("dirichlet", "iid | dirichlet (label skew; images) | role (a text model: each client one "
                         "of Shakespeare's speaking roles, LEAF's Shakespeare task)", choices=PARTITIONS)
    min_role_chars: int = arg(2000, "role: keep the speaking roles with at least this many characters of speech in "
                              "task B's training split (the clients are the largest of them)", range=(1, 10 ** 9),
                              only={"partition": ("role",)})
    dirichlet_alpha: float = arg(0.5, "dirichlet: concentration; small = few classes per client", positive=True)
    participation: float = arg(1.0, "fraction of the clients in each round, in (0, 1]")
    rounds: int = arg(50, "server rounds", range=(1, 100_000))
    local_epochs: int = arg(1, "epochs of random reshuffling over a client's own shard per round",
                            range=(1, 10_000))
    lr: float = override(AdaptedModelConfig, "lr", 1e-3, help="clients' AdamW learning rate (a fresh optimizer "
                         "every round)")
    target_accuracy: float = arg(0.9, "images: the summary's rounds and megabytes to reach this test accuracy on "
                                 "task B (digits 5-9)", hash=False)
    target_loss: float = arg(2.5, "text (gpt): the summary's rounds and megabytes to reach this test loss on task B, "
                             "in nats per character", positive=True, hash=False)
    # this study's base model learns Austen and is adapted to Shakespeare, whose speaking roles are the clients
    text_a: str = override(AdaptedModelConfig, "text_a", "austen", help="gpt: the text of task A, on which the base "
                           "model is trained (data.TEXTS)")
    text_b: str = override(AdaptedModelConfig, "text_b", "shakespeare", help="gpt: the text of task B, which the "
                           "clients hold (partition role: shakespeare, whose speaking roles they are)")
    # the base model's training (main.py's max_epochs and lr, by default main.py's values: the same checkpoint)
    base_max_epochs: int = arg(Config.__dataclass_fields__["max_epochs"].default, "the base model's upper limit on "
                               "epochs over task A (main.py's max_epochs)", range=(1, 100_000))
    base_lr: float = arg(Config.__dataclass_fields__["lr"].default, "the base model's AdamW learning rate (main.py's "
                         "lr)", positive=True)
    engine: str = arg("process", "process: the rounds in this process (fed/simulate.py) | flower: each run on a "
                      "local Flower federation of its own (fed/flower.py: a SuperLink and clients SuperNodes on free "
                      "ports of 127.0.0.1 in a private Flower home; results in fed_flower_*.csv)",
                      choices=("process", "flower"), hash=False)
    workers: int = override(AdaptedModelConfig, "workers", help="processes training runs side by side; 0 = one "
                            "per core on CPU, 1 on a GPU")

    stack_size = 1  # not a setting: each federated run is one job of the runner (its clients form the stack)
    # a run is one method's; FedAvg trains every weight, so the adapters' fields stay out of its hash
    RUN_KEYS = {"kind": "adapter", "method": None}
    HASHED_CONTEXT = ("method",)
    # fields added after results were committed, at the value every older run had (StudyConfig.ADDED_LATER)
    ADDED_LATER = {"base_max_epochs": Config.__dataclass_fields__["max_epochs"].default,
                   "base_lr": Config.__dataclass_fields__["lr"].default}

    def check(self) -> None:
        super().check()
        if not 0.0 < self.participation <= 1.0:
            raise ConfigError(f"participation must be in (0, 1], got {self.participation}")
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ConfigError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")
        if self.engine == "flower" and self.executor != "local":
            raise ConfigError(f"engine flower runs each federated run on a Flower federation of its own; executor "
                              f"{self.executor!r} is for the in-process engine (give one or the other)")
        self.check_partition()

    def check_partition(self) -> None:
        """The partition must fit the model's task: role needs a text model on Shakespeare, whose speaking roles
        it reads; dirichlet skews image labels, and a text has none to skew (iid fits both)."""
        text = self.takes_tokens()
        if self.partition == "role" and not text:
            raise ConfigError(f"partition role makes Shakespeare's speaking roles the clients and needs a text "
                              f"model (--model {', '.join(TOKEN_MODELS['model'])}), got model {self.model!r}; "
                              f"for it use iid or dirichlet")
        if self.partition == "role" and self.text_b != "shakespeare":
            raise ConfigError(f"partition role reads Shakespeare's speaking roles: text_b must be shakespeare, "
                              f"got {self.text_b!r}; for another text use iid")
        if self.partition == "role" and self.min_role_chars <= self.gpt_context:
            raise ConfigError(f"min_role_chars must be above gpt_context ({self.gpt_context}): a role needs "
                              f"{self.gpt_context + 1} characters for one window; got {self.min_role_chars}")
        if self.partition == "dirichlet" and text:
            raise ConfigError(f"partition dirichlet skews image labels and a text has none to skew; for model "
                              f"{self.model!r} use role (Shakespeare's speaking roles) or iid")

    def sizes(self) -> tuple[int, int, int]:
        """As Config.sizes, with the activations of one client step (batch_size images): clients do not evaluate."""
        params, activations, images = super().sizes()
        evaluated = min(models.MODELS[self.model][0].eval_batch or TEST_IMAGES, TEST_IMAGES)
        return params, activations * self.batch_size // evaluated, images

    def runs_per_stack(self) -> int:  # a round's clients train as one stack
        return max(1, round(self.participation * self.clients))

    def selected_methods(self) -> list[str]:
        return list(FED_METHODS) if self.method == "all" else [self.method]

    def run_context(self, method: str) -> dict:
        """settings_hash's context of a run of ``method``: FedAvg is no adapter run."""
        return dict(kind="adapter" if FED_METHODS[method].uses_sketch else "full", method=method)

    def base_config(self) -> Config:
        """The main.py Config whose base model this study adapts (the same checkpoint, the same hash)."""
        # every model's fields and its data's (config.ModelConfig: a new model's settings come along), then the
        # tasks' (task B's enter no base model's hash: the sweep's task B is then this study's) and the base
        # model's, and where it is kept
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {f.name for f in dataclasses.fields(StudyConfig)}
        shared = (*sorted(model_fields), "text_a", "text_b", "task_b_chars", "data_dir", "val_size", "split_seed", "base_seed", "results_dir",
                  "device", "progress")
        return Config(**{k: getattr(self, k) for k in shared}, max_epochs=self.base_max_epochs, lr=self.base_lr)


def from_argv(argv: list[str] | None = None, prog: str = "federated.py") -> FedConfig:
    return parse(argv, FedConfig, prog=prog,
                 description="Federated adaptation of the suite's base model. Every field can be overridden.")


def fed_settings_hash(cfg: FedConfig, device: str, method: str) -> str:
    """Hash of every field that changes a federated run of ``method``, apart from its sketch, rank and seed."""
    return settings_hash(cfg, device, **cfg.run_context(method))


# --- the same settings as a Flower run config (fed/flower.py; pyproject.toml's [tool.flwr.app.config]) -----------
# every field but those of how a command runs, with dashes for underscores, and one rank and one seed per run
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"  # in the Flower app's bundle too
COMMAND_ONLY = ("resume", "resume_any_code", "plots_only", "progress", "report_to", "workers", "engine", "executor",
                "ray_address", "ray_cpus", "ray_retries")
SINGLE = {"ranks": "rank", "seeds": "seed"}


def run_config_keys() -> dict[str, str]:
    """{run-config key: FedConfig field} of a Flower run, derived from FedConfig's fields."""
    return {SINGLE.get(f.name, f.name).replace("_", "-"): f.name for f in dataclasses.fields(FedConfig)
            if f.name not in COMMAND_ONLY}


def toml_value(value):
    """A FedConfig value as the run config holds it: lists comma-separated, the rest as they are."""
    return ",".join(str(v) for v in value) if isinstance(value, list) else value


def flower_run_config(cfg: FedConfig, spec: dict) -> dict:
    """The run config of one run of the plan (fed.study.plan's spec: method, sketch, rank, seed) with ``cfg``'s
    settings (FedAvg's sketch and rank, which it does not use, stay cfg's first)."""
    one = dict(cfg.to_dict(), method=spec["method"], sketch=spec["sketch"] or ("left" if cfg.sketch == "both" else cfg.sketch),
               ranks=spec["rank"] if spec["rank"] is not None else cfg.ranks[0], seeds=spec["seed"])
    return {key: toml_value(one[field]) for key, field in run_config_keys().items()}


def app_run_config() -> dict:
    """The Flower app's run config as pyproject.toml declares it (what a run that overrides nothing gets)."""
    return dict(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])
