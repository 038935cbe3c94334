"""The experiment: base model on task A, FPFT on task B, then method x sketch x rank x seed adapters.

Each run draws every random number (initial factors, re-sampled sketches, dropout masks, batch
order) from one torch.Generator seeded with the run's seed, and is written to the results files
as soon as it finishes.
"""
from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from config import Config, ConfigError, settings_hash, stable_hash
from data import load_tasks
from lora import lora_scale, wrap_linears
from methods import get_method
from models import build_model, count_trainable, set_generator
from results import atomic_path, read_rows, upsert_run
from train import Record, evaluate, train


class CheckpointError(RuntimeError):
    """A cached checkpoint that cannot be loaded; the message says what to delete."""


LAYER_DIMS_NOTE = "note: rank {r} exceeds min(in, out) = {m} of the {i}->{o} layer; its update there has rank at most {m}"


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda, then mps, then cpu; an explicit device that is not available is a ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' is not available on this machine; allowed here: auto, cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' is not available on this machine; allowed here: auto, cpu")
    return torch.device(name)


def run_plan(cfg: Config) -> list[dict]:
    """Every run the config asks for, in order: FPFT seeds, then method x sketch x rank x seed."""
    plan = [dict(method="fpft", sketch=None, rank=None, seed=s) for s in cfg.seeds] if cfg.run_fpft else []
    for method in cfg.selected_methods():
        for sketch in cfg.selected_sketches():
            for rank in cfg.ranks:
                for seed in cfg.seeds:
                    plan.append(dict(method=method, sketch=sketch, rank=rank, seed=seed))
    return plan


def _kind(method: str) -> str:
    """Which settings a run depends on: "base" and "fpft" ignore the adapter-only fields."""
    return method if method in ("base", "fpft") else "adapter"


def run_hash(cfg: Config, device: str, method: str, sketch: str | None, rank: int | None, seed: int) -> str:
    return stable_hash([settings_hash(cfg, device, _kind(method)), method, sketch, rank, seed])


class Sweep:
    """Runs the plan of ``cfg``; ``rows`` collects the runs.csv rows of this sweep (resumed ones too)."""

    def __init__(self, cfg: Config, commit: str):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.commit = commit
        self.results_dir = Path(cfg.results_dir)
        self.tasks = load_tasks(cfg.data_dir, cfg.val_size, cfg.split_seed, self.device)
        self.done = {r["config_hash"]: r for r in read_rows(self.results_dir / "runs.csv")} if cfg.resume else {}
        self.rows: list[dict] = []

    # --- the base model, trained once per setting and cached as a checkpoint ---
    def base_model(self) -> torch.nn.Module:
        cfg, dev = self.cfg, self.device.type
        key = run_hash(cfg, dev, "base", None, None, cfg.base_seed)
        ckpt = self.results_dir / "checkpoints" / f"base_{key}.pt"
        if ckpt.exists():
            model = build_model(cfg.hidden, cfg.dropout, None, self.device)
            try:
                saved = torch.load(ckpt, map_location=self.device, weights_only=True)
                model.load_state_dict(saved["state_dict"])
            except Exception as e:
                raise CheckpointError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}); "
                                      f"delete it and the base model is retrained") from None
            record = Record(**saved["record"])
            tqdm.write(f"base model: loaded {ckpt}")
        else:
            g = torch.Generator(device=self.device).manual_seed(cfg.base_seed)
            model = build_model(cfg.hidden, cfg.dropout, g, self.device)
            set_generator(model, g)
            record = self._train(model, list(model.parameters()), "A", g, desc="base model (digits 0-4)")
            with atomic_path(ckpt) as tmp:
                torch.save({"state_dict": model.state_dict(), "record": dataclasses.asdict(record),
                            "config": cfg.to_dict()}, tmp)
        if key not in self.done:
            self._finish("base", None, None, cfg.base_seed, key, model, record)
        else:
            self.rows.append(self.done[key])
        return model

    # --- one run on task B ---
    def run(self, base: torch.nn.Module, method: str, sketch: str | None, rank: int | None, seed: int) -> dict:
        cfg, dev = self.cfg, self.device.type
        key = run_hash(cfg, dev, method, sketch, rank, seed)
        if key in self.done:
            self.rows.append(self.done[key])
            return self.done[key]
        g = torch.Generator(device=self.device).manual_seed(seed)
        model = build_model(cfg.hidden, cfg.dropout, None, self.device)
        model.load_state_dict(base.state_dict())
        set_generator(model, g)
        on_epoch_end = None
        if method == "fpft":
            params = list(model.parameters())
            desc = f"fpft seed {seed}"
        else:
            strategy = get_method(method)
            adapters = wrap_linears(model, rank, lora_scale(cfg.scaling, cfg.lora_alpha, rank), sketch,
                                    cfg.random_init, g)
            params = strategy.prepare(adapters)
            on_epoch_end = lambda epoch: strategy.end_of_epoch(adapters, epoch, cfg.merge_every, g)  # noqa: E731
            desc = f"{method} {sketch} r={rank} seed {seed}"
        record = self._train(model, params, "B", g, desc=desc, on_epoch_end=on_epoch_end)
        return self._finish(method, sketch, rank, seed, key, model, record)

    def _train(self, model, params, task: str, g, desc: str, on_epoch_end=None) -> Record:
        cfg = self.cfg
        bar = tqdm(total=cfg.max_epochs, desc=desc, leave=False, disable=not cfg.progress, unit="epoch")

        def progress(row: dict) -> None:
            bar.update(1)
            bar.set_postfix(val_loss=f"{row['val_loss']:.3f}", test_acc=f"{row['test_acc']:.3f}")

        try:
            return train(model, params, self.tasks[task], lr=cfg.lr, weight_decay=cfg.weight_decay,
                         batch_size=cfg.batch_size, max_epochs=cfg.max_epochs, patience=cfg.patience,
                         generator=g, on_epoch_end=on_epoch_end,
                         reset_optimizer_on_merge=cfg.reset_optimizer_on_merge, progress=progress)
        finally:
            bar.close()

    def _finish(self, method, sketch, rank, seed, key, model, record: Record) -> dict:
        """Evaluate the kept weights on both tasks' test sets and write the run to the results files."""
        cfg = self.cfg
        _, acc_a = evaluate(model, self.tasks["A"].test)
        _, acc_b = evaluate(model, self.tasks["B"].test)
        trainable = count_trainable(model)  # base and fpft: every parameter; adapters: the trained factors
        row = dict(method=method, sketch=sketch, rank=rank, seed=seed, trainable_params=trainable,
                   epochs=record.epochs, best_epoch=record.best_epoch, best_val_loss=record.best_val_loss,
                   test_acc_b=acc_b, test_acc_a=acc_a, merges=record.merges, wall_s=round(record.wall_s, 3),
                   config_hash=key, settings_hash=settings_hash(cfg, self.device.type, _kind(method)),
                   git_commit=self.commit, device=self.device.type,
                   finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   config=json.dumps(cfg.to_dict(), sort_keys=True),
                   **{k: getattr(cfg, k) for k in ("scaling", "lora_alpha", "random_init", "merge_every",
                                                   "reset_optimizer_on_merge", "lr", "weight_decay",
                                                   "batch_size", "max_epochs", "patience")})
        curve = [dict(config_hash=key, method=method, sketch=sketch, rank=rank, seed=seed, epoch=c["epoch"],
                      train_loss=c["train_loss"], val_loss=c["val_loss"], val_acc=c["val_acc"],
                      test_acc_b=c["test_acc"] if method != "base" else None, merged=c["merged"])
                 for c in record.curve]
        upsert_run(self.results_dir, row, curve)
        self.rows.append(row)
        return row


def run_sweep(cfg: Config, commit: str) -> list[dict]:
    """Base model, then every run of the plan; returns this sweep's runs.csv rows."""
    t0 = time.perf_counter()
    sweep = Sweep(cfg, commit)
    tqdm.write(f"device: {sweep.device}; task B: {len(sweep.tasks['B'].train)} train / "
               f"{len(sweep.tasks['B'].val)} val / {len(sweep.tasks['B'].test)} test images")
    dims = [784, *cfg.hidden, 5]
    narrowest = min(zip(dims[:-1], dims[1:]), key=lambda io: min(io))
    if max(cfg.ranks) > min(narrowest):  # legal (the published sweep uses 8 on the 64->5 layer): say so once
        tqdm.write(LAYER_DIMS_NOTE.format(r=max(cfg.ranks), m=min(narrowest), i=narrowest[0], o=narrowest[1]))
    base = sweep.base_model()
    plan = run_plan(cfg)
    for spec in tqdm(plan, desc="runs", unit="run", disable=not cfg.progress):
        sweep.run(base, **spec)
    tqdm.write(f"sweep finished in {time.perf_counter() - t0:.1f} s")
    return sweep.rows
