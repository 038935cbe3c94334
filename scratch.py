"""Training from scratch in low-rank form: `python scratch.py [--field value ...]` (see --help).

A (28*28)-512-512-10 MLP on all ten classes of MNIST or Fashion-MNIST, in one of six forms (lowrank.py):
full rank; every weight a rank-r product with the rank-dependent initialisation (lowrank) or as two
default-initialised Linear layers (lowrank_ae); LoRA-the-Explorer's parallel heads (lte) and its
single-head baseline at equal trainable parameters (lora); and the full model trained by GaLore
(galore.py). Forms x ranks x seeds, trained in stacks of seeds by stack.train_stack, with no early
stopping (every epoch is plotted). Writes results/scratch_runs.csv, results/scratch_curves.csv and
plots/scratch_<dataset>_<optimizer>_*.png, and prints a table of final test accuracies.
"""
from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from dataclasses import dataclass

import models
from data import DATASETS, check_val_size, load_ten_classes
from engine.cli import run_command
from engine.results import (RECORD_COLUMNS, Index, format_table, git_commit, group, mean_std, pct, seeds_cell,
                            split_diverged)
from engine.runner import report, resolve_device, run_study as run, Study
from engine.stack import train_stack
from galore import GaLoreAdamW, state_numel
from engine.settings import StudyConfig, arg, check_ranks, check_workers, from_argv, override, settings_hash, stable_hash
from lowrank import FORMS, build
from plots import draw_scratch
from raclora.errors import DIVERGED, ConfigError

OPTIMIZERS = ("sgd", "adamw")


def form_choices() -> tuple[str, ...]:
    return (*FORMS, "all")


@dataclass
class ScratchConfig(StudyConfig):
    """Settings of ``python scratch.py``: ten-class MLPs trained from scratch in full or low-rank form."""
    # --- what to run ---
    form: str = arg("all", "full | lowrank | lowrank_ae | lte | lora | galore | all", choices=form_choices,
                    hash=False)
    ranks: list[int] = arg([1, 2, 4, 8, 16, 32, 64, 128], "rank r of every form but full", hash=False)
    seeds: list[int] = override(StudyConfig, "seeds", [0])
    dataset: str = arg("mnist", "mnist | fashion_mnist (the study trained on fashion_mnist)", choices=tuple(DATASETS))
    hidden: list[int] = arg([512, 512], "hidden widths of the (28*28)-...-10 MLP")
    # --- optimisation ---
    optimizer: str = arg("sgd", "sgd (plain, no momentum: the study) | adamw; galore always runs its own Adam",
                         choices=OPTIMIZERS, only={"form": tuple(f for f in FORMS if f != "galore")})
    lr: float = override(StudyConfig, "lr", 1e-3, help="learning rate of the optimizer (and of GaLore)")
    weight_decay: float = override(StudyConfig, "weight_decay", 0.0, help="decoupled weight decay (adamw and "
                                   "galore; sgd: L2 added to the gradient)")
    batch_size: int = override(StudyConfig, "batch_size", 64)
    max_epochs: int = arg(100, "epochs per run (no early stopping: the study plots every epoch)", range=(1, 100_000))
    # --- forms ---
    lte_heads: int = arg(4, "lte: parallel low-rank heads per layer; \"lora\" is one head of rank lte_heads * r",
                         range=(1, 1024), only={"form": ("lte", "lora")})
    lte_every: int = arg(100, "lte, lora: optimizer steps between merges of the heads into the weights",
                         range=(1, 10 ** 9), only={"form": ("lte", "lora")})
    galore_every: int = arg(200, "galore: optimizer steps between recomputations of the projection (SVD)",
                            range=(1, 10 ** 9), only={"form": ("galore",)})
    galore_scale: float = arg(0.25, "galore: scale of the projected-back update", positive=True,
                              only={"form": ("galore",)})
    # --- data ---
    data_dir: str = override(StudyConfig, "data_dir", help="torchvision root: <data_dir>/MNIST/raw, "
                             "<data_dir>/FashionMNIST/raw")
    val_size: int = arg(5000, "images held out of the 60k training set for validation", range=(1, 10 ** 9))
    split_seed: int = arg(0, "seed of the train/validation split (the same for every run)", range=(0, 2 ** 63 - 1))
    # --- how it runs ---
    stack_size: int = arg(16, "runs of one form and rank (seeds) trained at once as one stacked model",
                          range=(1, 1024), hash=False)
    workers: int = arg(0, "processes training stacks side by side; 0 = one per core on CPU, 1 on a GPU", hash=False)

    RUN_KEYS = {"form": None}  # a run is one form's

    def check(self) -> None:
        if not self.hidden or any(not 1 <= h <= 2 ** 20 for h in self.hidden):
            raise ConfigError(f"hidden must be one or more widths from 1 to {2 ** 20}, got {self.hidden}")
        check_ranks(self.ranks)
        check_workers(self.workers)
        if self.batch_size < self.lte_heads:
            raise ConfigError(f"batch_size ({self.batch_size}) must be at least lte_heads ({self.lte_heads}): "
                              f"each head trains on its own shard of every batch")

    def check_setup(self) -> None:
        """The checks that need the data's sizes: val_size, and ranks against the MLP's layers."""
        check_val_size(self.val_size)
        spec = DATASETS[self.dataset][3]  # the task the dataset makes: its inputs and classes
        top = max_useful_rank([spec.features, *self.hidden, spec.classes])
        for r in self.ranks:
            if r > top:
                raise ConfigError(f"rank {r} is out of range: ranks must be integers from 1 to {top} (the largest "
                                  f"min(in, out) among the model's layers)")

    def sizes(self) -> tuple[int, int, int]:
        """(parameters, activation floats of one evaluation pass, image floats) of the full-form MLP."""
        return models.sizes("mlp", dict(hidden=self.hidden, dropout=0.0), DATASETS[self.dataset][3])

    def runs_per_stack(self) -> int:
        return min(self.stack_size, len(self.seeds))

    def selected_forms(self) -> list[str]:
        return list(FORMS) if self.form == "all" else [self.form]


def max_useful_rank(dims: list[int]) -> int:
    """Largest min(in, out) over the layers of an MLP with widths ``dims``: a higher rank adds nothing anywhere."""
    return max(min(a, b) for a, b in zip(dims[:-1], dims[1:]))


def scratch_settings_hash(cfg: ScratchConfig, device: str, form: str) -> str:
    """Hash of every field that changes a from-scratch run of ``form``, apart from its rank and seed."""
    return settings_hash(cfg, device, form=form)

RUN_COLUMNS = {"form": str, "rank": int, "seed": int, "status": str, "dataset": str, "optimizer": str, "lr": float,
               "batch_size": int, "max_epochs": int, "trainable_params": int, "optimizer_state": int,
               "final_test_acc": float, "best_epoch": int, "best_test_acc": float, "best_val_loss": float,
               "epochs": int, "merges": int, "diverged_step": int, **RECORD_COLUMNS}
CURVE_COLUMNS = {"config_hash": str, "form": str, "rank": int, "seed": int, "dataset": str, "optimizer": str,
                 "epoch": Index("epochs"), "train_loss": float, "val_loss": float, "val_acc": float,
                 "test_acc": float, "merged": bool}
PREFIX = "scratch_"  # results/scratch_runs.csv, results/scratch_curves.csv


def plan(cfg) -> list[dict]:
    """Every run the config asks for: form x rank x seed (full has no rank)."""
    out = []
    for form in cfg.selected_forms():
        for rank in [None] if form == "full" else cfg.ranks:
            out += [dict(form=form, rank=rank, seed=s) for s in cfg.seeds]
    return out


def run_hash(cfg, device: str, form: str, rank: int | None, seed: int) -> str:
    return stable_hash([scratch_settings_hash(cfg, device, form), form, rank, seed])


def optimizer_name(cfg, form: str) -> str:
    return "galore" if form == "galore" else cfg.optimizer


def stack_order(specs: list[dict]) -> int:
    """The full-size forms first, then high ranks: the biggest models start first."""
    return -(specs[0]["rank"] or 10 ** 6)


class ScratchTrainer:
    """Trains stacks of from-scratch runs; what one worker process holds."""

    def __init__(self, cfg, commit: str, task=None, show_epochs: bool = True):

        self.cfg, self.commit, self.show_epochs = cfg, commit, show_epochs
        self.device = resolve_device(cfg.device)
        self.task = task if task is not None else load_ten_classes(cfg.dataset, cfg.data_dir, cfg.val_size,
                                                                   cfg.split_seed, self.device)

    def run(self, specs: list[dict]) -> list[tuple[dict, list[dict]]]:
        """Train the runs of ``specs`` (one form and rank) as one stack; (runs row, curve rows) per run."""
        import torch
        from tqdm.auto import tqdm


        cfg = self.cfg
        form, rank = specs[0]["form"], specs[0]["rank"]
        gens = [torch.Generator(device=self.device).manual_seed(s["seed"]) for s in specs]
        spec = self.task.spec
        model = build(form, cfg.hidden, rank, gens, self.device, n_in=spec.features, n_out=spec.classes,
                      lte_heads=cfg.lte_heads)
        made = []

        def make_optimizer(params):
            if form == "galore":  # weight matrices projected, biases in a plain Adam group
                mats = [p for p in params if p.dim() == 3]
                rest = [p for p in params if p.dim() != 3]
                opt = GaLoreAdamW([{"params": rest}, {"params": mats, "rank": rank, "update_every": cfg.galore_every,
                                                      "scale": cfg.galore_scale}], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
            elif cfg.optimizer == "sgd":
                opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            else:
                opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            made.append(opt)
            return opt

        lte = model.lte_layers()

        def merge_heads(step: int, generators) -> bool:
            if not lte or step % cfg.lte_every:
                return False
            for layer in lte:
                layer.merge(generators)
            return True

        bar = tqdm(total=cfg.max_epochs, desc=describe(specs), leave=False, unit="epoch",
                   disable=not (cfg.progress and self.show_epochs))
        with bar:
            records = train_stack(model, [p for p in model.parameters() if p.requires_grad], self.task,
                                  generators=gens, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  batch_size=cfg.batch_size, max_epochs=cfg.max_epochs,
                                  patience=cfg.max_epochs + 1, on_step_end=merge_heads,
                                  progress=lambda epoch, live: bar.update(1), make_optimizer=make_optimizer)
        state = state_numel(made[0]) // len(specs)  # every run of a stack has the same shapes
        return [self.rows(spec, rec, model.trainable_count(i), state) for i, (spec, rec) in enumerate(zip(specs, records))]

    def rows(self, spec: dict, record, trainable: int, state: int) -> tuple[dict, list[dict]]:
        cfg, dev = self.cfg, self.device.type
        form, rank, seed = spec["form"], spec["rank"], spec["seed"]
        key = run_hash(cfg, dev, form, rank, seed)
        opt = optimizer_name(cfg, form)
        finished = record.status != DIVERGED  # a diverged run has no result: counted, left out of the means
        final = record.curve[-1]["test_acc"] if finished else None
        best = record.curve[record.best_epoch - 1]["test_acc"] if finished else None
        row = dict(form=form, rank=rank, seed=seed, status=record.status, dataset=cfg.dataset, optimizer=opt,
                   lr=cfg.lr, batch_size=cfg.batch_size, max_epochs=cfg.max_epochs, trainable_params=trainable,
                   optimizer_state=state, final_test_acc=final, best_epoch=record.best_epoch,
                   best_test_acc=best, best_val_loss=record.best_val_loss, epochs=record.epochs,
                   merges=record.merges, diverged_step=record.diverged_step, wall_s=round(record.wall_s, 3),
                   config_hash=key,
                   settings_hash=scratch_settings_hash(cfg, dev, form), git_commit=self.commit, device=dev,
                   finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   config=json.dumps(cfg.to_dict(), sort_keys=True))
        curve = [dict(config_hash=key, form=form, rank=rank, seed=seed, dataset=cfg.dataset, optimizer=opt,
                      epoch=c["epoch"], train_loss=c["train_loss"], val_loss=c["val_loss"], val_acc=c["val_acc"],
                      test_acc=c["test_acc"], merged=c["merged"]) for c in record.curve]
        return row, curve


def describe(specs: list[dict]) -> str:
    s = specs[0]
    seeds = ",".join(str(x["seed"]) for x in specs)
    return f"{s['form']}" + (f" r={s['rank']}" if s["rank"] is not None else "") + f" seed{'s' * (len(specs) > 1)} {seeds}"


def run_study(cfg, commit: str) -> list[dict]:
    """Train every run of the plan not yet recorded (runner.run_study); return this study's scratch_runs.csv rows."""
    from tqdm.auto import tqdm


    t0 = time.perf_counter()
    cfg.check_setup()  # the command line has run it; a caller from Python gets the same checks
    trainer = ScratchTrainer(cfg, commit, show_epochs=True)
    dev = trainer.device.type
    t = trainer.task
    tqdm.write(f"device: {trainer.device}; {cfg.dataset}, ten classes: {len(t.train)} train / {len(t.val)} val / "
               f"{len(t.test)} test images")
    study = Study(plan=plan(cfg), run_hash=lambda spec: run_hash(cfg, dev, **spec),
                  stack_key=lambda spec: (spec["form"], spec["rank"]), make_trainer=ScratchTrainer, code=__name__,
                  trainer_args=(cfg, commit), trainer=trainer, prefix=PREFIX, run_columns=RUN_COLUMNS,
                  curve_columns=CURVE_COLUMNS, balance=False, order=stack_order)
    rows = run(study, cfg, trainer.device)
    tqdm.write(f"study finished in {time.perf_counter() - t0:.1f} s")
    return rows


def summary(rows: list[dict]) -> str:
    """Final test accuracy (last epoch), mean ± std over seeds, one line per form and rank."""
    header = ["form", "optimizer", "rank", "trainable", "optimizer state", "seeds", "final test acc %",
              "best-val test acc %", "s/run"]
    lines = []
    order = {f: i for i, f in enumerate(FORMS)}
    for (form, opt, rank), rs in sorted(group(rows, ("form", "optimizer", "rank")).items(),
                                        key=lambda kv: (order.get(kv[0][0], 9), kv[0][1], kv[0][2] or 0)):
        ok, diverged = split_diverged(rs)
        lines.append([form, opt, "-" if rank is None else str(rank), str(rs[0]["trainable_params"]),
                      str(rs[0]["optimizer_state"]), seeds_cell(ok, diverged),
                      pct(*mean_std([r["final_test_acc"] for r in ok])),
                      pct(*mean_std([r["best_test_acc"] for r in ok])),
                      f"{sum(r['wall_s'] for r in rs) / len(rs):.0f}"])
    return format_table(header, lines)


def main(argv: list[str] | None = None) -> int:

    def parse():
        return from_argv(argv, ScratchConfig, prog="scratch.py",
                         description="MLPs trained from scratch in full or low-rank form. Every field can be overridden.")

    return run_command(parse, study, lambda cfg: Path(cfg.results_dir) / f"{PREFIX}runs.csv")


def study(cfg) -> None:
    """Train what the config asks for (unless --plots-only), print the table, draw the figures."""
    study_rows = None if cfg.plots_only else run_study(cfg, git_commit())
    device = resolve_device(cfg.device).type
    wanted = {scratch_settings_hash(cfg, device, f) for f in FORMS}  # every form recorded under these settings
    report(cfg, study_rows, wanted, summary, draw_scratch, RUN_COLUMNS, CURVE_COLUMNS, PREFIX)


if __name__ == "__main__":
    sys.exit(main())
