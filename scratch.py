"""Training from scratch in low-rank form: `python scratch.py [--field value ...]` (see --help).

A (28*28)-512-512-10 MLP on all ten classes of MNIST or Fashion-MNIST (``--model mlp``, the default), or the
registry's gpt on a text's next characters (``--model gpt``: Tiny Shakespeare; every Linear of it, the head
included, in the form), in one of six forms (lowrank.py):
full rank; every weight a rank-r product with the rank-dependent initialisation (lowrank) or as two
default-initialised Linear layers (lowrank_ae); LoRA-the-Explorer's parallel heads (lte) and its
single-head baseline at equal trainable parameters (lora); and the full model trained by GaLore
(galore.py). Forms x ranks (x LTE's head counts) x seeds, trained in stacks of seeds by stack.train_stack,
with no early stopping (every epoch is plotted; ``epoch_steps`` makes an epoch that many steps). Every curve
row has its optimizer steps and training seconds, for comparisons at equal steps and at equal wall time.
Writes results/scratch_runs.csv, results/scratch_curves.csv and plots/scratch_<dataset or text>_<optimizer>_*.png,
and prints a table of final test accuracies (the mlp) or test losses in nats and bits per character (the gpt).
"""
from __future__ import annotations

import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from dataclasses import dataclass

import models
from config import IMAGE_MODELS, TOKEN_MODELS, ModelConfig
from data import DATASETS, NEXT_TOKEN, TEXTS, Split, Task, TaskSpec, check_val_size, load_ten_classes, text_task, vocabulary
from engine.cli import run_command
from engine.results import (RECORD_COLUMNS, Index, format_table, git_commit, group, mean_std, pct, read_results,
                            seeds_cell, split_diverged)
from engine.runner import report, resolve_device, run_study as run, Study
from engine.stack import train_stack
from galore import GaLoreAdamW, state_numel
from engine.settings import (arg, check_ranks, from_argv, hashed_settings, no_repeats, override,
                             stable_hash)
from lowrank import FORMS, HEADED, build, build_gpt
from plots import draw_scratch
from raclora.errors import DIVERGED, ConfigError
from train import adamw

OPTIMIZERS = ("sgd", "adamw")
MODELS = ("mlp", "gpt")  # of models.MODELS, those the study trains (the mlp: its own stacked form, lowrank.build)
MAX_HEADS = 1024


def form_choices() -> tuple[str, ...]:
    return (*FORMS, "all")


@dataclass
class ScratchConfig(ModelConfig):
    """Settings of ``python scratch.py``: ten-class MLPs, or the gpt on a text, trained from scratch in full or
    low-rank form. The model's fields are ModelConfig's (config.py); the model's ``takes`` chooses the data."""
    # --- what to run ---
    form: str = arg("all", "full | lowrank | lowrank_ae | lte | lora | galore | all", choices=form_choices,
                    hash=False)
    ranks: list[int] = arg([1, 2, 4, 8, 16, 32, 64, 128], "rank r of every form but full (lte: of each head)",
                           hash=False)
    seeds: list[int] = override(ModelConfig, "seeds", [0])
    model: str = override(ModelConfig, "model", help="mlp: a (28*28)-hidden-10 MLP on dataset's images; gpt: the "
                          "registry's gpt (gpt_* fields) on text's next characters", choices=MODELS)
    dataset: str = arg("mnist", "mlp: mnist | fashion_mnist (the study trained on fashion_mnist)",
                       choices=tuple(DATASETS), only=IMAGE_MODELS)
    text: str = arg("shakespeare", "gpt: the text it learns (data.TEXTS; its 90/5/5 splits)", choices=tuple(TEXTS),
                    only=TOKEN_MODELS)
    eval_windows: int = arg(0, "gpt: evaluate on the first this-many windows of the val and test splits (0 = all "
                            "of them): every evaluation reads them, so that curves get many points", range=(0, 10 ** 9),
                            only=TOKEN_MODELS)
    hidden: list[int] = override(ModelConfig, "hidden", [512, 512], help="mlp: hidden widths of the (28*28)-...-10 MLP")
    dropout: float = override(ModelConfig, "dropout", 0.0, help="gpt: dropout probability after the embeddings and "
                              "in every residual branch (the mlp has none: 0)")
    # --- optimisation ---
    optimizer: str = arg("sgd", "sgd (plain, no momentum: the study) | adamw; galore always runs its own Adam",
                         choices=OPTIMIZERS, only={"form": tuple(f for f in FORMS if f != "galore")})
    lr: float = override(ModelConfig, "lr", 1e-3, help="learning rate of the optimizer (and of GaLore)")
    weight_decay: float = override(ModelConfig, "weight_decay", 0.0, help="decoupled weight decay (adamw and "
                                   "galore; sgd: L2 added to the gradient)")
    batch_size: int = override(ModelConfig, "batch_size", 64)
    max_epochs: int = arg(100, "epochs per run (no early stopping: the study plots every epoch)", range=(1, 100_000))
    epoch_steps: int = arg(0, "optimizer steps an epoch (one evaluation, one curve point); 0 = one pass over the "
                           "training split. The passes run on across epochs", range=(0, 10 ** 9))
    # --- forms ---
    # swept like ranks; each lte or lora run's own head count enters its hash as this field's value did when it
    # held one number (scratch_settings_hash)
    lte_heads: list[int] = arg([4], "lte: parallel low-rank heads per layer, swept; \"lora\" is one head of rank "
                               "heads * r for each (at 1 head it is lte's own run, so not run twice)", hash=False)
    lte_every: int = arg(100, "lte, lora: optimizer steps between merges of the heads into the weights",
                         range=(1, 10 ** 9), only={"form": ("lte", "lora")})
    galore_every: int = arg(200, "galore: optimizer steps between recomputations of the projection (SVD)",
                            range=(1, 10 ** 9), only={"form": ("galore",)})
    galore_scale: float = arg(0.25, "galore: scale of the projected-back update", positive=True,
                              only={"form": ("galore",)})
    # --- data ---
    data_dir: str = override(ModelConfig, "data_dir", help="torchvision root: <data_dir>/MNIST/raw, "
                             "<data_dir>/FashionMNIST/raw")
    val_size: int = arg(5000, "mlp: images held out of the 60k training set for validation", range=(1, 10 ** 9),
                        only=IMAGE_MODELS)
    split_seed: int = arg(0, "mlp: seed of the train/validation split (the same for every run)",
                          range=(0, 2 ** 63 - 1), only=IMAGE_MODELS)
    # --- how it runs ---
    stack_size: int = arg(16, "runs of one form and rank (seeds) trained at once as one stacked model",
                          range=(1, 1024), hash=False)

    RUN_KEYS = {"form": None}  # a run is one form's
    # fields added after results were committed, at the value every older (mlp) run had
    ADDED_LATER = {"model": "mlp", "dropout": 0.0, "epoch_steps": 0}

    def check(self) -> None:
        super().check()
        check_ranks(self.ranks)
        if not self.lte_heads or any(not 1 <= h <= MAX_HEADS for h in self.lte_heads):
            raise ConfigError(f"lte_heads must be one or more head counts from 1 to {MAX_HEADS}, got {self.lte_heads}")
        no_repeats("lte_heads", self.lte_heads)
        if self.batch_size < max(self.lte_heads):
            raise ConfigError(f"batch_size ({self.batch_size}) must be at least lte_heads ({max(self.lte_heads)}): "
                              f"each head trains on its own shard of every batch")
        if not self.takes_tokens() and self.dropout:
            raise ConfigError(f"dropout must be 0 for the mlp (the study's MLP has no dropout), got {self.dropout}")

    def check_setup(self) -> None:
        """The checks that need the data's and the model's sizes, before any compute: val_size (mlp), the text's
        file and a context its splits allow (gpt), the gpt's shape, ranks against the model's layers, and LTE's
        heads against the layers' inputs (a head's A has orthonormal rows: at most in of them)."""
        if self.takes_tokens():
            self.load_task("cpu")  # the text verified, each split long enough for the context
            try:
                plain = models.meta_model("gpt", models.model_settings(self), *self.task_shape())
            except ValueError as e:
                raise ConfigError(f"the gpt cannot be built from these settings: {e}") from None
            dims = [(m.in_features, m.out_features) for m in plain.modules() if isinstance(m, models.nn.Linear)]
        else:
            check_val_size(self.val_size)
            spec = DATASETS[self.dataset][3]  # the task the dataset makes: its inputs and classes
            widths = [spec.features, *self.hidden, spec.classes]
            dims = list(zip(widths[:-1], widths[1:]))
        top = max(min(d) for d in dims)
        for r in self.ranks:
            if r > top:
                raise ConfigError(f"rank {r} is out of range: ranks must be integers from 1 to {top} (the largest "
                                  f"min(in, out) among the {self.model}'s layers)")
        narrowest = min(i for i, _ in dims)
        forms = self.selected_forms()
        for form, per_head in (("lte", 1), ("lora", max(self.lte_heads))):
            r = max(self.ranks) * per_head
            if form in forms and r > narrowest:
                what = "rank" if form == "lte" else "rank x heads (lora's one head)"
                raise ConfigError(f"{form}: {what} {r} is above {narrowest}, the fewest inputs of the {self.model}'s "
                                  f"layers (a head's A has orthonormal rows); give ranks and lte_heads with "
                                  f"{'rank' if form == 'lte' else 'rank x heads'} <= {narrowest}")

    def task_shape(self) -> tuple[tuple[int, ...], int]:
        """(input shape, classes) of the model's task: MNIST's images in ten classes, or windows of gpt_context
        characters over the texts' one vocabulary."""
        if self.takes_tokens():
            return (self.gpt_context,), len(vocabulary(self.data_dir))
        spec = DATASETS[self.dataset][3]
        return spec.shape, spec.classes

    def load_task(self, device):
        """The study's task on ``device``: the dataset's ten classes (mlp) or the text's next characters (gpt:
        data.text_task, every split cut to text_chars; val and test to eval_windows windows)."""
        if self.takes_tokens():
            task = text_task(self.text, self.gpt_context, self.data_dir, device, vocabulary(self.data_dir),
                             chars=self.text_chars)
            if not self.eval_windows:
                return task
            k = self.eval_windows
            return Task(task.train, Split(task.val.x[:k], task.val.y[:k]), Split(task.test.x[:k], task.test.y[:k]),
                        task.spec)
        return load_ten_classes(self.dataset, self.data_dir, self.val_size, self.split_seed, device)

    def sizes(self) -> tuple[int, int, int]:
        """(parameters, activation floats of one evaluation pass, input floats) of the full-form model."""
        if self.takes_tokens():
            shape, classes = self.task_shape()
            spec = TaskSpec(shape=shape, classes=classes, objective=NEXT_TOKEN)
            chars = self.text_chars or TEXTS[self.text].characters
            examples = (chars // self.gpt_context, chars // self.gpt_context)
            return models.sizes("gpt", models.model_settings(self), spec, examples)
        return models.sizes("mlp", dict(hidden=self.hidden, dropout=0.0), DATASETS[self.dataset][3])

    def runs_per_stack(self) -> int:
        return min(self.stack_size, len(self.seeds))

    def selected_forms(self) -> list[str]:
        return list(FORMS) if self.form == "all" else [self.form]


def scratch_settings_hash(cfg: ScratchConfig, device: str, form: str, heads: int | None = None) -> str:
    """Hash of every field that changes a from-scratch run of ``form``, apart from its rank and seed
    (engine.settings.settings_hash's rule); a run of lte or lora adds its head count ``heads`` as lte_heads,
    the value that field had when it held one count, so the runs recorded then keep their hashes."""
    d = hashed_settings(cfg, form=form)
    if form in HEADED:
        d["lte_heads"] = heads
    d["device"] = device
    return stable_hash(d)

# dataset: the mlp's images, or the gpt's text; heads: lte's and lora's head count (empty for the other forms);
# steps: optimizer steps at the end; final_test_loss: mean cross-entropy (gpt: nats per character)
RUN_COLUMNS = {"form": str, "rank": int, "seed": int, "status": str, "dataset": str, "optimizer": str, "lr": float,
               "batch_size": int, "max_epochs": int, "trainable_params": int, "optimizer_state": int,
               "final_test_acc": float, "best_epoch": int, "best_test_acc": float, "best_val_loss": float,
               "epochs": int, "merges": int, "diverged_step": int, "model": str, "heads": int, "steps": int,
               "final_test_loss": float, **RECORD_COLUMNS}
# step: optimizer steps so far; wall_s: each run's share of its stack's training seconds so far (evaluations not
# counted); test_loss in nats (per character for the gpt)
CURVE_COLUMNS = {"config_hash": str, "form": str, "rank": int, "seed": int, "dataset": str, "optimizer": str,
                 "epoch": Index("epochs"), "train_loss": float, "val_loss": float, "val_acc": float,
                 "test_acc": float, "merged": bool, "heads": int, "step": int, "wall_s": float, "test_loss": float}
PREFIX = "scratch_"  # results/scratch_runs.csv, results/scratch_curves.csv


def plan(cfg) -> list[dict]:
    """Every run the config asks for: form x rank (x head count for lte and lora) x seed (full has no rank). lora
    at one head is lte's run at one head (the same layer, the same draws): left out when lte runs too."""
    out = []
    forms = cfg.selected_forms()
    for form in forms:
        for rank in [None] if form == "full" else cfg.ranks:
            heads = [None]
            if form in HEADED:
                heads = [h for h in cfg.lte_heads if not (form == "lora" and h == 1 and "lte" in forms)]
            for h in heads:
                out += [dict(form=form, rank=rank, heads=h, seed=s) for s in cfg.seeds]
    return out


def run_hash(cfg, device: str, form: str, rank: int | None, seed: int, heads: int | None = None) -> str:
    return stable_hash([scratch_settings_hash(cfg, device, form, heads), form, rank, seed])


def optimizer_name(cfg, form: str) -> str:
    return "galore" if form == "galore" else cfg.optimizer


def stack_order(specs: list[dict]) -> int:
    """The full-size forms first, then high ranks (and many heads): the biggest models start first."""
    return -(specs[0]["rank"] or 10 ** 6) * (specs[0].get("heads") or 1)


def data_name(cfg) -> str:
    """What the model learns, the rows' dataset column: the mlp's image dataset, or the gpt's text."""
    return cfg.text if cfg.takes_tokens() else cfg.dataset


class ScratchTrainer:
    """Trains stacks of from-scratch runs; what one worker process holds."""

    def __init__(self, cfg, commit: str, task=None, show_epochs: bool = True):

        self.cfg, self.commit, self.show_epochs = cfg, commit, show_epochs
        self.device = resolve_device(cfg.device)
        self.task = task if task is not None else cfg.load_task(self.device)

    def run(self, specs: list[dict]) -> list[tuple[dict, list[dict]]]:
        """Train the runs of ``specs`` (one form, rank and head count) as one stack; (runs row, curve rows) per run."""
        import torch
        from tqdm.auto import tqdm


        cfg = self.cfg
        form, rank, heads = specs[0]["form"], specs[0]["rank"], specs[0].get("heads")
        gens = [torch.Generator(device=self.device).manual_seed(s["seed"]) for s in specs]
        spec = self.task.spec
        if cfg.takes_tokens():
            model = build_gpt(form, models.model_settings(cfg), spec.shape, spec.classes, rank, heads or 1, gens,
                              self.device)
            matrices = model.matrices()  # GaLore projects the Linear weights, not the embeddings and positions
        else:
            model = build(form, cfg.hidden, rank, gens, self.device, n_in=spec.features, n_out=spec.classes,
                          lte_heads=heads or 1)
            matrices = [p for p in model.parameters() if p.dim() == 3]
        made = []

        def make_optimizer(params):
            if form == "galore":  # weight matrices projected, the rest (biases, embeddings) in a plain Adam group
                ids = {id(p) for p in matrices}
                mats = [p for p in params if id(p) in ids]
                rest = [p for p in params if id(p) not in ids]
                opt = GaLoreAdamW([{"params": rest}, {"params": mats, "rank": rank, "update_every": cfg.galore_every,
                                                      "scale": cfg.galore_scale}], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
            elif cfg.optimizer == "sgd":
                opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            else:
                opt = adamw(params, cfg.lr, cfg.weight_decay)  # the training loops' AdamW (train.adamw)
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
                                  progress=lambda epoch, live: bar.update(1), make_optimizer=make_optimizer,
                                  epoch_steps=cfg.epoch_steps)
        state = state_numel(made[0]) // len(specs)  # every run of a stack has the same shapes
        return [self.rows(spec, rec, model.trainable_count(i), state) for i, (spec, rec) in enumerate(zip(specs, records))]

    def rows(self, spec: dict, record, trainable: int, state: int) -> tuple[dict, list[dict]]:
        cfg, dev = self.cfg, self.device.type
        form, rank, seed, heads = spec["form"], spec["rank"], spec["seed"], spec.get("heads")
        key = run_hash(cfg, dev, form, rank, seed, heads)
        opt = optimizer_name(cfg, form)
        data = data_name(cfg)
        finished = record.status != DIVERGED  # a diverged run has no result: counted, left out of the means
        last = record.curve[-1] if finished else {}
        best = record.curve[record.best_epoch - 1]["test_acc"] if finished else None
        row = dict(form=form, rank=rank, seed=seed, status=record.status, dataset=data, optimizer=opt,
                   lr=cfg.lr, batch_size=cfg.batch_size, max_epochs=cfg.max_epochs, trainable_params=trainable,
                   optimizer_state=state, final_test_acc=last.get("test_acc"), best_epoch=record.best_epoch,
                   best_test_acc=best, best_val_loss=record.best_val_loss, epochs=record.epochs,
                   merges=record.merges, diverged_step=record.diverged_step, model=cfg.model, heads=heads,
                   steps=last.get("step"), final_test_loss=last.get("test_loss"), wall_s=round(record.wall_s, 3),
                   config_hash=key,
                   settings_hash=scratch_settings_hash(cfg, dev, form, heads), git_commit=self.commit, device=dev,
                   finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   config=json.dumps(cfg.to_dict(), sort_keys=True))
        curve = [dict(config_hash=key, form=form, rank=rank, seed=seed, dataset=data, optimizer=opt,
                      epoch=c["epoch"], train_loss=c["train_loss"], val_loss=c["val_loss"], val_acc=c["val_acc"],
                      test_acc=c["test_acc"], merged=c["merged"], heads=heads, step=c["step"],
                      wall_s=round(c["wall_s"], 3), test_loss=c["test_loss"]) for c in record.curve]
        return row, curve


def describe(specs: list[dict]) -> str:
    s = specs[0]
    seeds = ",".join(str(x["seed"]) for x in specs)
    return (f"{s['form']}" + (f" r={s['rank']}" if s["rank"] is not None else "") +
            (f" heads={s['heads']}" if s.get("heads") else "") + f" seed{'s' * (len(specs) > 1)} {seeds}")


def run_study(cfg, commit: str) -> list[dict]:
    """Train every run of the plan not yet recorded (runner.run_study); return this study's scratch_runs.csv rows."""
    from tqdm.auto import tqdm


    t0 = time.perf_counter()
    cfg.check_setup()  # the command line has run it; a caller from Python gets the same checks
    trainer = ScratchTrainer(cfg, commit, show_epochs=True)
    dev = trainer.device.type
    t = trainer.task
    what = "next characters: windows of gpt_context characters" if cfg.takes_tokens() else "ten classes: images"
    tqdm.write(f"device: {trainer.device}; {data_name(cfg)}, {what}: {len(t.train)} train / {len(t.val)} val / "
               f"{len(t.test)} test")
    study = Study(plan=plan(cfg), run_hash=lambda spec: run_hash(cfg, dev, **spec),
                  stack_key=lambda spec: (spec["form"], spec["rank"], spec["heads"]), make_trainer=ScratchTrainer,
                  code=__name__,
                  trainer_args=(cfg, commit), trainer=trainer, prefix=PREFIX, run_columns=RUN_COLUMNS,
                  curve_columns=CURVE_COLUMNS, balance=False, order=stack_order)
    rows = run(study, cfg, trainer.device)
    tqdm.write(f"study finished in {time.perf_counter() - t0:.1f} s")
    return rows


def summary(rows: list[dict], curves: list[dict] | None = None) -> str:
    """The mlp's runs: final test accuracy (last epoch), mean ± std over seeds, one line per form and rank; the
    gpt's: its table of test losses (gpt_summary, which reads ``curves``). Both when the rows hold both."""
    gpt = [r for r in rows if r.get("model") == "gpt"]
    images = [r for r in rows if r.get("model") != "gpt"]  # rows from before the gpt have no model: the mlp's
    tables = ([image_summary(images)] if images else []) + ([gpt_summary(gpt, curves or [])] if gpt else [])
    return "\n\n".join(tables) or image_summary([])


def image_summary(rows: list[dict]) -> str:
    """Final test accuracy (last epoch), mean ± std over seeds, one line per form and rank (and head count: "lte
    x4"; rows recorded before the heads column have none)."""
    header = ["form", "optimizer", "rank", "trainable", "optimizer state", "seeds", "final test acc %",
              "best-val test acc %", "s/run"]
    lines = []
    order = {f: i for i, f in enumerate(FORMS)}
    keyed = group([{**r, "heads": r.get("heads")} for r in rows], ("form", "optimizer", "rank", "heads"))
    for (form, opt, rank, heads), rs in sorted(keyed.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1],
                                                                              kv[0][2] or 0, kv[0][3] or 0)):
        ok, diverged = split_diverged(rs)
        lines.append([form + (f" x{heads}" if heads else ""), opt, "-" if rank is None else str(rank),
                      str(rs[0]["trainable_params"]),
                      str(rs[0]["optimizer_state"]), seeds_cell(ok, diverged),
                      pct(*mean_std([r["final_test_acc"] for r in ok])),
                      pct(*mean_std([r["best_test_acc"] for r in ok])),
                      f"{sum(r['wall_s'] for r in rs) / len(rs):.0f}"])
    return format_table(header, lines)


def loss_cell(values: list[float], scale: float = 1.0) -> str:
    """mean ± std of ``values`` times ``scale``, 3 decimals ("-" for none, "± -" for one value)."""
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    return f"{m * scale:.3f} ± " + ("-" if math.isnan(s) else f"{s * scale:.3f}")


def loss_at(curve: list[dict], seconds: float) -> tuple[float | None, bool]:
    """(test loss at the last evaluation within ``seconds`` of training, whether the run ended before then)."""
    within = [c for c in curve if c["wall_s"] is not None and c["wall_s"] <= seconds + 1e-9]
    if not within:
        return None, False
    return within[-1]["test_loss"], within[-1] is curve[-1] and curve[-1]["wall_s"] < seconds


def gpt_summary(rows: list[dict], curves: list[dict]) -> str:
    """One line per form, rank and head count of the gpt's runs: test loss in nats and bits per character after
    the last step (equal optimizer steps), and at the full-rank runs' training time (equal wall time: the last
    evaluation by then; "*": the form had ended sooner, its final loss), mean ± std over seeds."""
    by_run = {k: sorted(v, key=lambda c: c["epoch"]) for k, v in group(curves, ("config_hash",)).items()}
    full_s = mean_std([by_run[(r["config_hash"],)][-1]["wall_s"] for r in rows
                       if r["form"] == "full" and r["status"] != DIVERGED and (r["config_hash"],) in by_run])[0]
    header = ["form", "rank", "heads", "trainable", "optimizer state", "seeds", "steps", "test loss (nats)",
              "bits/char", f"loss at {full_s:.0f} s" if not math.isnan(full_s) else "loss at full's time", "s/run"]
    lines = []
    order = {f: i for i, f in enumerate(FORMS)}
    for (form, rank, heads), rs in sorted(group(rows, ("form", "rank", "heads")).items(),
                                          key=lambda kv: (order.get(kv[0][0], 9), kv[0][1] or 0, kv[0][2] or 0)):
        ok, diverged = split_diverged(rs)
        at = [loss_at(by_run.get((r["config_hash"],), []), full_s) for r in ok] if not math.isnan(full_s) else []
        timed = loss_cell([a for a, _ in at]) + ("*" if any(sooner for _, sooner in at) else "")
        losses = [r["final_test_loss"] for r in ok]
        lines.append([form, "-" if rank is None else str(rank), "-" if heads is None else str(heads),
                      str(rs[0]["trainable_params"]), str(rs[0]["optimizer_state"]), seeds_cell(ok, diverged),
                      str(rs[0]["steps"] if ok else "-"), loss_cell(losses), loss_cell(losses, 1 / math.log(2)),
                      timed if at else "-", f"{sum(r['wall_s'] for r in rs) / len(rs):.0f}"])
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
    wanted = {scratch_settings_hash(cfg, device, f, h) for f in FORMS  # every form recorded under these settings
              for h in (cfg.lte_heads if f in HEADED else [None])}
    def table(rows):  # the gpt's table reads the curves (its losses at equal wall time)
        return summary(rows, read_results(cfg.results_dir, PREFIX, RUN_COLUMNS, CURVE_COLUMNS)[1])

    report(cfg, study_rows, wanted, table, draw_scratch, RUN_COLUMNS, CURVE_COLUMNS, PREFIX)


if __name__ == "__main__":
    sys.exit(main())
