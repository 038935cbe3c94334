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

RUN_COLUMNS = ["form", "rank", "seed", "status", "dataset", "optimizer", "lr", "batch_size", "max_epochs",
               "trainable_params", "optimizer_state", "final_test_acc", "best_epoch", "best_test_acc", "best_val_loss",
               "epochs", "merges", "diverged_step", "wall_s", "config_hash", "settings_hash", "git_commit",
               "code_fingerprint", "device", "finished_at", "config"]
CURVE_COLUMNS = ["config_hash", "form", "rank", "seed", "dataset", "optimizer", "epoch", "train_loss", "val_loss",
                 "val_acc", "test_acc", "merged"]
PREFIX = "scratch_"  # results/scratch_runs.csv, results/scratch_curves.csv
# The modules whose source determines this study's numbers (results.code_fingerprint)
CODE = ["data", "models", "lora", "randlora", "train", "engine.stack", "lowrank", "galore", "scratch"]


def plan(cfg) -> list[dict]:
    """Every run the config asks for: form x rank x seed (full has no rank)."""
    out = []
    for form in cfg.selected_forms():
        for rank in [None] if form == "full" else cfg.ranks:
            out += [dict(form=form, rank=rank, seed=s) for s in cfg.seeds]
    return out


def run_hash(cfg, device: str, form: str, rank: int | None, seed: int) -> str:
    from config import scratch_settings_hash, stable_hash
    return stable_hash([scratch_settings_hash(cfg, device, form), form, rank, seed])


def optimizer_name(cfg, form: str) -> str:
    return "galore" if form == "galore" else cfg.optimizer


def stack_order(specs: list[dict]) -> int:
    """The full-size forms first, then high ranks: the biggest models start first."""
    return -(specs[0]["rank"] or 10 ** 6)


class ScratchTrainer:
    """Trains stacks of from-scratch runs; what one worker process holds."""

    def __init__(self, cfg, commit: str, task=None, show_epochs: bool = True):
        from data import load_ten_classes
        from engine.runner import resolve_device

        self.cfg, self.commit, self.show_epochs = cfg, commit, show_epochs
        self.device = resolve_device(cfg.device)
        self.task = task if task is not None else load_ten_classes(cfg.dataset, cfg.data_dir, cfg.val_size,
                                                                   cfg.split_seed, self.device)

    def run(self, specs: list[dict]) -> list[tuple[dict, list[dict]]]:
        """Train the runs of ``specs`` (one form and rank) as one stack; (runs row, curve rows) per run."""
        import torch
        from tqdm.auto import tqdm

        from galore import GaLoreAdamW, state_numel
        from lowrank import build
        from engine.stack import train_stack

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
        from config import scratch_settings_hash
        from engine.results import DIVERGED

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

    from engine.runner import Study, run_study as run

    t0 = time.perf_counter()
    cfg.check_setup()  # the command line has run it; a caller from Python gets the same checks
    trainer = ScratchTrainer(cfg, commit, show_epochs=True)
    dev = trainer.device.type
    t = trainer.task
    tqdm.write(f"device: {trainer.device}; {cfg.dataset}, ten classes: {len(t.train)} train / {len(t.val)} val / "
               f"{len(t.test)} test images")
    study = Study(plan=plan(cfg), run_hash=lambda spec: run_hash(cfg, dev, **spec),
                  stack_key=lambda spec: (spec["form"], spec["rank"]), make_trainer=ScratchTrainer, code=CODE,
                  trainer_args=(cfg, commit), trainer=trainer, prefix=PREFIX, run_columns=RUN_COLUMNS,
                  curve_columns=CURVE_COLUMNS, balance=False, order=stack_order)
    rows = run(study, cfg, trainer.device)
    tqdm.write(f"study finished in {time.perf_counter() - t0:.1f} s")
    return rows


def summary(rows: list[dict]) -> str:
    """Final test accuracy (last epoch), mean ± std over seeds, one line per form and rank."""
    from engine.results import format_table, group, mean_std, pct, seeds_cell, split_diverged

    header = ["form", "optimizer", "rank", "trainable", "optimizer state", "seeds", "final test acc %",
              "best-val test acc %", "s/run"]
    lines = []
    order = {f: i for i, f in enumerate(("full", "lowrank", "lowrank_ae", "lte", "lora", "galore"))}
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
    from engine.cli import run_command
    from config import ScratchConfig, from_argv

    def parse():
        return from_argv(argv, ScratchConfig, prog="scratch.py",
                         description="MLPs trained from scratch in full or low-rank form. Every field can be overridden.")

    return run_command(parse, study, lambda cfg: Path(cfg.results_dir) / f"{PREFIX}runs.csv")


def study(cfg) -> None:
    """Train what the config asks for (unless --plots-only), print the table, draw the figures."""
    from config import FORMS, scratch_settings_hash
    from plots import draw_scratch
    from engine.results import git_commit
    from engine.runner import report, resolve_device

    study_rows = None if cfg.plots_only else run_study(cfg, git_commit())
    device = resolve_device(cfg.device).type
    wanted = {scratch_settings_hash(cfg, device, f) for f in FORMS}  # every form recorded under these settings
    report(cfg, study_rows, wanted, summary, draw_scratch, PREFIX)


if __name__ == "__main__":
    sys.exit(main())
